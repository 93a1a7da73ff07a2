# 045_export_corrections.pl - corrections reach Stripe: void_usage/adjust_usage lower a
# sum total Stripe already holds -> the worker cancels the newest events (within the cancel
# window) and sends the difference; what it cannot cancel shows as needs_manual_credit.
# Also: max meters send the lowered value, a SIGKILL between a cancel's intent and its
# outcome cancels once, a 500 is retried, and the worker flushes queued hard-cap alerts.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(sleep);

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock();
# long request timeout: the crash test below kills the worker while the mock holds a cancel
my $node = ub_node('xcorr', $mock, "usage_billing.export_timeout = 20s\nrestart_after_crash = on\n");
ub_customers($node, 1, 6);

# Records usage with an idempotency key (so that it can be voided).
sub inc
{
	my ($c, $m, $amt, $key) = @_;
	$node->safe_psql('postgres', "SELECT usage_billing.increment_usage('$c', '$m', $amt, '$key')");
}

# One export_status column list for a customer and meter (current period).
sub st
{
	my ($c, $m, $cols) = @_;
	return $node->safe_psql('postgres', qq{SELECT $cols FROM usage_billing.export_status
  WHERE customer_id = '$c' AND meter = '$m' AND period_start <= now() AND period_end > now()});
}

sub mock_total { return ub_mock_get($mock, 'totals')->{ $_[0] } // 0; }
sub adj { return ub_mock_get($mock, 'adjustments'); }

# Wakes the worker; waits until nothing is pending (outbox and cancels) and cond holds.
sub settle
{
	my ($cond, $timeout) = @_;
	$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
	my $ok = ub_wait_for(sub {
		$node->safe_psql('postgres', q{SELECT (SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'pending')
  + (SELECT count(*) FROM usage_billing.export_cancels WHERE status = 'pending')}) eq '0'
		  && $cond->() }, $timeout // 30);
	diag("not settled: " . $node->safe_psql('postgres', q{SELECT string_agg(x::text, E'\n') FROM usage_billing.export_cancels x})
		. "\nmock: " . JSON::PP->new->canonical->encode(adj())) unless $ok;
	return $ok;
}

ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'worker running');

# --- a sum meter: three events (10, 5, 7), then a void and an adjustment lower the total
inc('c1', 'api_calls', 10, 'c1-a');
ok(settle(sub { mock_total('cus_1|api_calls') == 10 }), 'first event exported');
inc('c1', 'api_calls', 5, 'c1-b');
ok(settle(sub { mock_total('cus_1|api_calls') == 15 }), 'second event exported');
inc('c1', 'api_calls', 7.5, 'c1-c');
ok(settle(sub { mock_total('cus_1|api_calls') == 22 }), 'third event exported (7.5 -> 7, fraction carried)');

$node->safe_psql('postgres', q{SELECT usage_billing.void_usage('c1', 'c1-b', 'entered twice')});
is(st('c1', 'api_calls', 'total, target, state, needs_manual_credit'), '17.5|17|cancelling|0',
	'after the void: Stripe holds 5 too much, cancellable, so no manual credit');
ok(settle(sub { mock_total('cus_1|api_calls') == 17 }), 'void: Stripe back at floor(total) = 17');
my $a = adj();
is_deeply([ $a->{cancelled}, $a->{cancelled_value} ], [ 1, 7 ],
	'only the newest event (7) was cancelled: 15 <= 17, then +2 sent');
my @c1 = map { $_->{value} } grep { $_->{customer} eq 'cus_1' && !$_->{cancelled} } @{ ub_mock_get($mock, 'events') };
is_deeply(\@c1, [ 10, 5, 2 ], 'Stripe keeps 10 and 5 and got the difference 2 as a new event');
is(st('c1', 'api_calls', 'exported, state, needs_manual_credit, cancelled'), '17|in_sync|0|7',
	'export_status: in sync, 7 cancelled');

$node->safe_psql('postgres', q{SELECT usage_billing.adjust_usage('c1', 'api_calls', -9.5, 'refund')});
ok(settle(sub { mock_total('cus_1|api_calls') == 8 }), 'adjustment: Stripe at floor(8) = 8');
$a = adj();
is_deeply([ $a->{cancelled}, $a->{cancelled_value} ], [ 4, 24 ],
	'2, 5 and 10 cancelled newest first (9 too much needs all three), then 8 sent');
is(st('c1', 'api_calls', 'total, exported, state, needs_manual_credit'), '8.0|8|in_sync|0', 'in sync after the adjustment');

# --- events Stripe received more than 24 h ago: the cancel is refused, manual credit
inc('c2', 'api_calls', 10, 'c2-a');
ok(settle(sub { mock_total('cus_2|api_calls') == 10 }), 'c2: 10 exported');
inc('c2', 'api_calls', 6, 'c2-b');
ok(settle(sub { mock_total('cus_2|api_calls') == 16 }), 'c2: 6 exported');
ub_mock_post($mock, 'age', { seconds => 90000 });
$node->safe_psql('postgres', q{SELECT usage_billing.void_usage('c2', 'c2-b', 'test')});
ok(settle(sub { st('c2', 'api_calls', 'state') eq 'needs_manual_credit' }), 'refused cancel settles');
is(st('c2', 'api_calls', 'total, exported, needs_manual_credit, cancelled'), '10|16|6|0',
	'export_status: 6 needs a manual credit, Stripe still holds 16');
like(st('c2', 'api_calls', 'last_error'), qr/HTTP 400.*24 hours/, "Stripe's refusal is shown");
is(mock_total('cus_2|api_calls'), 16, 'mock still holds 16');
is($node->safe_psql('postgres', q{SELECT string_agg(status || ' ' || value || ' ' || attempts, ', ' ORDER BY cancel_id)
  FROM usage_billing.export_cancels WHERE customer_id = 'c2'}), 'refused 6 1, refused 10 1',
	'the newest event refused, then the older one tried (and refused): each once');

# --- the worker's own window: events older than export_cancel_window are not even tried
inc('c3', 'api_calls', 10, 'c3-a');
ok(settle(sub { mock_total('cus_3|api_calls') == 10 }), 'c3: 10 exported');
$node->safe_psql('postgres', q{ALTER SYSTEM SET usage_billing.export_cancel_window = '1s'});
$node->reload;
sleep(1.5);
my $before = adj()->{requests};
$node->safe_psql('postgres', q{SELECT usage_billing.adjust_usage('c3', 'api_calls', -4, 'test')});
is($node->safe_psql('postgres', q{SELECT state, needs_manual_credit FROM usage_billing.export_status
 WHERE customer_id = 'c3' AND meter = 'api_calls'}), 'needs_manual_credit|4',
	'outside the window: needs_manual_credit at once');
ok(settle(sub { 1 }), 'c3 settles');
sleep(0.5);
is(adj()->{requests}, $before, 'no cancel request for an event outside the window');
is(mock_total('cus_3|api_calls'), 10, 'Stripe keeps 10, nothing negative sent');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET usage_billing.export_cancel_window});
$node->reload;
ok(settle(sub { mock_total('cus_3|api_calls') == 6 }),
	'window back to 23 h: the event is cancellable again, cancelled, and 6 sent');
