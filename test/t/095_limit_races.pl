# Limits that change while 8 clients hold escrow slots of a hot key.  Each scenario starts a
# customer under a hard cap of 2000 (soft threshold 0.8), lets 8 clients (hot_key_slots =
# always, +1 per call, each call its own transaction) take slots and budgets, raises the limit
# far away mid-run (budgets granted under it are large), then lowers it to 300 above the exact
# total of that moment -- through the plan's limit, a customer override, a plan change, or a
# suspension followed by an override -- while the clients keep calling.  Afterwards:
#  - the committed total is exactly the lowered limit: no call passed it, and the clients kept
#    calling long enough to reach it;
#  - where the lowering also moved the soft threshold within reach, exactly one soft_limit
#    alert, at exactly the threshold;
#  - every aggregate equals its ledger rows, and folding the slots changes no total.
use strict;
use warnings;
use IPC::Run;
use Time::HiRes qw(sleep time);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('limit_races');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
usage_billing.hot_key_slots = always
max_connections = 40
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_meter('r_calls', 'sum');
});

my $dir = $node->basedir . '/races';
mkdir $dir or die "mkdir $dir: $!";

# The exact total of a customer's key: row and slots, as every reader sees it.
sub total_of
{
	my ($c) = @_;
	return $node->safe_psql('postgres', qq{
SELECT coalesce(sum(total), 0) FROM usage_billing.aggregate_totals
 WHERE customer_id = '$c' AND meter = 'r_calls'});
}

# Runs $clients pgbench clients calling +1 for customer $c for $secs seconds, in the
# background; refusals (PT402, PT403) are expected and caught.
sub start_load
{
	my ($c, $secs) = @_;
	my $script = "$dir/$c.sql";
	open my $f, '>', $script or die;
	print $f qq{DO \$\$
BEGIN
    PERFORM usage_billing.increment_usage('$c', 'r_calls', 1);
EXCEPTION WHEN SQLSTATE 'PT402' OR SQLSTATE 'PT403' THEN
    NULL;
END \$\$;
};
	close $f;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'pgbench', '--no-vacuum', '--client=8', '--jobs=2', "--time=$secs", '-f', $script,
		  $node->connstr('postgres') ],
		'>', \$out, '2>', \$err);
	return { h => $h, out => \$out, err => \$err };
}

