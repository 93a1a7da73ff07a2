# Crash under load: 8 clients record usage with unique idempotency keys (half of them through
# increment_usage_batch, 3 events per call, the others 5 calls per connection) as a role
# holding usage_billing_writer only, while
# the server is stopped with "pg_ctl stop -m immediate", with every key's usage going through
# the clients' escrow slots (hot_key_slots = always).  After the restart every acknowledged
# (committed) event is in the ledger exactly once, nothing was recorded that was not attempted,
# the aggregates equal the ledger, and retrying every attempted key makes the ledger equal to
# the attempts: exactly once, with idempotent retries.
use strict;
use warnings;
use POSIX ();
use IPC::Run;
use Time::HiRes qw(sleep time);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $clients = 8;
my $node = PostgreSQL::Test::Cluster->new('crash');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
max_connections = 40
fsync = on
synchronous_commit = on
# every call after a key's first goes through its client's escrow slot: the crash hits slots
usage_billing.hot_key_slots = always
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'crash_writer') THEN
    CREATE ROLE crash_writer LOGIN;
  END IF;
END $$;
GRANT usage_billing_writer TO crash_writer;
SELECT usage_billing.create_meter('hits', 'sum');
SELECT usage_billing.create_plan('crash_plan', 0);
SELECT usage_billing.set_plan_limit('crash_plan', 'hits', included => 1000000000, overage_price => 0.001);
SELECT usage_billing.upsert_customer('crash_a', 'crash_plan');
SELECT usage_billing.upsert_customer('crash_b', 'crash_plan');
});

my $dir = $node->basedir . '/crash_clients';
mkdir $dir or die "mkdir $dir: $!";
my $connstr = $node->connstr('postgres') . ' user=crash_writer';

# one client: attempted keys are written before the call, acknowledged ones after it returned
sub client
{
	my ($c) = @_;
	open my $att, '>>', "$dir/attempted.$c" or die;
	open my $ack, '>>', "$dir/acked.$c" or die;
	$att->autoflush(1);
	$ack->autoflush(1);
	my $customer = $c % 2 ? 'crash_a' : 'crash_b';
	my $n = 0;
	while (!-e "$dir/stop")
	{
		$n++;
		my (@keys, $sql, %acked);
		if ($c % 4 < 2)
		{
			# five calls on one connection, each its own transaction: after the first, the
			# backend's escrow slot takes them
			@keys = map { "c$c-$n-s$_" } 1 .. 5;
			$sql = join "\n",
			  map { "SELECT 'ACK $_' FROM usage_billing.increment_usage('$customer', 'hits', 1, '$_');" } @keys;
		}
		else
		{
			@keys = map { "c$c-$n-$_" } 1 .. 3;
			my $events = join ', ',
			  map { qq({"customer_id": "$customer", "meter": "hits", "amount": 1, "idempotency_key": "$_"}) } @keys;
			# one ACK line per key of the batch, printed once it committed
			$sql = "SELECT 'ACK ' || k FROM usage_billing.increment_usage_batch('[$events]') b, unnest(ARRAY["
			  . join(', ', map { "'$_'" } @keys) . "]) k;";
		}
		print $att "$_\n" for @keys;
		my ($out, $err) = ('', '');
		# psql prints a statement's row once the server said the transaction is over (committed)
		# When the server is gone, psql can exit before reading its input: IPC::Run then dies
		# with EPIPE (the TAP modules ignore SIGPIPE).  That is a failed call like any other.
		eval {
			IPC::Run::run([ 'psql', '-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', $connstr, '-f', '-' ],
				'<', \$sql, '>', \$out, '2>', \$err);
			1;
		} or $err .= "client: $@";
		%acked = map { /^ACK (\S+)$/ ? ($1 => 1) : () } split /\n/, $out;
		print $ack "$_\n" for grep { $acked{$_} } @keys;
		sleep 0.05 if $err ne '';
	}
	POSIX::_exit(0);
}

my @pids;
for my $c (1 .. $clients)
{
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		# a child must never run the test's END blocks: they would stop the node under the
		# parent's feet (PostgreSQL::Test::Cluster tears every node down at exit)
		eval { client($c); 1 } or print STDERR "client $c: $@";
		POSIX::_exit(0);
	}
	push @pids, $pid;
}

sub read_keys
{
	my ($kind) = @_;
	my %k;
	for my $c (1 .. $clients)
	{
		next unless open my $f, '<', "$dir/$kind.$c";
		while (<$f>) { chomp; $k{$_} = 1 if length; }
	}
	return \%k;
}

