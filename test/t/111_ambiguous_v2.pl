# 111_ambiguous_v2.pl - exactly once over Stripe's v2 meter event stream
# (usage_billing.stripe_api = 'v2'): the faults of 110_ambiguous.pl hit requests of up to 100
# events, sessions expire, and Stripe's totals are compared with what this test itself
# recorded (ub_add_usage's book), never with the extension's views.  Also: at most 100 events
# per request, the events host apart from the API host, the session token never in the log,
# cancels (v1) of events sent through the stream, customer ids Stripe would refuse never
# sent, timestamps never ahead of the clock, one request in flight per customer and meter.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

our ($UB_KEY, %UB_BOOK);
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock(v2 => 1);
my $node = ub_node('ambiguous_v2', $mock, "usage_billing.export_timeout = 2s\n" . ub_v2_conf($mock));
ub_customers($node, 1, 12);
my $all = q{SELECT customer_id FROM usage_billing.customers WHERE customer_id ~ '^c([1-9]|1[0-2])$'};

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub stats { return ub_mock_get($mock, 'stats'); }
sub v2 { return ub_mock_get($mock, 'v2'); }
sub settle { return ub_settle($node, $mock, @_); }
sub in_sync { return ub_recorded_in_sync($node, $mock); }

ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'worker running');
is(sql('SHOW usage_billing.stripe_api'), 'v2', 'stripe_api is v2');

# --- 1. the plain path: one session, events through the stream, none through v1
ub_add_usage($node, $all, 'api_calls', 3);
ok(settle(\&in_sync), 'Stripe holds what was recorded');
my $v = v2();
is($v->{sessions}, 1, 'one meter event session opened');
ok($v->{requests} >= 1 && $v->{events} == 12, "the 12 events went through the stream ($v->{requests} request(s))");
is(stats()->{requests}, $v->{requests}, 'no meter event went through v1');

# --- 2. one request in flight per customer and meter: two periods pending, slow answers
# (before the faults below: a request abandoned after a timeout still counts at the mock)
ub_mock_post($mock, 'faults', { kind => 'slow', count => 2, seconds => 0.4 });
ub_add_usage($node, q{'c1', 'c2', 'c3'}, 'api_calls', 1, undef, q{now() - interval '1 month'});
ub_add_usage($node, q{'c1', 'c2', 'c3'}, 'api_calls', 1);
ok(settle(\&in_sync, 40), 'two periods with slow answers: Stripe holds what was recorded');
is(stats()->{max_inflight_per_key}, 1, 'never two requests in flight for one customer and meter');

# --- 3. every ambiguous or temporary answer, on requests that carry many events
for my $case (
	[ '500_after', 'processed, then 500' ],
	[ 'drop_after', 'processed, then the answer lost' ],
	[ '500', 'a 500 before processing' ],
	[ 'garbage_500', 'a malformed 500' ],
	[ 'close', 'the connection closed' ],
	[ 'hang', 'no answer before the timeout' ],
	[ '429', 'a 429' ],
	[ '429_retry_after', 'a 429 with Retry-After' ])
{
	my ($kind, $what) = @$case;
	my $before = stats();
	ub_mock_post($mock, 'faults', { kind => $kind, count => 2, seconds => 3, retry_after => 1 });
	ub_add_usage($node, $all, 'api_calls', 2);
	ok(settle(\&in_sync, 40), "$what: Stripe holds what was recorded");
	my $after = stats();
	is($after->{faults_queued}, 0, "$what: the faults were served");
	if ($kind eq '500_after' || $kind eq 'drop_after')
	{
		ok($after->{duplicates} - $before->{duplicates} >= 12,
			"$what: the resend met the identifiers Stripe held (" . ($after->{duplicates} - $before->{duplicates}) . ' duplicates)');
	}
	is(sql(q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'failed'}), '0', "$what: no row marked failed");
}
my @mismatch = ub_identifier_mismatches($node, $mock);
is(scalar(@mismatch), 0, 'every identifier Stripe holds is recorded as sent') or diag(join("\n", @mismatch));
sql('SELECT usage_billing.retry_failed_exports()');
ok(settle(\&in_sync), 'retry_failed_exports() sends nothing twice');
is(stats()->{violations}, 0, 'no request broke the spec so far') or diag(explain(stats()->{violation_log}));

