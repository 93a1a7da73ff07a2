# 110_ambiguous.pl - exactly once where it is won or lost: answers that do not say whether
# Stripe recorded an event or a cancel.  Stripe's totals are compared with what this test
# itself recorded (ub_add_usage's book, or numbers written here), never with the
# extension's views.  Also: timestamps never ahead of the clock, customer ids Stripe would
# refuse, one request in flight per customer and meter, a cycle larger than
# export_batch_size, backoff growth and cap, the Stripe-Version header and unique_count.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

our ($UB_KEY, %UB_BOOK);
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock();
my $node = ub_node('ambiguous', $mock, "usage_billing.export_timeout = 2s\n");
$node->safe_psql('postgres', q{SELECT usage_billing.create_meter('visitors', 'unique_count',
  stripe_event_name => 'visitors', value_property => 'user')});
ub_customers($node, 1, 12);
my $all = q{SELECT customer_id FROM usage_billing.customers WHERE customer_id ~ '^c([1-9]|1[0-2])$'};

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub stats { return ub_mock_get($mock, 'stats'); }

# Wakes the worker; waits until nothing is pending (events and cancels) and cond holds.
sub settle
{
	my ($cond, $timeout) = @_;
	sql('SELECT usage_billing.export_now()');
	my $ok = ub_wait_for(sub {
		sql(q{SELECT (SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'pending')
  + (SELECT count(*) FROM usage_billing.export_cancels WHERE status = 'pending')}) eq '0'
		  && (!$cond || $cond->()) }, $timeout // 30);
	diag("not settled: " . sql(q{SELECT string_agg(status || ' ' || attempts || ' ' || coalesce(last_error, ''), E'\n')
  FROM usage_billing.export_outbox WHERE status <> 'sent'})
		. "\nmock: " . JSON::PP->new->canonical->encode(stats())) unless $ok;
	return $ok;
}

sub recorded_in_sync
{
	return JSON::PP->new->canonical->encode(ub_mock_totals($node, $mock))
	  eq JSON::PP->new->canonical->encode(ub_recorded_totals($node));
}

ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'worker running');

# --- 1. processed, then 500: the resend (new Idempotency-Key, same identifier) meets the
# duplicate identifier, answered in each form v1 may use; every form means "already there"
for my $form (qw(param code exists 200))
{
	ub_mock_post($mock, 'config', { dup_answer => $form });
	my $before = stats();
	ub_mock_post($mock, 'faults', { kind => '500_after', count => 4 });
	ub_add_usage($node, $all, 'api_calls', 2);
	ok(settle(\&recorded_in_sync), "processed-then-500, duplicate answered '$form': Stripe holds what was recorded");
	my $after = stats();
	ok(($after->{dup_answers}{$form} // 0) - ($before->{dup_answers}{$form} // 0) >= 4,
		"'$form': the resends met the duplicate identifier");
	is(sql(q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'failed'}), '0',
		"'$form': no row marked failed");
	my @mismatch = ub_identifier_mismatches($node, $mock);
	is(scalar(@mismatch), 0, "'$form': every identifier Stripe holds is recorded as sent") or diag(join("\n", @mismatch));

	# processed, then 500, then the resend's answer lost: the third attempt reuses the
	# second key and gets the saved duplicate answer replayed
	$before = stats();
	ub_mock_post($mock, 'faults', { kind => '500_after', count => 1 });
	ub_mock_post($mock, 'faults', { kind => 'drop_after', count => 1 });
	ub_add_usage($node, q{'c1'}, 'api_calls', 3);
	ok(settle(\&recorded_in_sync), "'$form': processed-then-500 then lost: Stripe holds what was recorded");
	ok(stats()->{replays} > $before->{replays}, "'$form': the duplicate answer was replayed for the lost one");

	# what a wrong worker would have marked failed must not come back as a new event
	sql('SELECT usage_billing.retry_failed_exports()');
	ok(settle(\&recorded_in_sync), "'$form': retry_failed_exports() sends nothing twice");
}
is(stats()->{violations}, 0, 'no request broke the spec so far')
  or diag(explain(stats()->{violation_log}));

