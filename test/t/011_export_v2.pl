# 011_export_v2.pl - the basics of 010_export.pl over Stripe's v2 meter event stream
# (usage_billing.stripe_api = 'v2'): totals, deltas, max and last meters, export_status,
# lowered totals (cancels stay on v1), previous periods, worker counters; and switching
# between v1 and v2 with a reload while events are pending.  Stripe's totals are compared
# with what the test recorded (ub_add_usage's book).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our ($UB_KEY, %UB_BOOK);
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock(v2 => 1);
my $node = ub_node('export_v2', $mock, ub_v2_conf($mock));

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub events { return ub_mock_get($mock, 'events'); }

ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'worker running');

ub_customers($node, 1, 20);
sql(q{SELECT usage_billing.upsert_customer('nostripe', 'basic')});
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers}, 'api_calls', 10.7);
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers}, 'internal', 5);
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers}, 'storage', 50, 1);

ok(ub_export_and_wait($node, $mock, 20), 'export_now woke the worker and Stripe caught up');
is_deeply(ub_mock_totals($node, $mock), ub_recorded_totals($node), 'Stripe holds what the test recorded');
is(ub_mock_get($mock, 'totals')->{'cus_1|api_calls'}, 10, 'fraction carried: 10.7 is sent as 10');
ok(!grep({ /nostripe|internal/ } keys %{ ub_mock_get($mock, 'totals') }),
	'customers without Stripe id and meters without event name are not sent');
is(ub_mock_get($mock, 'last')->{'cus_3|storage_gb'}, 50, 'max meter: current value sent');
my $v = ub_mock_get($mock, 'v2');
is($v->{events}, 40, '40 events through the stream');
is(ub_mock_get($mock, 'stats')->{requests}, $v->{requests}, 'none through v1');

# incremental: only deltas
ub_add_usage($node, q{'c1', 'c2'}, 'api_calls', 0.5);
ub_add_usage($node, q{'c3'}, 'api_calls', 100);
ok(ub_export_and_wait($node, $mock, 20), 'incremental usage exported');
my %n;
$n{ $_->{customer} }++ for grep { $_->{event_name} eq 'api_calls' } @{ events() };
is_deeply([ @n{qw(cus_1 cus_2 cus_3 cus_4)} ], [ 2, 2, 2, 1 ], 'one new event per changed customer, none for others');
is_deeply([ map { $_->{value} } grep { $_->{customer} eq 'cus_1' && $_->{event_name} eq 'api_calls' } @{ events() } ],
	[ 10, 1 ], 'c1 got 10 then the delta 1 (11.2 -> 11)');