# a refusal that names one event fails that event only; the others of the request go again
ub_mock_post($mock, 'faults', { kind => '400_first_event', count => 1 });
ub_add_usage($node, $all, 'api_calls', 1);
ok(settle(sub { sql(q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'failed'}) eq '1' }),
	'a 400 naming events[0]: one row failed, the others settled');
like(sql(q{SELECT last_error FROM usage_billing.export_outbox WHERE status = 'failed'}),
	qr/^HTTP 400 invalid_request_error\/invalid_fields: events\[0\]\.payload/, "the failed row keeps Stripe's message");
is(sql(q{SELECT count(*) FROM usage_billing.export_attempts a JOIN usage_billing.export_outbox o USING (outbox_id)
  WHERE o.status = 'sent' AND a.http_status = 400}), '11', 'the 11 others were resent after the 400');
sql('SELECT usage_billing.retry_failed_exports()');
ok(settle(\&in_sync), 'after retry_failed_exports(): Stripe holds what was recorded');

# --- 4. the session expires: 401 temporary_session_expired, a new session, the same events
$v = v2();
ub_mock_post($mock, 'v2/expire', {});
ub_add_usage($node, $all, 'api_calls', 1);
ok(settle(\&in_sync), 'after the session expired: Stripe holds what was recorded');
my $v2 = v2();
ok($v2->{expired_401} > $v->{expired_401}, 'the stream answered 401 for the expired token');
is($v2->{sessions}, $v->{sessions} + 1, 'one new session opened for it');
is(sql(q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'failed'}), '0', 'no row failed for it');

# short sessions are renewed before they expire (a quarter of their life early)
ub_mock_post($mock, 'v2/config', { session_seconds => 4 });
ub_mock_post($mock, 'v2/expire', {});
$v = v2();
for my $i (1 .. 4)
{
	ub_add_usage($node, q{'c1', 'c2'}, 'api_calls', 1);
	ok(settle(\&in_sync), "short sessions, round $i: Stripe holds what was recorded");
	sleep(1.2);
}
$v2 = v2();
ok($v2->{sessions} - $v->{sessions} >= 2, 'short sessions: renewed (' . ($v2->{sessions} - $v->{sessions}) . ' sessions)');
ok($v2->{expired_401} - $v->{expired_401} <= 1, 'short sessions: renewed before expiry, at most the forced 401');
ub_mock_post($mock, 'v2/config', { session_seconds => 900 });

# --- 5. 250 changed customers: requests of 100 events, no more
ub_customers($node, 100, 349);
$v = v2();
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers WHERE customer_id ~ '^c[1-3][0-9][0-9]$'}, 'api_calls', 5);
ok(settle(\&in_sync), '250 customers: Stripe holds what was recorded');
$v2 = v2();
is($v2->{events} - $v->{events}, 250, '250 events sent');
is($v2->{requests} - $v->{requests}, 3, 'in 3 requests');
is($v2->{max_events}, 100, 'of at most 100 events, and full ones');

# --- 6. customer ids Stripe would refuse are never sent
ub_customers($node, 30, 32);
sql(q{UPDATE usage_billing.customers SET stripe_customer_id = CASE customer_id
      WHEN 'c30' THEN 'cus_' || repeat('x', 97) WHEN 'c31' THEN '   ' ELSE 'cus_a b' END
    WHERE customer_id IN ('c30', 'c31', 'c32')});
$v = v2();
ub_add_usage($node, q{'c30', 'c31', 'c32'}, 'api_calls', 4);
ok(settle(sub { sql(q{SELECT count(*) FROM usage_billing.export_outbox
  WHERE customer_id IN ('c30', 'c31', 'c32') AND status = 'failed'}) eq '3' }), 'bad customer ids: rows failed');