# --- 2. a cancel processed, then 500: the retry is answered "already cancelled" (or 200);
# that means done, and no other (older) event may be cancelled for it
ub_customers($node, 20, 21);
for my $case ([ 'c20', 'cus_20', '400' ], [ 'c21', 'cus_21', '200' ])
{
	my ($c, $cus, $answer) = @$case;
	ub_mock_post($mock, 'config', { cancel_dup_answer => $answer });
	sql("SELECT usage_billing.increment_usage('$c', 'api_calls', 10, '$c-a')");
	ok(settle(sub { (ub_mock_get($mock, 'totals')->{"$cus|api_calls"} // 0) == 10 }), "$c: 10 exported");
	sql("SELECT usage_billing.increment_usage('$c', 'api_calls', 5, '$c-b')");
	ok(settle(sub { (ub_mock_get($mock, 'totals')->{"$cus|api_calls"} // 0) == 15 }), "$c: 15 exported");
	my $adj = ub_mock_get($mock, 'adjustments');
	ub_mock_post($mock, 'adjustment_faults', { kind => '500_after', count => 1 });
	sql("SELECT usage_billing.void_usage('$c', '$c-b', 'entered twice')");
	ok(settle(sub { ub_mock_get($mock, 'adjustments')->{faults_queued} == 0 }), "$c: the cancel settled");
	my $adj2 = ub_mock_get($mock, 'adjustments');
	is(ub_mock_get($mock, 'totals')->{"$cus|api_calls"}, 10, "$c (already-cancelled answered $answer): Stripe holds 10");
	is($adj2->{cancelled} - $adj->{cancelled}, 1, "$c: exactly one event cancelled (no older one)");
	is($adj2->{already} - $adj->{already}, 1, "$c: the retry met the already cancelled event");
	is(sql(qq{SELECT state || '|' || needs_manual_credit FROM usage_billing.export_status
  WHERE customer_id = '$c' AND meter = 'api_calls'}), 'in_sync|0', "$c: export_status in sync, no manual credit");
}

# the book of this test: c20 and c21 hold 10 each
$UB_BOOK{"$_|api_calls|now()"} = 10 for qw(c20 c21);

# --- 3. timestamps never ahead of the clock, for a max meter whose value changes five
# times a second (each event must come after the previous one, yet not after now)
for my $i (1 .. 20)
{
	ub_add_usage($node, q{'c2'}, 'storage', $i, 1);
	sql('SELECT usage_billing.export_now()');
	sleep(0.2);
}
ok(settle(sub { (ub_mock_get($mock, 'last')->{'cus_2|storage_gb'} // 0) == 20 }, 40),
	'max meter: the latest value reached Stripe');
my $ahead = stats()->{max_ahead};
ok(defined $ahead && $ahead <= 0, "no event timestamp ahead of the clock (largest lead: $ahead s)");
is(sql(q{SELECT count(*) FROM usage_billing.export_state WHERE last_ts > extract(epoch FROM clock_timestamp()) + 1}), '0',
	'no planned timestamp more than a second ahead');
my @ts = map { $_->{timestamp} } grep { $_->{customer} eq 'cus_2' && $_->{event_name} eq 'storage_gb' }
  @{ ub_mock_get($mock, 'events') };
is(scalar(grep { $ts[$_] <= $ts[ $_ - 1 ] } 1 .. $#ts), 0, 'each event of the max meter after the previous one');

# --- 4. customer ids Stripe would refuse are never sent; their rows wait with a clear error
ub_customers($node, 30, 32);
sql(q{UPDATE usage_billing.customers SET stripe_customer_id = CASE customer_id
      WHEN 'c30' THEN 'cus_' || repeat('x', 97) WHEN 'c31' THEN '   ' ELSE 'cus_a b' END
    WHERE customer_id IN ('c30', 'c31', 'c32')});
my $req = stats()->{requests};
ub_add_usage($node, q{'c30', 'c31', 'c32'}, 'api_calls', 4);
ok(settle(sub { sql(q{SELECT count(*) FROM usage_billing.export_outbox
  WHERE customer_id IN ('c30', 'c31', 'c32') AND status = 'failed'}) eq '3' }), 'bad customer ids: rows failed');
is(stats()->{requests}, $req, 'bad customer ids: nothing sent');
like(sql(q{SELECT last_error FROM usage_billing.export_outbox WHERE customer_id = 'c30'}),
	qr/not sent: stripe_customer_id is longer than 100 characters/, 'too long: said so');
like(sql(q{SELECT last_error FROM usage_billing.export_outbox WHERE customer_id = 'c31'}),
	qr/not sent: stripe_customer_id contains a blank/, 'blank: said so');
is(sql(q{SELECT count(*) FROM usage_billing.export_status WHERE customer_id IN ('c30', 'c31', 'c32') AND state = 'in_sync'}),
	'0', 'export_status does not say in sync for them');
sql(q{UPDATE usage_billing.customers SET stripe_customer_id = 'cus_' || substr(customer_id, 2)
    WHERE customer_id IN ('c30', 'c31', 'c32')});
sql('SELECT usage_billing.retry_failed_exports()');
ok(settle(\&recorded_in_sync), 'after fixing the ids and retry_failed_exports(): Stripe holds what was recorded');
is(stats()->{violations}, 0, 'no request broke the spec') or diag(explain(stats()->{violation_log}));

# --- 5. at most one request in flight per customer and meter: two periods pending for
# three customers, slow answers, room for eight requests in flight (so all six rows would
# go at once if the worker let them)
ub_mock_post($mock, 'faults', { kind => 'slow', count => 6, seconds => 0.4 });
ub_add_usage($node, q{'c1', 'c2', 'c3'}, 'api_calls', 1, undef, q{now() - interval '1 month'});
ub_add_usage($node, q{'c1', 'c2', 'c3'}, 'api_calls', 1);
ok(settle(\&recorded_in_sync, 40), 'two periods with slow answers: Stripe holds what was recorded');
ok(stats()->{max_inflight} >= 2, 'requests did overlap (' . stats()->{max_inflight} . ' in flight)');
is(stats()->{max_inflight_per_key}, 1, 'never two requests in flight for one customer and meter');

# --- 6. a cycle larger than export_batch_size: one cycle sends every batch
$node->append_conf('postgresql.conf', "usage_billing.export_batch_size = 5\n");
$node->reload;
ub_customers($node, 40, 79);
sleep(0.5);
ub_wait_for(sub { sql(q{SELECT count(*) FROM pg_stat_activity
  WHERE backend_type = 'usage_billing export worker' AND state = 'idle'}) eq '1' }, 10);
my $cycles = sql('SELECT cycles FROM usage_billing.export_worker_info()');
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers WHERE customer_id ~ '^c[4-7][0-9]$'}, 'api_calls', 3);
ok(settle(\&recorded_in_sync), '40 rows with batches of 5: Stripe holds what was recorded');
my $used = sql('SELECT cycles FROM usage_billing.export_worker_info()') - $cycles;
# one batch per cycle would take 8
ok($used <= 3, "sent within $used cycle(s), not one batch per cycle");

# --- 7. backoff grows and stops at its maximum (base 100 ms, max 1 s, equal jitter)
ub_mock_post($mock, 'faults', { kind => '500', count => 8 });
ub_add_usage($node, q{'c3'}, 'api_calls', 1);
ok(settle(\&recorded_in_sync, 30), 'after eight 500s: Stripe holds what was recorded');
my @gaps = split /\n/, sql(q{SELECT extract(epoch FROM b.attempted_at - a.attempted_at)
  FROM usage_billing.export_attempts a
  JOIN usage_billing.export_attempts b ON b.outbox_id = a.outbox_id AND b.attempt = a.attempt + 1
  JOIN usage_billing.export_outbox o ON o.outbox_id = a.outbox_id
 WHERE o.outbox_id = (SELECT max(outbox_id) FROM usage_billing.export_outbox
                       WHERE customer_id = 'c3' AND meter = 'api_calls')
   AND a.http_status = 500 ORDER BY a.attempt});
is(scalar(@gaps), 8, 'eight retries measured');
my @cap = map { my $d = 0.1 * 2**$_; $d > 1 ? 1 : $d } 0 .. 7;
my @bad = grep { $gaps[$_] < $cap[$_] / 2 - 0.02 || $gaps[$_] > $cap[$_] + 0.6 } 0 .. $#gaps;
is(scalar(@bad), 0, 'each delay within [d/2, d] of d = min(100 ms * 2^n, 1 s)')
  or diag("gaps: @gaps");
ok($gaps[0] < 0.4 && $gaps[-1] >= 0.48 && $gaps[-1] <= 1.6, "grows ($gaps[0] s first) and stops at the maximum ($gaps[-1] s last)");

# --- 8. the Stripe-Version header: the configured one, on every request
my $v = stats()->{stripe_versions};
is_deeply([ keys %$v ], ['2026-07-29.dahlia'], 'every request carried Stripe-Version 2026-07-29.dahlia');
$node->append_conf('postgresql.conf', "usage_billing.stripe_version = '2025-09-30.clover'\n");
$node->reload;
sleep(0.5);
ub_add_usage($node, q{'c4'}, 'api_calls', 1);
ok(settle(\&recorded_in_sync), 'exported after changing the version');
ok((stats()->{stripe_versions}{'2025-09-30.clover'} // 0) >= 1, 'the new Stripe-Version is sent after a reload');

# --- 9. unique_count meters: the distinct count reaches Stripe
sql(qq{SELECT usage_billing.increment_usage('c5', 'visitors', 1, NULL, now(), jsonb_build_object('user', u))
  FROM unnest(ARRAY['u1', 'u2', 'u1', 'u3']) u});
ok(settle(sub { (ub_mock_get($mock, 'last')->{'cus_5|visitors'} // 0) == 3 }), 'unique_count: 3 distinct users exported');
sql(q{SELECT usage_billing.increment_usage('c5', 'visitors', 1, NULL, now(), '{"user": "u4"}')});
ok(settle(sub { (ub_mock_get($mock, 'last')->{'cus_5|visitors'} // 0) == 4 }), 'unique_count: then 4');

is(stats()->{violations}, 0, 'no request broke the spec') or diag(explain(stats()->{violation_log}));
my @mismatch = ub_identifier_mismatches($node, $mock);
is(scalar(@mismatch), 0, 'every identifier Stripe accepted is recorded as sent, and only those')
  or diag(join("\n", @mismatch));

$node->stop;
done_testing();
