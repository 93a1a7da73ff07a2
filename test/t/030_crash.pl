# 030_crash.pl - the worker killed with SIGKILL mid-request, the server stopped with
# "pg_ctl stop -m immediate" mid-batch, SIGTERM mid-request, an error inside a cycle:
# afterwards the mock's totals equal the database's, nothing counted twice.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock();
my $node = ub_node('crash', $mock, "restart_after_crash = on\nusage_billing.export_timeout = 20s\n");
ub_customers($node, 1, 40);
my $all = q{SELECT customer_id FROM usage_billing.customers};

# a psql that tolerates the server being down or in recovery
sub try_psql
{
	my ($sql) = @_;
	my ($ret, $out) = (1, '');
	eval { $ret = $node->psql('postgres', $sql, stdout => \$out, on_error_die => 0); };
	return $ret == 0 ? $out : undef;
}

# waits until the mock has seen n more meter event requests
sub wait_requests
{
	my ($base, $n) = @_;
	return ub_wait_for(sub { ub_mock_get($mock, 'stats')->{requests} >= $base + $n }, 20);
}

ok(ub_export_and_wait($node, $mock, 20), 'nothing to export at first');

# 1. SIGKILL while Stripe holds the requests: processed ("slow") and not ("hang")
my $base = ub_mock_get($mock, 'stats')->{requests};
ub_mock_post($mock, 'faults', { kind => 'slow', count => 4, seconds => 8 });
ub_mock_post($mock, 'faults', { kind => 'hang', count => 4, seconds => 8 });
ub_add_usage($node, $all, 'api_calls', 3);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(wait_requests($base, 8), 'requests in flight');
my $pid = ub_worker_pid($node);
ok($pid, "worker pid $pid");
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'pending'}) > 0,
	1, 'outbox rows written before sending');
kill 'KILL', $pid;
ok(ub_wait_for(sub { my $p = try_psql(q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'usage_billing export worker'});
	defined $p && $p ne '' && $p ne $pid }, 40), 'worker back after the crash restart');
ok(ub_export_and_wait($node, $mock, 40), 'after SIGKILL: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'after SIGKILL: totals equal');
ok(ub_mock_get($mock, 'stats')->{duplicates} + ub_mock_get($mock, 'stats')->{replays} >= 1,
	'events Stripe processed before the kill were resent and deduplicated');

# 2. immediate shutdown mid-batch, then start
$base = ub_mock_get($mock, 'stats')->{requests};
ub_mock_post($mock, 'faults', { kind => 'slow', count => 6, seconds => 6 });
ub_mock_post($mock, 'faults', { kind => 'drop_after', count => 2 });
ub_add_usage($node, $all, 'api_calls', 2.5);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(wait_requests($base, 6), 'batch in flight');
$node->stop('immediate');
$node->start;
ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 30), 'worker running after restart');
ok(ub_export_and_wait($node, $mock, 40), 'after immediate stop: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'after immediate stop: totals equal');

# 3. SIGTERM mid-request: exits promptly (no waiting for the 20 s timeout), restarts, resends
$base = ub_mock_get($mock, 'stats')->{requests};
ub_mock_post($mock, 'faults', { kind => 'hang', count => 2, seconds => 15 });
ub_add_usage($node, q{'c1', 'c2'}, 'api_calls', 1);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(wait_requests($base, 2), 'requests hanging');
$pid = ub_worker_pid($node);
my $t0 = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
# the hung request lasts 15 s: a worker that waited for it would still be there after 10 s
ok(ub_wait_for(sub { ub_worker_pid($node) ne $pid }, 10), 'worker left while a request hung (SIGTERM obeyed)');
note(sprintf('the worker left %.1f s after SIGTERM', time() - $t0));
ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 30), 'worker restarted (bgw_restart_time)');
ok(ub_export_and_wait($node, $mock, 30), 'after SIGTERM: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'after SIGTERM: totals equal');

# 4. an error inside a cycle is reported; the worker carries on without restarting
$pid = ub_worker_pid($node);
$node->safe_psql('postgres', q{ALTER FUNCTION usage_billing.export_plan(integer) RENAME TO export_plan_away});
ub_add_usage($node, q{'c3'}, 'api_calls', 1);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { slurp_file($node->logfile) =~ /function usage_billing.export_plan\(integer\) does not exist/ }, 15),
	'the cycle error is in the log');
$node->safe_psql('postgres', q{ALTER FUNCTION usage_billing.export_plan_away(integer) RENAME TO export_plan});
ok(ub_export_and_wait($node, $mock, 30), 'next cycle exports');
is(ub_worker_pid($node), $pid, 'same worker process: no restart for an error in one cycle');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'after a failed cycle: totals equal');

is_deeply(ub_mock_totals($node, $mock), ub_recorded_totals($node),
	'after the crashes: Stripe holds what the test recorded');
my @mismatch = ub_identifier_mismatches($node, $mock);
is(scalar(@mismatch), 0, 'every identifier Stripe accepted is recorded as sent, and only those')
  or diag(join("\n", @mismatch));
is(ub_mock_get($mock, 'stats')->{violations}, 0, 'no request broke the spec')
  or diag(explain(ub_mock_get($mock, 'stats')->{violation_log}));

$node->stop;
done_testing();