# let them run for a while (at least 300 acknowledged events, at most 20 s), then crash
my $t0 = time;
while (time - $t0 < 20)
{
	sleep 0.5;
	last if time - $t0 > 4 && scalar(keys %{ read_keys('acked') }) >= 300;
}
$node->stop('immediate');
my $acked_at_crash = scalar(keys %{ read_keys('acked') });
sleep 0.5;
open my $stop, '>', "$dir/stop" or die;
close $stop;
waitpid($_, 0) for @pids;

$node->start;
my $acked = read_keys('acked');
my $attempted = read_keys('attempted');
my %ledger = map { $_ => 1 } split /\n/, $node->safe_psql('postgres',
	"SELECT idempotency_key FROM usage_billing.usage_events WHERE customer_id IN ('crash_a', 'crash_b')");
note(sprintf('attempted %d, acknowledged %d (%d when the server stopped), in the ledger %d',
		scalar(keys %$attempted), scalar(keys %$acked), $acked_at_crash, scalar(keys %ledger)));

cmp_ok(scalar(keys %$acked), '>=', 100, 'the clients got acknowledgements before the crash');
my @lost = grep { !$ledger{$_} } keys %$acked;
is(scalar(@lost), 0, 'every acknowledged event survived the crash') or diag("lost: @lost[0..9]");
my @phantom = grep { !$attempted->{$_} } keys %ledger;
is(scalar(@phantom), 0, 'nothing in the ledger that no client attempted');
is($node->safe_psql('postgres', q{
SELECT count(*) FROM (SELECT customer_id, idempotency_key FROM usage_billing.usage_events
                       WHERE customer_id IN ('crash_a', 'crash_b') GROUP BY 1, 2 HAVING count(*) > 1) d}),
	'0', 'no event is in the ledger twice');
cmp_ok($node->safe_psql('postgres', q{SELECT coalesce(sum(event_count), 0) FROM usage_billing.usage_aggregate_slots}),
	'>', 0, 'escrow slots hold part of the totals after the crash');
# aggregate_totals: a key's total includes its escrow slots (which survive the crash like rows)
my $consistency_q = q{
SELECT string_agg(format('%s: ledger %s, total %s, event_count %s', e.customer_id, e.n, a.total, a.event_count), '; '
                  ORDER BY e.customer_id)
  FROM (SELECT customer_id, count(*) AS n, sum(amount) AS s FROM usage_billing.usage_events
         WHERE customer_id IN ('crash_a', 'crash_b') GROUP BY 1) e
  JOIN (SELECT customer_id, sum(total) AS total, sum(event_count) AS event_count FROM usage_billing.aggregate_totals
         WHERE customer_id IN ('crash_a', 'crash_b') GROUP BY 1) a USING (customer_id)
 WHERE e.n = a.event_count AND e.s = a.total};
my $consistent = $node->safe_psql('postgres', $consistency_q);
like($consistent, qr/^crash_a: .*; crash_b: /, "aggregates equal the ledger after the crash ($consistent)");

# a client retries whatever it did not see acknowledged: the ledger becomes exactly the attempts
my @retry = sort grep { !$acked->{$_} } keys %$attempted;
my ($dups, $new) = (0, 0);
for my $key (@retry)
{
	my ($c) = $key =~ /^c(\d+)-/;
	my $customer = $c % 2 ? 'crash_a' : 'crash_b';
	my $dup = $node->safe_psql('postgres',
		"SELECT duplicate FROM usage_billing.increment_usage('$customer', 'hits', 1, '$key')");
	$dup eq 't' ? $dups++ : $new++;
	is($dup, $ledger{$key} ? 't' : 'f', "retry of $key: duplicate exactly when it had committed")
	  if ($ledger{$key} ? $dup ne 't' : $dup ne 'f');
}
note("retried $dups committed-but-unacknowledged and $new lost-in-flight keys");
is($node->safe_psql('postgres', q{
SELECT sum(total) FROM usage_billing.aggregate_totals WHERE customer_id IN ('crash_a', 'crash_b')}),
	scalar(keys %$attempted), 'after the retries the totals count every attempted event exactly once');
like($node->safe_psql('postgres', $consistency_q), qr/^crash_a: .*; crash_b: /,
	'aggregates still equal the ledger after the retries');

$node->stop;
done_testing();