# max and last meters
ub_add_usage($node, q{'c3'}, 'storage', 70, 1);
sql('SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { (ub_mock_get($mock, 'last')->{'cus_3|storage_gb'} // 0) == 70 }, 20), 'max meter: new value sent');
my @ts = map { $_->{timestamp} } grep { $_->{customer} eq 'cus_3' && $_->{event_name} eq 'storage_gb' } @{ events() };
ok(@ts == 2 && $ts[1] > $ts[0], 'formula-last events have increasing timestamps');
sql(q{SELECT usage_billing.create_meter('seats', 'last', stripe_event_name => 'seats')});
ub_add_usage($node, q{'c5'}, 'seats', 9, 1);
sql('SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { (ub_mock_get($mock, 'last')->{'cus_5|seats'} // 0) == 9 }, 20), 'last meter: 9 sent');
ub_add_usage($node, q{'c5'}, 'seats', 4.9, 1);
sql('SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { (ub_mock_get($mock, 'last')->{'cus_5|seats'} // 0) == 4 }, 20), 'last meter: lowered to 4');

# export_status of an exported row: HTTP 200 and the Request-Id of the stream request
is(sql(q{SELECT total, exported, pending, state, last_http_status
  FROM usage_billing.export_status WHERE customer_id = 'c1' AND meter = 'api_calls'}),
	'11.2|11|0|in_sync|200', 'export_status of an exported row');
like(sql(q{SELECT last_request_id FROM usage_billing.export_status
  WHERE customer_id = 'c1' AND meter = 'api_calls'}), qr/^req_/, 'Request-Id kept');

# a lowered sum total: the recent event is cancelled (v1 adjustments), the difference sent
ub_add_usage($node, q{'c6'}, 'api_calls', 2, 1);
ok(ub_export_and_wait($node, $mock, 20), 'lowered total: Stripe brought down to it');
is(ub_mock_get($mock, 'totals')->{'cus_6|api_calls'}, 2, 'Stripe holds the lowered total');
is(sql(q{SELECT state || '|' || needs_manual_credit FROM usage_billing.export_status
  WHERE customer_id = 'c6' AND meter = 'api_calls'}), 'in_sync|0', 'in sync, no manual credit');
ok(!grep({ $_->{value} < 0 } @{ events() }), 'no negative value sent');

# a previous period lands inside it; a 3-month-old one is not sent
ub_add_usage($node, q{'c7'}, 'api_calls', 4, 0, q{now() - interval '1 month'});
ub_add_usage($node, q{'c8'}, 'api_calls', 4, 0, q{now() - interval '3 months'});
sql('SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { grep { $_->{customer} eq 'cus_7' && $_->{value} == 4 } @{ events() } }, 20),
	'previous period exported');
like(sql(q{SELECT state || ' ' || last_error FROM usage_billing.export_status
  WHERE customer_id = 'c8' AND meter = 'api_calls'}), qr/^failed .*35 days/, 'too old period reported, not sent');
delete $UB_BOOK{"c8|api_calls|now() - interval '3 months'"};

# switching API with a reload: v1, then v2 again; nothing lost, nothing twice
for my $api (qw(v1 v2))
{
	$node->append_conf('postgresql.conf', "usage_billing.stripe_api = '$api'\n");
	$node->reload;
	ok(ub_wait_for(sub { sql('SHOW usage_billing.stripe_api') eq $api }, 10), "switched to $api");
	my $before = ub_mock_get($mock, 'v2')->{requests};
	my $v1_before = ub_mock_get($mock, 'stats')->{requests} - $before;
	ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers WHERE customer_id ~ '^c[0-9]+$'}, 'api_calls', 2);
	ok(ub_settle($node, $mock, sub { ub_recorded_in_sync($node, $mock) }), "$api: Stripe holds what was recorded");
	my $after = ub_mock_get($mock, 'v2')->{requests};
	my $v1_after = ub_mock_get($mock, 'stats')->{requests} - $after;
	if ($api eq 'v1')
	{
		is($after, $before, 'v1: nothing through the stream');
		ok($v1_after - $v1_before >= 20, 'v1: one request per event');
	}
	else
	{
		ok($after > $before, 'v2: through the stream again');
		is($v1_after, $v1_before, 'v2: nothing through v1');
	}
}

my ($wpid, $sent) = split /\|/, sql(q{SELECT pid, events_sent FROM usage_billing.export_worker_info()});
is($wpid, ub_worker_pid($node), 'export_worker_info: pid of the worker');
is($sent, scalar(@{ events() }), 'export_worker_info: events sent = events Stripe accepted');
is(ub_mock_get($mock, 'stats')->{violations}, 0, 'no request broke the spec')
  or diag(explain(ub_mock_get($mock, 'stats')->{violation_log}));
my @mismatch = ub_identifier_mismatches($node, $mock);
is(scalar(@mismatch), 0, 'every identifier Stripe accepted is recorded as sent, and only those')
  or diag(join("\n", @mismatch));
unlike(slurp_file($node->logfile), qr/ek_test_|\Q$UB_KEY\E/, 'neither the session token nor the key in the log');

$node->stop;
done_testing();