sub finish_load
{
	my ($load, $name) = @_;
	$load->{h}->finish;
	my ($n) = ${ $load->{out} } =~ /number of transactions actually processed: (\d+)/;
	my ($failed) = ${ $load->{out} } =~ /number of failed transactions: (\d+)/;
	ok(defined $n && $n > 0 && !$failed && ${ $load->{err} } !~ /ERROR|aborted/,
		"$name: the clients ran without an unexpected error (" . ($n // 'no') . " calls)")
	  or diag(${ $load->{out} } . ${ $load->{err} });
}

# One scenario.  $lower is the SQL that lowers the limit to :lim (and may put the soft
# threshold near :pt in plan $soft).  It runs in a transaction that first takes SHARE on
# the ledger: calls that are writing finish before the total is read, calls that come later
# wait until the new limit is committed.  Calls that looked the old limit up before waiting
# land among the first of the 300 units left, so the total must still stop at exactly :lim.
sub scenario
{
	my ($name, $c, $soft, $lower, $before) = @_;
	my $plan = "plan_$c";
	$node->safe_psql('postgres', qq{
SELECT usage_billing.create_plan('$plan', 0);
SELECT usage_billing.set_plan_limit('$plan', 'r_calls', included => 2000, hard_cap => true,
                                    soft_threshold => NULL);
SELECT usage_billing.upsert_customer('$c', '$plan');
});
	my $load = start_load($c, 6);
	sleep(1.5);
	$node->safe_psql('postgres', qq{
SELECT usage_billing.set_plan_limit('$plan', 'r_calls', included => 1000000000, hard_cap => true,
                                    soft_threshold => NULL)});
	sleep(1.5);
	$node->safe_psql('postgres', $before) if $before;
	my $out = $node->safe_psql('postgres', qq{
BEGIN;
LOCK TABLE usage_billing.usage_events IN SHARE MODE;
SELECT total + 300 AS lim, total + 150 AS pt FROM usage_billing.aggregate_totals
 WHERE customer_id = '$c' AND meter = 'r_calls' \\gset
$lower;
COMMIT;
SELECT :lim, :pt;
});
	my ($limit, $point) = split /\|/, (split /\n/, $out)[-1];
	note("$name: lowered to $limit at " . ($limit - 300));
	finish_load($load, $name);

	is(total_of($c), $limit, "$name: the total stops at exactly the lowered limit $limit");
	is($node->safe_psql('postgres', qq{
SELECT count(*) FROM usage_billing.alerts
 WHERE customer_id = '$c' AND meter = 'r_calls' AND kind = 'limit_reached'}),
		'0', "$name: a hard cap is never passed, so no limit_reached");
	if ($soft)
	{
		# the threshold is soft_threshold * included in numeric: the first total at or above it
		my $first = $node->safe_psql('postgres', qq{
SELECT ceil(soft_threshold * included) FROM usage_billing.plan_limits
 WHERE plan = '$soft' AND meter = 'r_calls'});
		is($node->safe_psql('postgres', qq{
SELECT string_agg(value::text, ',') FROM usage_billing.alerts
 WHERE customer_id = '$c' AND meter = 'r_calls' AND kind = 'soft_limit'}),
			$first, "$name: one soft_limit alert, at the first total at or above the new threshold (about $point)");
	}
}

scenario('plan limit', 'r1', 'plan_r1', q{
SELECT usage_billing.set_plan_limit('plan_r1', 'r_calls', included => :lim, hard_cap => true,
                                    soft_threshold => :pt::numeric / :lim)});

scenario('customer override', 'r2', 0, q{
SELECT usage_billing.set_customer_limit('r2', 'r_calls', :lim, true)});

scenario('plan change', 'r3', 'low_r3', q{
SELECT usage_billing.create_plan('low_r3', 0);
SELECT usage_billing.set_plan_limit('low_r3', 'r_calls', included => :lim, hard_cap => true,
                                    soft_threshold => :pt::numeric / :lim);
SELECT usage_billing.upsert_customer('r3', 'low_r3')});

# suspended first (calls get PT403), then the override and the reactivation together
scenario('suspension, then an override', 'r4', 0, q{
SELECT usage_billing.set_customer_limit('r4', 'r_calls', :lim, true);
SELECT usage_billing.set_customer_status('r4', 'active')},
	q{SELECT usage_billing.set_customer_status('r4', 'suspended'); SELECT pg_sleep(0.5)});

# every aggregate equals its ledger, before and after folding every slot
my $mismatch = q{
SELECT count(*) FROM usage_billing.aggregate_totals a
 WHERE a.total IS DISTINCT FROM (SELECT sum(amount) FROM usage_billing.usage_events e
                                  WHERE e.customer_id = a.customer_id AND e.meter = a.meter
                                    AND e.period_start = a.period_start)
    OR a.event_count IS DISTINCT FROM (SELECT count(*) FROM usage_billing.usage_events e
                                        WHERE e.customer_id = a.customer_id AND e.meter = a.meter
                                          AND e.period_start = a.period_start)};
is($node->safe_psql('postgres', $mismatch), '0', 'every aggregate equals its ledger rows');
$node->safe_psql('postgres', 'SELECT usage_billing.fold_escrow_slots()');
is($node->safe_psql('postgres', 'SELECT count(*) FROM usage_billing.usage_aggregate_slots'),
	'0', 'folding leaves no slot');
is($node->safe_psql('postgres', $mismatch), '0', 'after folding, every aggregate still equals its ledger rows');
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.usage_aggregates WHERE slotted}),
	'0', 'no aggregate says it has slots');

$node->stop;
done_testing();
