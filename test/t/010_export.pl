# 010_export.pl - basic export: totals, deltas, max meters, export_now, failed rows.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock();
my $node = ub_node('export', $mock);

# the worker shows with its own backend type
ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'worker visible in pg_stat_activity');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity
  WHERE backend_type = 'usage_billing export worker' AND datname = 'postgres'}),
	'1', 'one worker, connected to usage_billing.database');

ub_customers($node, 1, 20);
$node->safe_psql('postgres', q{SELECT usage_billing.upsert_customer('nostripe', 'basic')});
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers}, 'api_calls', 10.7);
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers}, 'internal', 5);
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers}, 'storage', 50, 1);

# export_interval is 3600: only export_now() can make this happen quickly
ok(ub_export_and_wait($node, $mock, 20), 'export_now woke the worker and Stripe caught up');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node),
	'mock totals equal floor(total) per Stripe customer and event name');
is(ub_mock_get($mock, 'totals')->{'cus_1|api_calls'}, 10, 'fraction carried: 10.7 is sent as 10');
ok(!grep({ /nostripe|internal/ } keys %{ ub_mock_get($mock, 'totals') }),
	'customers without Stripe id and meters without event name are not sent');
my $last = ub_mock_get($mock, 'last');
is($last->{'cus_3|storage_gb'}, 50, 'max meter: current value sent');

# incremental: only deltas, and the carried fraction crosses a whole number
ub_add_usage($node, q{'c1', 'c2'}, 'api_calls', 0.5);
ub_add_usage($node, q{'c3'}, 'api_calls', 100);
ok(ub_export_and_wait($node, $mock, 20), 'incremental usage exported');
my %n;
$n{ $_->{customer} }++ for grep { $_->{event_name} eq 'api_calls' } @{ ub_mock_get($mock, 'events') };
is_deeply([ @n{qw(cus_1 cus_2 cus_3 cus_4)} ], [ 2, 2, 2, 1 ], 'one new event per changed customer, none for others');
my @c1 = map { $_->{value} } grep { $_->{customer} eq 'cus_1' && $_->{event_name} eq 'api_calls' }
  @{ ub_mock_get($mock, 'events') };
is_deeply(\@c1, [ 10, 1 ], 'c1 got 10 then the delta 1 (11.2 -> 11)');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'totals equal after deltas');

