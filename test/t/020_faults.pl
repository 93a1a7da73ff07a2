# 020_faults.pl - Stripe faults: 5xx, 429 (with and without Retry-After), timeouts,
# connection refused, answers lost after processing, closed connections.  After each
# fault clears, the mock's totals must equal the database's, nothing counted twice.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock();
my $node = ub_node('faults', $mock, "usage_billing.export_timeout = 1s\n");
ub_customers($node, 1, 30);
my $all = q{SELECT customer_id FROM usage_billing.customers};

# 500s: Stripe replays a saved 500 for the same Idempotency-Key, so the worker must
# change the key (not the identifier) after an error answer
ub_mock_post($mock, 'faults', { kind => '500', count => 12 });
ub_add_usage($node, $all, 'api_calls', 5);
ok(ub_export_and_wait($node, $mock, 30), '500s: in sync once they stop');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), '500s: totals equal');
ok(ub_mock_get($mock, 'stats')->{statuses}{500} >= 12, '500s were served');
like($node->safe_psql('postgres', q{SELECT string_agg(DISTINCT idempotency_key, ',')
  FROM usage_billing.export_outbox o WHERE o.attempts > 1 AND o.identifier <> o.idempotency_key}),
	qr/-k\d/, 'Idempotency-Key rotated after a 500, identifier kept');
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_attempts WHERE http_status = 500}),
	'12', 'each 500 recorded as an attempt');

# 429 without Retry-After: backoff
ub_mock_post($mock, 'faults', { kind => '429', count => 6 });
ub_add_usage($node, $all, 'api_calls', 3);
ok(ub_export_and_wait($node, $mock, 30), '429: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), '429: totals equal');

# 429 with Retry-After: 2 s are honoured
ub_mock_post($mock, 'faults', { kind => '429_retry_after', count => 1, retry_after => 2 });
ub_add_usage($node, q{'c1'}, 'api_calls', 1);
ok(ub_export_and_wait($node, $mock, 30), '429 with Retry-After: in sync');
my $gap = $node->safe_psql('postgres', q{
SELECT extract(epoch FROM b.attempted_at - a.attempted_at)
  FROM usage_billing.export_attempts a
  JOIN usage_billing.export_attempts b ON b.outbox_id = a.outbox_id AND b.attempt = a.attempt + 1
 WHERE a.http_status = 429 ORDER BY a.attempted_at DESC LIMIT 1});
# a lower bound on one clock (next_attempt_at is set 2 s after the 429 is recorded): load only adds
ok($gap ne '' && $gap >= 1.9, "Retry-After honoured (next attempt after $gap s)");
diag($node->safe_psql('postgres', q{SELECT o.customer_id, a.* FROM usage_billing.export_attempts a JOIN usage_billing.export_outbox o USING (outbox_id) WHERE a.outbox_id IN (SELECT outbox_id FROM usage_billing.export_attempts WHERE http_status = 429) ORDER BY attempted_at})) if $gap eq '' || $gap < 1.9;

# a retry stays scheduled across wake-ups that run no cycle: a procsignal (here
# pg_log_backend_memory_contexts) sets the worker's latch while a 3 s Retry-After runs
ub_mock_post($mock, 'faults', { kind => '429_retry_after', count => 1, retry_after => 3 });
ub_add_usage($node, q{'c2'}, 'api_calls', 1);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { $node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_attempts a
  JOIN usage_billing.export_outbox o USING (outbox_id) WHERE o.customer_id = 'c2' AND a.http_status = 429}) eq '1' }, 10),
	'429 with Retry-After 3 s received');
my $wpid = ub_worker_pid($node);
$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($wpid)");
ok(ub_wait_for(sub { ub_in_sync($node, $mock) }, 10), 'the retry still happened (no export_now)');

# timeouts: the mock hangs past export_timeout (1 s)
ub_mock_post($mock, 'faults', { kind => 'hang', count => 4, seconds => 3 });
ub_add_usage($node, $all, 'api_calls', 2);
ok(ub_export_and_wait($node, $mock, 40), 'timeouts: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'timeouts: totals equal');
ok($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_attempts
  WHERE http_status IS NULL AND error ILIKE '%timed out%'}) >= 4, 'timeouts recorded as attempts without answer');