is(st('c3', 'api_calls', 'state, needs_manual_credit, cancelled'), 'in_sync|0|10', 'c3 in sync');

# --- a max meter lowered by a void: the new, lower value is sent, nothing cancelled
inc('c4', 'storage', 50, 'c4-a');
inc('c4', 'storage', 70, 'c4-b');
ok(settle(sub { (ub_mock_get($mock, 'last')->{'cus_4|storage_gb'} // 0) == 70 }), 'max meter: 70 exported');
$before = adj()->{requests};
$node->safe_psql('postgres', q{SELECT usage_billing.void_usage('c4', 'c4-b', 'test')});
ok(settle(sub { (ub_mock_get($mock, 'last')->{'cus_4|storage_gb'} // 0) == 50 }), 'max meter: 50 sent after the void');
is(adj()->{requests}, $before, 'max meter: no cancel');
is(st('c4', 'storage', 'total, exported, state'), '50|50|in_sync', 'max meter in sync');

# --- a 500 on the cancel: retried (new Idempotency-Key, since Stripe replays 500s)
inc('c6', 'api_calls', 10, 'c6-a');
ok(settle(sub { mock_total('cus_6|api_calls') == 10 }), 'c6: 10 exported');
inc('c6', 'api_calls', 3, 'c6-b');
ok(settle(sub { mock_total('cus_6|api_calls') == 13 }), 'c6: 3 exported');
ub_mock_post($mock, 'adjustment_faults', { kind => '500', count => 1 });
$node->safe_psql('postgres', q{SELECT usage_billing.void_usage('c6', 'c6-b', 'test')});
ok(settle(sub { mock_total('cus_6|api_calls') == 10 }), 'cancel retried after a 500');
like($node->safe_psql('postgres', q{SELECT status || ' ' || attempts || ' ' || idempotency_key
  FROM usage_billing.export_cancels WHERE customer_id = 'c6'}), qr/^cancelled 2 ubc-.*-k1$/,
	'second attempt with a rotated key');

# --- SIGKILL between the cancel's intent and its outcome: resent with the same key, once
inc('c5', 'api_calls', 10, 'c5-a');
ok(settle(sub { mock_total('cus_5|api_calls') == 10 }), 'c5: 10 exported');
inc('c5', 'api_calls', 5, 'c5-b');
ok(settle(sub { mock_total('cus_5|api_calls') == 15 }), 'c5: 5 exported');
my $cancelled = adj()->{cancelled};
ub_mock_post($mock, 'adjustment_faults', { kind => 'slow', seconds => 15 });
$node->safe_psql('postgres', q{SELECT usage_billing.void_usage('c5', 'c5-b', 'test')});
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { adj()->{cancelled} == $cancelled + 1 }, 20), 'the mock cancelled, its answer is held back');
is($node->safe_psql('postgres', q{SELECT status FROM usage_billing.export_cancels WHERE customer_id = 'c5'}),
	'pending', 'the intent is written, no outcome yet');
my $pid = ub_worker_pid($node);
ok($pid, 'worker pid');
kill 'KILL', $pid;
ok(ub_wait_for(sub { my $n = eval { $node->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity
  WHERE backend_type = 'usage_billing export worker'}) }; defined $n && $n eq '1' }, 30),
	'server and worker back after the crash');
ok(settle(sub { $node->safe_psql('postgres', q{SELECT status FROM usage_billing.export_cancels
  WHERE customer_id = 'c5'}) eq 'cancelled' }, 40), 'the pending cancel is resent and recorded');
$a = adj();
is($a->{cancelled}, $cancelled + 1, 'cancelled once in Stripe');
cmp_ok($a->{replays}, '>=', 1, 'the resend was answered from the Idempotency-Key');
is(mock_total('cus_5|api_calls'), 10, 'c5: Stripe holds 10');
is(st('c5', 'api_calls', 'exported, state'), '10|in_sync', 'c5: exported lowered once');

# --- overall: Stripe equals floor(total) except the manual credits, which export_status names
my $exp = ub_expected_totals($node);
my $got = ub_mock_totals($node, $mock);
my %credit;
for my $line (split /\n/, $node->safe_psql('postgres', q{SELECT stripe_customer_id, needs_manual_credit
  FROM usage_billing.export_status WHERE meter = 'api_calls' AND needs_manual_credit > 0}))
{
	my ($cus, $amount) = split /\|/, $line;
	$credit{"$cus|api_calls"} = $amount;
}
is_deeply(\%credit, { 'cus_2|api_calls' => 6 }, 'one manual credit: c2, 6');
$exp->{$_} += $credit{$_} for keys %credit;
is_deeply($got, $exp, 'mock totals = floor(total) + manual credit, per customer');
ok(!grep({ $_->{value} < 0 } @{ ub_mock_get($mock, 'events') }), 'no negative value ever sent');
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_outbox WHERE status <> 'sent'}),
	'0', 'every meter event was accepted');

# --- the worker flushes hard_cap_blocked alerts each cycle, without another increment
$node->safe_psql('postgres', q{
SELECT usage_billing.create_plan('capped');
SELECT usage_billing.set_plan_limit('capped', 'api_calls', included => 5, hard_cap => true);
SELECT usage_billing.upsert_customer('cap', 'capped');
SELECT usage_billing.increment_usage('cap', 'api_calls', 5);});
# no cycle may flush the alert before the check below: wait until the worker is between cycles
ok(ub_wait_for(sub { $node->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity
  WHERE backend_type = 'usage_billing export worker' AND state <> 'idle'}) eq '0' }, 30), 'the worker is between cycles');
my ($ret, $out, $err) = $node->psql('postgres', q{SELECT usage_billing.increment_usage('cap', 'api_calls', 1)});
like($err, qr/would exceed the limit/, 'increment refused by the hard cap');
my $logged = q{SELECT count(*) FROM usage_billing.alert_log WHERE customer_id = 'cap' AND kind = 'hard_cap_blocked'};
is($node->safe_psql('postgres', $logged), '0', 'the alert is queued, not yet in alert_log');
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { $node->safe_psql('postgres', $logged) eq '1' }, 20),
	"the worker's next cycle wrote it to alert_log");

$node->stop;
done_testing();
