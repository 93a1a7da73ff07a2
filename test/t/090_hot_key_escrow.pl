# Escrow slots under load: 8 clients call increment_usage on ONE customer and meter, each call
# in its own transaction.
#  a. hot_key_slots = always, a hard cap of 3000 with a soft threshold at 0.8: a first phase
#     well below the threshold must leave part of the total in slots (so the rest of the test
#     runs with slots in play); then the clients run past the cap.  Exactly 3000 calls succeed,
#     the others get PT402, and the ledger, aggregate_totals, get_usage_summary and check_limit
#     all say 3000.  The alerts are exact: soft_limit once, at exactly 2400; no limit_reached (a
#     hard cap never lets the total pass included); one hard_cap_blocked, for 3001.
#  b. hot_key_slots = auto on a meter without a limit: after a few rounds in which each client
#     waits on the row (a holder keeps it updated), every client has a slot; then 8 x 500 calls
#     go through the slots.  The total is exactly the number of calls, and once the key is
#     idle the export worker folds its slots: the aggregate row alone holds it, no slot left.
#  c. in both: every total a call returns is at least the number of calls its client has
#     recorded so far and at most the final total.
use strict;
use warnings;
use IPC::Run;
use Time::HiRes qw(sleep time);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $clients = 8;
my $node = PostgreSQL::Test::Cluster->new('hot_key');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
usage_billing.escrow_fold_idle = 1
usage_billing.hot_key_slots = always
max_connections = 40
});
$node->start;

# the anchor a day ago puts the whole run inside one billing period, the current one
$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_meter('hot_calls', 'sum');
SELECT usage_billing.create_meter('hot_free', 'sum');
SELECT usage_billing.create_plan('hot_plan', 0);
SELECT usage_billing.set_plan_limit('hot_plan', 'hot_calls', included => 3000, soft_threshold => 0.8,
                                    hard_cap => true);
SELECT usage_billing.upsert_customer('hot', 'hot_plan', now() - interval '1 day');
});

my $dir = $node->basedir . '/hot_clients';
mkdir $dir or die "mkdir $dir: $!";

# One script of $calls autocommit calls: a success prints "ok <returned total>", a failure
# "err <SQLSTATE>" (the message goes to stderr), so stdout is the client's calls in order.
sub write_script
{
	my ($name, $meter, $calls) = @_;
	my $call = qq{SELECT 'ok ' || total FROM usage_billing.increment_usage('hot', '$meter', 1);
\\if :ERROR
\\echo err :SQLSTATE
\\endif
};
	open my $f, '>', "$dir/$name.sql" or die;
	print $f "\\set VERBOSITY sqlstate\n", $call x $calls;
	close $f;
	return "$dir/$name.sql";
}

# $clients psql sessions that stay connected across phases (their slots stay theirs)
sub start_clients
{
	my @c;
	for my $i (1 .. $clients)
	{
		my $c = { in => '', out => '', err => '' };
		$c->{h} = IPC::Run::start(
			[ 'psql', '-X', '-A', '-t', '-q', '-d', $node->connstr('postgres') . " application_name=client_$i" ],
			'<', \$c->{in}, '>', \$c->{out}, '2>', \$c->{err});
		push @c, $c;
	}
	return \@c;
}

# Every client runs the script at once; returns when all have printed the phase's marker.
# $when_blocked, if given, runs once every client has finished or waits on a lock.
sub run_phase
{
	my ($c, $script, $marker, $when_blocked) = @_;
	$_->{in} .= "\\i $script\n\\echo $marker\n" for @$c;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	for (;;)
	{
		$_->{h}->pump_nb for @$c;
		my $done = grep { $_->{out} =~ /^\Q$marker\E$/m } @$c;
		if ($when_blocked
			&& $done + $node->safe_psql('postgres', q{
SELECT count(*) FROM pg_stat_activity WHERE application_name ~ '^client_' AND wait_event_type = 'Lock'}) >= @$c)
		{
			$when_blocked->();
			$when_blocked = undef;
		}
		last if $done == @$c && !$when_blocked;
		die "phase $marker did not finish in time" if time() > $deadline;
		sleep(0.02);
	}
}

sub stop_clients
{
	my ($c) = @_;
	for (@$c)
	{
		$_->{in} .= "\\q\n";
		$_->{h}->finish;
	}
}

# A client's calls in order: [ [ 'ok', total ] | [ 'err', sqlstate ] ... ]
sub calls_of
{
	my ($c) = @_;
	return [ map { [ split / /, $_, 2 ] } grep { /^(ok|err) / } split /\n/, $c->{out} ];
}