is(v2()->{events}, $v->{events}, 'bad customer ids: nothing sent');
like(sql(q{SELECT last_error FROM usage_billing.export_outbox WHERE customer_id = 'c31'}),
	qr/not sent: stripe_customer_id contains a blank/, 'blank: said so');
sql(q{UPDATE usage_billing.customers SET stripe_customer_id = 'cus_' || substr(customer_id, 2)
    WHERE customer_id IN ('c30', 'c31', 'c32')});
sql('SELECT usage_billing.retry_failed_exports()');
ok(settle(\&in_sync), 'after fixing the ids and retry_failed_exports(): Stripe holds what was recorded');

# --- 7. a cancel (v1 adjustments) of an event sent through the stream
sql(q{SELECT usage_billing.upsert_customer('c20', 'basic', NULL, 'cus_20')});
sql(q{SELECT usage_billing.increment_usage('c20', 'api_calls', 10, 'c20-a')});
ok(settle(sub { (ub_mock_get($mock, 'totals')->{'cus_20|api_calls'} // 0) == 10 }), 'c20: 10 exported');
sql(q{SELECT usage_billing.increment_usage('c20', 'api_calls', 5, 'c20-b')});
ok(settle(sub { (ub_mock_get($mock, 'totals')->{'cus_20|api_calls'} // 0) == 15 }), 'c20: 15 exported');
my $adj = ub_mock_get($mock, 'adjustments');
ub_mock_post($mock, 'adjustment_faults', { kind => '500_after', count => 1 });
sql(q{SELECT usage_billing.void_usage('c20', 'c20-b', 'entered twice')});
ok(settle(sub { ub_mock_get($mock, 'adjustments')->{faults_queued} == 0 }), 'c20: the cancel settled');
is(ub_mock_get($mock, 'totals')->{'cus_20|api_calls'}, 10, 'c20: Stripe holds 10 after the cancel');
is(ub_mock_get($mock, 'adjustments')->{cancelled} - $adj->{cancelled}, 1, 'c20: exactly one event cancelled');
$UB_BOOK{'c20|api_calls|now()'} = 10;

# --- 8. timestamps never ahead of the clock, for a max meter changing five times a second
for my $i (1 .. 15)
{
	ub_add_usage($node, q{'c2'}, 'storage', $i, 1);
	sql('SELECT usage_billing.export_now()');
	sleep(0.2);
}
ok(settle(sub { (ub_mock_get($mock, 'last')->{'cus_2|storage_gb'} // 0) == 15 }, 40),
	'max meter: the latest value reached Stripe');
my $ahead = stats()->{max_ahead};
ok(defined $ahead && $ahead <= 0, "no event timestamp ahead of the clock (largest lead: $ahead s)");
my @ts = map { $_->{timestamp} } grep { $_->{customer} eq 'cus_2' && $_->{event_name} eq 'storage_gb' }
  @{ ub_mock_get($mock, 'events') };
is(scalar(grep { $ts[$_] <= $ts[ $_ - 1 ] } 1 .. $#ts), 0, 'each event of the max meter after the previous one');

# --- 9. the events host and the session token stay where they belong
my $s = stats();
is_deeply([ keys %{ $s->{stripe_versions} } ], ['2026-07-29.dahlia'], 'every request carried Stripe-Version');
is($s->{statuses}{404} // 0, 0, 'no request went to the wrong host');
my $log = slurp_file($node->logfile);
unlike($log, qr/ek_test_/, 'no session token in the server log');
unlike($log, qr/\Q$UB_KEY\E/, 'no key in the server log');
unlike(sql(q{SELECT string_agg(coalesce(last_error, ''), ' ') FROM usage_billing.export_outbox}), qr/ek_test_/,
	'no session token in the outbox');

is(stats()->{violations}, 0, 'no request broke the spec') or diag(explain(stats()->{violation_log}));
@mismatch = ub_identifier_mismatches($node, $mock);
is(scalar(@mismatch), 0, 'every identifier Stripe accepted is recorded as sent, and only those')
  or diag(join("\n", @mismatch));

$node->stop;
done_testing();
