# 140_reconcile.pl - reconciliation with Stripe's event summaries: the mock loses and
# duplicates events behind the worker's back; usage_billing.reconcile_stripe() (and the
# schedule, usage_billing.reconcile_interval) reads GET /v1/billing/meters/{id}/event_summaries,
# records the drift, and the export corrects it: the difference is sent again, an excess is
# cancelled within the cancel window, an older one is reported as not correctable.
# export_status never says in_sync while Stripe differs.  Stripe's totals are compared with
# what this test itself recorded (ub_add_usage's book), never with the extension's views.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

our ($UB_KEY, %UB_BOOK);
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock();
my $node = ub_node('reconcile', $mock, qq{
usage_billing.reconcile_interval = 0
usage_billing.reconcile_settle = 0
});
ub_customers($node, 1, 4);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub mock_total { return ub_mock_get($mock, 'totals')->{ $_[0] } // 0; }
sub mock_last { return ub_mock_get($mock, 'last')->{ $_[0] } // 0; }
sub book { return $UB_BOOK{"$_[0]|$_[1]|now()"} // 0; }
sub state_of
{
	my ($c, $m) = @_;
	return sql(qq{SELECT state FROM usage_billing.export_status
 WHERE customer_id = '$c' AND meter = '$m' AND period_end > now() AND period_start <= now()});
}

# Wakes the worker; waits until nothing is pending (events and cancels) and cond holds.
sub settle
{
	my ($cond, $timeout) = @_;
	sql('SELECT usage_billing.export_now()');
	my $ok = ub_wait_for(sub {
		sql(q{SELECT (SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'pending')
  + (SELECT count(*) FROM usage_billing.export_cancels WHERE status = 'pending')}) eq '0'
		  && (!$cond || $cond->()) }, $timeout // 30);
	diag("not settled: " . sql(q{SELECT string_agg(customer_id || ' ' || status || ' ' || attempts || ' '
  || coalesce(last_error, ''), E'\n') FROM usage_billing.export_outbox WHERE status <> 'sent'})
		. "\nmock: " . JSON::PP->new->canonical->encode(ub_mock_get($mock, 'totals'))) unless $ok;
	return $ok;
}

sub recorded_in_sync
{
	return JSON::PP->new->canonical->encode(ub_mock_totals($node, $mock))
	  eq JSON::PP->new->canonical->encode(ub_recorded_totals($node));
}

# reconcile_stripe() as "customer meter status drift" lines
sub reconcile
{
	my ($args) = @_;
	return sql(qq{SELECT string_agg(customer_id || ' ' || meter || ' ' || status || ' ' || coalesce(drift::text, '-'),
  E'\n' ORDER BY customer_id, meter) FROM usage_billing.reconcile_stripe($args)});
}

ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'worker running');

# the Stripe meters (formula sum for sum/count meters, last for the others)
ub_mock_post($mock, 'meters', { id => 'mtr_api', event_name => 'api_calls', formula => 'sum' });
ub_mock_post($mock, 'meters', { id => 'mtr_storage', event_name => 'storage_gb', formula => 'last' });
sql(q{SELECT usage_billing.set_stripe_meter_id('api_calls', 'mtr_api')});
sql(q{SELECT usage_billing.set_stripe_meter_id('storage', 'mtr_storage')});

# bad input: 22023 for a malformed meter id, P0002 for an unknown meter
my ($rc, $out, $err) = $node->psql('postgres',
	q{SELECT usage_billing.set_stripe_meter_id('api_calls', 'mtr/../x')}, on_error_stop => 1,
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/22023.*invalid Stripe meter id/s, 'a meter id with a slash: 22023');
($rc, $out, $err) = $node->psql('postgres', q{SELECT usage_billing.set_stripe_meter_id('nope', 'mtr_x')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/P0002.*meter "nope" does not exist/s, 'an unknown meter: P0002');

# --- everything exported, nothing lost: reconciliation finds every key in sync
ub_add_usage($node, q{'c1', 'c2', 'c3', 'c4'}, 'api_calls', 10);
ub_add_usage($node, q{'c1'}, 'storage', 7, 1);
ok(settle(sub { recorded_in_sync() && mock_last('cus_1|storage_gb') == 7 }), 'exported: Stripe holds what was recorded');
is(reconcile(''), "c1 api_calls in_sync 0\nc1 storage in_sync 0\nc2 api_calls in_sync 0\nc3 api_calls in_sync 0\nc4 api_calls in_sync 0",
	'reconcile_stripe(): every key in sync');
is(sql('SELECT count(*) FROM usage_billing.stripe_drift'), '0', 'stripe_drift: empty');
is(ub_mock_get($mock, 'stats')->{summary_requests}, 5, 'one summary request per customer, meter and period');

# --- Stripe loses an event (c1) and counts another twice (c2), behind the worker's back
ub_mock_post($mock, 'lose', { customer => 'cus_1', event_name => 'api_calls', count => 1 });
ub_mock_post($mock, 'duplicate', { customer => 'cus_2', event_name => 'api_calls', count => 1 });
is(mock_total('cus_1|api_calls'), 0, 'the mock lost c1\'s event');
is(mock_total('cus_2|api_calls'), 20, 'the mock counts c2\'s event twice');
is(state_of('c1', 'api_calls'), 'in_sync', 'before reconciling, the database cannot know');

# the corrections meet faults, so that they take a while: export_status must not say in_sync meanwhile
ub_mock_post($mock, 'faults', { kind => '500', count => 4 });
ub_mock_post($mock, 'adjustment_faults', { kind => '500', count => 3 });
is(reconcile(q{p_meter => 'api_calls'}),
	"c1 api_calls resending -10\nc2 api_calls cancelling 10\nc3 api_calls in_sync 0\nc4 api_calls in_sync 0",
	'reconcile_stripe(meter): c1 short by 10 (resending), c2 10 over (cancelling)');
my $c1 = state_of('c1', 'api_calls');
my $c2 = state_of('c2', 'api_calls');
ok(!($c1 eq 'in_sync' && mock_total('cus_1|api_calls') != book('c1', 'api_calls')),
	"c1 not in_sync while Stripe is short ($c1)");
ok(!($c2 eq 'in_sync' && mock_total('cus_2|api_calls') != book('c2', 'api_calls')),
	"c2 not in_sync while Stripe holds too much ($c2)");
is(sql(q{SELECT string_agg(customer_id || ' ' || status || ' ' || drift, ', ' ORDER BY customer_id)
  FROM usage_billing.stripe_drift}), 'c1 resending -10, c2 cancelling 10', 'stripe_drift shows both');

# while correcting: whenever export_status says in_sync, Stripe holds what was recorded
my $violations = 0;
my $ok = ub_wait_for(sub {
	for my $c ('c1', 'c2')
	{
		my $st = state_of($c, 'api_calls');
		$violations++ if $st eq 'in_sync' && mock_total("cus_" . substr($c, 1) . "|api_calls") != book($c, 'api_calls');
	}
	return recorded_in_sync() && state_of('c1', 'api_calls') eq 'in_sync' && state_of('c2', 'api_calls') eq 'in_sync';
}, 30);
ok($ok, 'corrected: Stripe holds what was recorded, export_status in_sync');
is($violations, 0, 'never in_sync while Stripe differed');
ok(settle(\&recorded_in_sync), 'settled');
is(mock_total('cus_1|api_calls'), book('c1', 'api_calls'), 'c1: the lost 10 sent again');
is(mock_total('cus_2|api_calls'), book('c2', 'api_calls'), 'c2: the excess cancelled');
is(ub_mock_get($mock, 'adjustments')->{cancelled}, 1, 'one cancel');
is(reconcile(q{p_meter => 'api_calls'}),
	"c1 api_calls in_sync 0\nc2 api_calls in_sync 0\nc3 api_calls in_sync 0\nc4 api_calls in_sync 0",
	'the next reconciliation finds them in sync');
is(sql(q{SELECT string_agg(customer_id || ' ' || corrections || ' ' || last_drift, ', ' ORDER BY customer_id)
  FROM usage_billing.stripe_reconciliation WHERE corrections > 0}), 'c1 1 -10, c2 1 10',
	'the corrections are on record');
is(sql('SELECT count(*) FROM usage_billing.stripe_drift'), '0', 'stripe_drift: empty again');

# --- a formula-last meter: Stripe lost the latest value; it is sent again
ub_mock_post($mock, 'lose', { customer => 'cus_1', event_name => 'storage_gb', count => 1 });
is(mock_last('cus_1|storage_gb'), 0, 'the mock lost c1\'s storage value');
is(reconcile(q{'c1', 'storage'}), 'c1 storage resending -7', 'reconcile_stripe(customer, meter): resending');
ok(settle(sub { mock_last('cus_1|storage_gb') == 7 }), 'the value 7 the test set is in Stripe again');
is(reconcile(q{'c1', 'storage'}), 'c1 storage in_sync 0', 'then in sync');

# --- too old to cancel: reported as not correctable, and export_status says so
sql(q{ALTER SYSTEM SET usage_billing.export_cancel_window = '1s'});
$node->reload;
ok(ub_wait_for(sub { sql(q{SELECT max(created_at) < now() - interval '2 s' FROM usage_billing.export_outbox}) eq 't'
	  && sql(q{SELECT setting FROM pg_settings WHERE name = 'usage_billing.export_cancel_window'}) eq '1' }, 10),
	'the outbox rows are older than the cancel window');
ub_mock_post($mock, 'duplicate', { customer => 'cus_3', event_name => 'api_calls', count => 1 });
is(reconcile(q{'c3'}), 'c3 api_calls not_correctable 10', 'c3: 10 over, not cancellable: not_correctable');
like(sql(q{SELECT detail FROM usage_billing.stripe_drift WHERE customer_id = 'c3'}),
	qr/credit the rest by hand/, 'the detail says what to do');
ok(settle(), 'settled');
is(sql(q{SELECT state || ' ' || needs_manual_credit FROM usage_billing.export_status
 WHERE customer_id = 'c3' AND meter = 'api_calls'}), 'needs_manual_credit 10', 'export_status: needs_manual_credit 10');
is(mock_total('cus_3|api_calls'), 20, 'nothing cancelled, nothing negative sent');
sql(q{ALTER SYSTEM RESET usage_billing.export_cancel_window});
$node->reload;

# --- an event sent within reconcile_settle is left alone (Stripe's summaries lag)
sql(q{ALTER SYSTEM SET usage_billing.reconcile_settle = '1h'});
$node->reload;
ok(ub_wait_for(sub { sql(q{SELECT setting FROM pg_settings WHERE name = 'usage_billing.reconcile_settle'}) eq '3600' }, 10),
	'reconcile_settle 1h');
ub_add_usage($node, q{'c4'}, 'api_calls', 5);
ok(settle(\&recorded_in_sync), 'c4: 5 more exported');
ub_mock_post($mock, 'lose', { customer => 'cus_4', event_name => 'api_calls', count => 1 });
is(reconcile(q{'c4'}), 'c4 api_calls skipped -', 'c4: sent within the settle time: skipped');
sql(q{ALTER SYSTEM RESET usage_billing.reconcile_settle});
sql(q{ALTER SYSTEM SET usage_billing.reconcile_settle = 0});
$node->reload;

# --- the schedule: reconcile_interval runs it without anyone asking
sql(q{ALTER SYSTEM SET usage_billing.reconcile_interval = 1});
$node->reload;
ok(ub_wait_for(sub { mock_total('cus_4|api_calls') == book('c4', 'api_calls') }, 30),
	'reconcile_interval: the worker found and corrected c4 by itself');
ok(ub_wait_for(sub { sql(q{SELECT status FROM usage_billing.stripe_reconciliation WHERE customer_id = 'c4'}) eq 'in_sync' }, 30),
	'and found it in sync at the next run');
sql(q{ALTER SYSTEM SET usage_billing.reconcile_interval = 0});
$node->reload;

# --- Stripe cannot be read: recorded as an error, export_status unchanged
sql(q{SELECT usage_billing.set_stripe_meter_id('storage', 'mtr_unknown')});
is(reconcile(q{'c1', 'storage'}), 'c1 storage error -', 'an unknown Stripe meter: error');
like(sql(q{SELECT detail FROM usage_billing.stripe_drift WHERE customer_id = 'c1' AND meter = 'storage'}),
	qr/HTTP 404.*No such billing meter/, "Stripe's answer is the detail");

# --- the mock's own strictness: a malformed summaries request is refused and counted
my $r = HTTP::Tiny->new->get("$mock->{url}/v1/billing/meters/mtr_api/event_summaries?customer=cus_1&start_time=61&end_time=120",
	{ headers => { Authorization => "Bearer $UB_KEY" } });
is($r->{status}, 400, 'mock: a start_time off the minute is refused');
$r = HTTP::Tiny->new->get("$mock->{url}/v1/billing/meters/mtr_api/event_summaries?customer=cus_1&start_time=60",
	{ headers => { Authorization => "Bearer $UB_KEY" } });
like($r->{content}, qr/end_time/, 'mock: a missing end_time is refused');
is(ub_mock_get($mock, 'stats')->{violations}, 2, 'the two refusals, and nothing the worker sent, are violations');

done_testing();