# (c): the k-th success of a client returns at least k (its own k calls) and at most the final total
sub returned_total_problems
{
	my ($c, $final) = @_;
	my @bad;
	for my $i (0 .. $#$c)
	{
		my $k = 0;
		for my $call (@{ calls_of($c->[$i]) })
		{
			next unless $call->[0] eq 'ok';
			$k++;
			push @bad, "client " . ($i + 1) . " call $k returned $call->[1]"
			  if $call->[1] < $k || $call->[1] > $final;
		}
	}
	return join('; ', @bad[ 0 .. ($#bad < 9 ? $#bad : 9) ]);
}

my $key = q{customer_id = 'hot' AND meter = 'hot_calls'};

# --- a. always, hard cap ------------------------------------------------------------------------
my $c = start_clients();

# phase 1: 8 x 150 = 1200, half the soft threshold: no decision near, so slots take the usage
run_phase($c, write_script('a1', 'hot_calls', 150), 'a1 done');
is($node->safe_psql('postgres', "SELECT total || '/' || event_count FROM usage_billing.aggregate_totals WHERE $key"),
	'1200/1200', 'phase 1: all 1200 calls counted');
my $slots = $node->safe_psql('postgres', qq{
SELECT count(*) || ' slots, ' || coalesce(sum(event_count), 0) || ' events'
  FROM usage_billing.usage_aggregate_slots WHERE $key});
like($slots, qr/^[1-9]\d* slots, [1-9]\d* events$/, "phase 1: the slots hold part of the usage ($slots)");
# the row alone is short of the total: a reader of usage_aggregates would be wrong
cmp_ok($node->safe_psql('postgres', "SELECT total FROM usage_billing.usage_aggregates WHERE $key"),
	'<', 1200, 'phase 1: the aggregate row alone holds less than the total');
is($node->safe_psql('postgres', "SELECT slotted FROM usage_billing.usage_aggregates WHERE $key"),
	't', 'phase 1: the aggregate row is marked slotted');

# phase 2: 8 x 350 = 2800 more calls, 1800 of them fit under the cap
run_phase($c, write_script('a2', 'hot_calls', 350), 'a2 done');
stop_clients($c);

my ($ok, $refused, $other) = (0, 0, 0);
for my $cl (@$c)
{
	for my $call (@{ calls_of($cl) })
	{
		if ($call->[0] eq 'ok') { $ok++ }
		elsif ($call->[1] eq 'PT402') { $refused++ }
		else { $other++ }
	}
}
is("$ok/$refused/$other", '3000/1000/0', 'of 4000 calls exactly 3000 succeed and 1000 get PT402');
is(join('', grep { !/PT402/ } map { split /\n/, $_->{err} } @$c), '', 'no error other than PT402');
is(returned_total_problems($c, 3000), '', 'every returned total is within [own calls so far, 3000]');

is($node->safe_psql('postgres', "SELECT count(*) || '/' || sum(amount) FROM usage_billing.usage_events WHERE $key"),
	'3000/3000', 'the ledger holds exactly the 3000 successes');
is($node->safe_psql('postgres', "SELECT total || '/' || event_count FROM usage_billing.aggregate_totals WHERE $key"),
	'3000/3000', 'aggregate_totals: total and event_count 3000');
is($node->safe_psql('postgres', q{
SELECT total || '/' || event_count FROM usage_billing.get_usage_summary('hot') WHERE meter = 'hot_calls'}),
	'3000/3000', 'get_usage_summary says 3000');
is($node->safe_psql('postgres', q{
SELECT allowed || '/' || current || '/' || remaining FROM usage_billing.check_limit('hot', 'hot_calls')}),
	'false/3000/0', 'check_limit refuses one more');

# alerts: the soft threshold (2400) crossed once on the exact total; limit_reached needs a
# total above included, which the cap never allows; the refusals queue one hard_cap_blocked
is($node->safe_psql('postgres', qq{
SELECT string_agg(kind || '=' || value || '/' || included, ',' ORDER BY kind) FROM usage_billing.alert_log WHERE $key}),
	'soft_limit=2400/3000', 'alert_log: one soft_limit, at exactly 2400, and no limit_reached');
is($node->safe_psql('postgres', qq{SELECT count(*) FROM usage_billing.alerts WHERE $key AND kind = 'hard_cap_blocked'}),
	'1', 'one hard_cap_blocked alert for 1000 refusals');
$node->safe_psql('postgres', 'SELECT usage_billing.flush_alerts()');
is($node->safe_psql('postgres', qq{
SELECT string_agg(kind || '=' || value || '/' || included, ',' ORDER BY kind) FROM usage_billing.alert_log WHERE $key}),
	'hard_cap_blocked=3001/3000,soft_limit=2400/3000', 'flushed: hard_cap_blocked for the exact attempted total 3001');

# folding moves what the slots still hold into the row
$node->safe_psql('postgres', q{SELECT usage_billing.fold_escrow_slots('hot')});
is($node->safe_psql('postgres', qq{
SELECT a.total || '/' || a.event_count || '/' || a.slotted
       || '/' || (SELECT count(*) FROM usage_billing.usage_aggregate_slots s WHERE s.customer_id = 'hot' AND s.meter = 'hot_calls')
  FROM usage_billing.usage_aggregates a WHERE $key}),
	'3000/3000/false/0', 'after fold_escrow_slots the row alone holds 3000 and no slot is left');

# --- b. auto, no limit --------------------------------------------------------------------------
$node->safe_psql('postgres', q{ALTER SYSTEM SET usage_billing.hot_key_slots = 'auto'});
$node->reload;
# new backends fork from the postmaster: once one sees auto, the clients will too
$node->poll_query_until('postgres', 'SHOW usage_billing.hot_key_slots', 'auto')
  or die 'hot_key_slots did not become auto';
$key = q{customer_id = 'hot' AND meter = 'hot_free'};
# the aggregate row exists before the rounds below lock it
$node->safe_psql('postgres', q{SELECT usage_billing.increment_usage('hot', 'hot_free', 1)});
$c = start_clients();

# auto slots a backend once it found the row being updated 3 times.  On one core 8 clients
# hardly ever find that, so make them: a holder updates the row and keeps it, every client
# makes one call (which finds the row busy and waits), the holder rolls back.  Three such
# rounds give every client its slot, whatever the scheduling.
my $holder = $node->background_psql('postgres');
my $one_call = write_script('b_round', 'hot_free', 1);
my $slot_count = qq{SELECT count(*) FROM usage_billing.usage_aggregate_slots WHERE $key};
my $rounds = 0;
while ($rounds < 3 && $node->safe_psql('postgres', $slot_count) < $clients)
{
	$rounds++;
	$holder->query_safe("BEGIN; UPDATE usage_billing.usage_aggregates SET updated_at = updated_at WHERE $key;");
	run_phase($c, $one_call, "round $rounds", sub { $holder->query_safe('ROLLBACK') });
}
$holder->quit;
is($node->safe_psql('postgres', $slot_count), $clients,
	"auto: every client has a slot after $rounds rounds of waiting on the row");

# the load: 8 x 500 calls, through the slots
run_phase($c, write_script('b', 'hot_free', 500), 'b done');
my $b_slots = $node->safe_psql('postgres', qq{
SELECT count(*) || ' slots, ' || coalesce(sum(event_count), 0) || ' events'
  FROM usage_billing.usage_aggregate_slots WHERE $key});
like($b_slots, qr/^$clients slots, [1-9]\d* events$/, "auto: the slots took usage ($b_slots)");
stop_clients($c);

my $calls = 1 + $clients * ($rounds + 500);
$ok = grep { $_->[0] eq 'ok' } map { @{ calls_of($_) } } @$c;
is($ok + 1, $calls, "all $calls unlimited calls succeeded");
is(join('', map { $_->{err} } @$c), '', 'no error');
is(returned_total_problems($c, $calls), '', "every returned total is within [own calls so far, $calls]");
is($node->safe_psql('postgres', qq{
SELECT a.total || '/' || a.event_count || ' vs ledger ' || e.n || '/' || e.s
  FROM usage_billing.aggregate_totals a,
       (SELECT count(*) n, sum(amount) s FROM usage_billing.usage_events WHERE $key) e
 WHERE a.customer_id = 'hot' AND a.meter = 'hot_free'}),
	"$calls/$calls vs ledger $calls/$calls", "aggregate_totals equals the ledger: $calls");

# the worker folds the slots of keys nobody wrote for escrow_fold_idle (1 s here) in its next
# cycle (export_interval is 0: export_now() runs one; no Stripe key is needed for the fold)
sleep(1.5);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
my $left;
for (my $deadline = time() + 30; time() < $deadline; sleep(0.2))
{
	$left = $node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.usage_aggregate_slots});
	last if $left eq '0';
}
is($left, '0', 'the worker folded the idle slots');
is($node->safe_psql('postgres', qq{
SELECT a.total || '/' || a.event_count || '/' || a.slotted || ' vs ledger ' || e.n || '/' || e.s
  FROM usage_billing.usage_aggregates a,
       (SELECT count(*) n, sum(amount) s FROM usage_billing.usage_events WHERE $key) e
 WHERE a.customer_id = 'hot' AND a.meter = 'hot_free'}),
	"$calls/$calls/false vs ledger $calls/$calls", 'after the fold the aggregate row alone equals the ledger');

$node->stop;
done_testing();