# lost answers: the mock processes the event, then drops the connection
my $st = ub_mock_get($mock, 'stats');
ub_mock_post($mock, 'faults', { kind => 'drop_after', count => 8 });
ub_add_usage($node, $all, 'api_calls', 4);
ok(ub_export_and_wait($node, $mock, 30), 'lost answers: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'lost answers: totals equal, nothing counted twice');
my $st2 = ub_mock_get($mock, 'stats');
ok(($st2->{replays} - $st->{replays}) + ($st2->{duplicates} - $st->{duplicates}) >= 8,
	'lost answers were resent and deduplicated by the mock')
  or diag(explain([ $st, $st2 ]));

# closed connections without processing
ub_mock_post($mock, 'faults', { kind => 'close', count => 5 });
ub_add_usage($node, $all, 'api_calls', 1);
ok(ub_export_and_wait($node, $mock, 30), 'closed connections: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'closed connections: totals equal');

# malformed and oversized answers: a 1 MB error body (cut at 16 kB), broken JSON, a 200
# whose body is not JSON (the status decides)
ub_mock_post($mock, 'faults', { kind => $_, count => 2 }) for qw(huge_500 garbage_500 garbage_200);
ub_add_usage($node, $all, 'api_calls', 1);
ok(ub_export_and_wait($node, $mock, 30), 'malformed answers: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'malformed answers: totals equal');
is(ub_mock_get($mock, 'stats')->{faults_queued}, 0, 'malformed answers were served');
ok(ub_worker_pid($node) ne '', 'worker alive after malformed answers');

# connection refused: Stripe unreachable (a closed port), then back
my $dead = ub_start_mock();
my $dead_url = $dead->{url};
ub_stop_mock($dead);
$node->append_conf('postgresql.conf', "usage_billing.stripe_api_base = '$dead_url'\n");
$node->reload;
sleep(0.5);
ub_add_usage($node, $all, 'api_calls', 6);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { $node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_attempts
  WHERE http_status IS NULL AND error ILIKE '%connect%'}) >= 3 }, 20), 'connection refused recorded');
is($node->safe_psql('postgres', q{SELECT count(*) > 0 FROM usage_billing.export_status WHERE state = 'pending'}),
	't', 'export_status shows pending rows while Stripe is unreachable');
$node->append_conf('postgresql.conf', "usage_billing.stripe_api_base = '$mock->{url}'\n");
$node->reload;
ok(ub_export_and_wait($node, $mock, 30), 'connection refused: in sync once reachable');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'connection refused: totals equal');

# Stripe's own rate limit (the mock answers 429 past 10 requests a second) while the
# worker's ceiling is far higher: slowed down, nothing lost or doubled
ub_mock_post($mock, 'config', { rate_limit => 10 });
ub_add_usage($node, $all, 'api_calls', 1);
ok(ub_export_and_wait($node, $mock, 40), 'rate limited by Stripe: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'rate limited by Stripe: totals equal');
ok(ub_mock_get($mock, 'stats')->{statuses}{429} > 6, 'the mock did answer 429s');
ub_mock_post($mock, 'config', { rate_limit => 0 });

# everything at once, with more customers and a fractional carry
ub_customers($node, 31, 120);
ub_mock_post($mock, 'faults', { kind => $_->[0], count => $_->[1], seconds => 2, retry_after => 1 })
  for ([ '500', 5 ], [ 'drop_after', 5 ], [ '429', 3 ], [ 'hang', 3 ], [ 'close', 3 ], [ '429_retry_after', 2 ], [ 'drop_after', 5 ]);
ub_add_usage($node, $all, 'api_calls', 2.5);
ok(ub_export_and_wait($node, $mock, 60), 'mixed faults: in sync');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'mixed faults: totals equal');
is(ub_mock_get($mock, 'stats')->{faults_queued}, 0, 'all faults were served');
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_status WHERE state <> 'in_sync'}),
	'0', 'export_status: everything in sync');
is_deeply(ub_mock_totals($node, $mock), ub_recorded_totals($node),
	'mixed faults: Stripe holds what the test recorded');
my @mismatch = ub_identifier_mismatches($node, $mock);
is(scalar(@mismatch), 0, 'every identifier Stripe accepted is recorded as sent, and only those')
  or diag(join("\n", @mismatch));
is(ub_mock_get($mock, 'stats')->{violations}, 0, 'no request broke the spec')
  or diag(explain(ub_mock_get($mock, 'stats')->{violation_log}));

$node->stop;
done_testing();