# max meter: a new current value (for formula last)
ub_add_usage($node, q{'c3'}, 'storage', 70, 1);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { (ub_mock_get($mock, 'last')->{'cus_3|storage_gb'} // 0) == 70 }, 20),
	'max meter: new value sent');
my @ts = map { $_->{timestamp} } grep { $_->{customer} eq 'cus_3' && $_->{event_name} eq 'storage_gb' }
  @{ ub_mock_get($mock, 'events') };
ok(@ts == 2 && $ts[1] > $ts[0], 'formula-last events have increasing timestamps');

# last meter: a lower value is sent too (Stripe meter with formula last)
$node->safe_psql('postgres', q{SELECT usage_billing.create_meter('seats', 'last', stripe_event_name => 'seats')});
ub_add_usage($node, q{'c5'}, 'seats', 9, 1);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { (ub_mock_get($mock, 'last')->{'cus_5|seats'} // 0) == 9 }, 20), 'last meter: 9 sent');
ub_add_usage($node, q{'c5'}, 'seats', 4.9, 1);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { (ub_mock_get($mock, 'last')->{'cus_5|seats'} // 0) == 4 }, 20), 'last meter: lowered to 4 (floor of 4.9)');
is($node->safe_psql('postgres', q{SELECT exported, state FROM usage_billing.export_status
  WHERE customer_id = 'c5' AND meter = 'seats'}), '4|in_sync', 'last meter in sync');

# status view: in sync rows
is($node->safe_psql('postgres', q{SELECT total, exported, pending, state, attempts >= 1, last_http_status
  FROM usage_billing.export_status WHERE customer_id = 'c1' AND meter = 'api_calls'}),
	'11.2|11|0|in_sync|t|200', 'export_status of an exported row');
like($node->safe_psql('postgres', q{SELECT last_request_id FROM usage_billing.export_status
  WHERE customer_id = 'c1' AND meter = 'api_calls'}), qr/^req_/, 'Request-Id kept');

# a customer Stripe refuses (400): failed with Stripe's message, others unaffected
$node->safe_psql('postgres', q{SELECT usage_billing.upsert_customer('bad', 'basic', NULL, 'cus_bad_1')});
ub_add_usage($node, q{'bad'}, 'api_calls', 7);
ub_add_usage($node, q{'c4', 'c5'}, 'api_calls', 3);
ok(ub_export_and_wait($node, $mock, 20), 'others exported despite the refused customer');
ok(ub_wait_for(sub { $node->safe_psql('postgres',
	q{SELECT state FROM usage_billing.export_status WHERE customer_id = 'bad'}) eq 'failed' }, 10),
	'refused row is failed');
my $bad = $node->safe_psql('postgres', q{SELECT last_http_status, failed, pending, last_error
  FROM usage_billing.export_status WHERE customer_id = 'bad'});
like($bad, qr/^400\|7\|7\|.*No such customer: 'cus_bad_1'/, 'status shows HTTP 400, amounts and Stripe\'s message');
is($node->safe_psql('postgres', q{SELECT attempts FROM usage_billing.export_outbox WHERE customer_id = 'bad'}),
	'1', 'a non-retryable 4xx is not retried');

# fix the customer id and retry the failed rows
$node->safe_psql('postgres', q{SELECT usage_billing.upsert_customer('bad', NULL, NULL, 'cus_fixed')});
is($node->safe_psql('postgres', q{SELECT usage_billing.retry_failed_exports()}), '1', 'one failed row discarded');
ok(ub_export_and_wait($node, $mock, 20), 'retried after fixing the customer id');
is(ub_mock_get($mock, 'totals')->{'cus_fixed|api_calls'}, 7, 'fixed customer holds its total');

# a lowered sum total is never sent as a negative event: the recent event is cancelled
# and the difference sent (export corrections; 045_export_corrections.pl covers the rest)
ub_add_usage($node, q{'c6'}, 'api_calls', 2, 1);
ok(ub_export_and_wait($node, $mock, 20), 'lowered total: Stripe brought down to it');
is($node->safe_psql('postgres', q{SELECT state, needs_manual_credit FROM usage_billing.export_status
  WHERE customer_id = 'c6' AND meter = 'api_calls'}), 'in_sync|0', 'lowered total in sync, no manual credit');
is(ub_mock_get($mock, 'totals')->{'cus_6|api_calls'}, 2, 'Stripe holds the lowered total');
ok(!grep({ $_->{value} < 0 } @{ ub_mock_get($mock, 'events') }), 'no negative value sent');
# usage back up (e.g. a correction undone): the difference is sent
ub_add_usage($node, q{'c6'}, 'api_calls', 10, 1);
ok(ub_export_and_wait($node, $mock, 20), 'back in sync');

# a previous period inside Stripe's window lands at its last second; a 3-month-old one is not sent
my $prev_end = $node->safe_psql('postgres', q{SELECT extract(epoch FROM period_start)::bigint - 1
  FROM usage_billing.period_bounds(date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                                   '1 month', now()) });
ub_add_usage($node, q{'c7'}, 'api_calls', 4, 0, q{now() - interval '1 month'});
ub_add_usage($node, q{'c8'}, 'api_calls', 4, 0, q{now() - interval '3 months'});
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { grep { $_->{customer} eq 'cus_7' && $_->{value} == 4 } @{ ub_mock_get($mock, 'events') } }, 20),
	'previous period exported');
my ($ev7) = grep { $_->{customer} eq 'cus_7' && $_->{value} == 4 } @{ ub_mock_get($mock, 'events') };
if ($node->safe_psql('postgres', q{SELECT now() - date_trunc('month', now()) < interval '34 days'}) eq 't')
{
	is($ev7->{timestamp}, $prev_end, 'previous period event stamped at its last second');
}
like($node->safe_psql('postgres', q{SELECT state || ' ' || last_error FROM usage_billing.export_status
  WHERE customer_id = 'c8' AND meter = 'api_calls'}), qr/^failed .*35 days/, 'too old period reported, not sent');

# the key never shows in the status view
unlike($node->safe_psql('postgres', q{SELECT string_agg(s::text, ' ') FROM usage_billing.export_status s}),
	qr/\Q$UB_KEY\E/, 'no key in export_status');

# worker counters and pruning
my ($pre, $wpid, $sent) = split /\|/, $node->safe_psql('postgres',
	q{SELECT preloaded, pid, events_sent FROM usage_billing.export_worker_info()});
is($pre, 't', 'export_worker_info: preloaded');
is($wpid, ub_worker_pid($node), 'export_worker_info: pid of the worker');
is($sent, scalar(@{ ub_mock_get($mock, 'events') }), 'export_worker_info: events sent = events the mock accepted');
my $sent_rows = $node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'sent'});
is($node->safe_psql('postgres', q{SELECT usage_billing.export_prune('0 s')}), $sent_rows + 1,
	'export_prune deletes sent and discarded rows');
ub_add_usage($node, q{'c1'}, 'api_calls', 5);
ok(ub_export_and_wait($node, $mock, 20), 'exports continue after pruning');
is_deeply(ub_mock_totals($node, $mock), ub_expected_totals($node), 'totals equal after pruning');
my @c1e = grep { $_->{customer} eq 'cus_1' && $_->{event_name} eq 'api_calls' } @{ ub_mock_get($mock, 'events') };
is($c1e[-1]{identifier} =~ /-3$/ ? 1 : 0, 1, 'identifiers keep counting after pruning (third event of c1 is -3)');

# DROP EXTENSION under the running worker, then CREATE again: the new installation's
# identifiers differ (epoch), so Stripe does not drop its events as duplicates
my $before = ub_mock_get($mock, 'totals')->{'cus_1|api_calls'};
$node->safe_psql('postgres', 'DROP EXTENSION usage_billing CASCADE');
$node->safe_psql('postgres', 'SELECT 1');
sleep(1);
$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_plan('basic');
SELECT usage_billing.create_meter('api_calls', 'sum', stripe_event_name => 'api_calls');});
ub_customers($node, 1, 1);
ub_add_usage($node, q{'c1'}, 'api_calls', 7);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { (ub_mock_get($mock, 'totals')->{'cus_1|api_calls'} // 0) == $before + 7 }, 20),
	'after DROP/CREATE EXTENSION the new event is counted, not dropped as a duplicate');
is(ub_worker_pid($node), $wpid, 'the worker lived through DROP/CREATE EXTENSION');

$node->stop;
done_testing();
