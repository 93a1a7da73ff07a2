# 150_connect.pl - Stripe Connect: customers on two connected accounts and one on the
# platform.  Every request about a customer's events (meter events, cancels, event summaries)
# carries its Stripe-Account; the mock keeps events per account and refuses a customer named
# in another account than its own, so a missing or wrong header fails here.  Stripe's totals
# are compared with what this test recorded (ub_add_usage's book).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

our ($UB_KEY, %UB_BOOK);
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock();
my $node = ub_node('connect', $mock, qq{
usage_billing.reconcile_interval = 0
usage_billing.reconcile_settle = 0
});
ub_customers($node, 1, 3);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub mock_total { return ub_mock_get($mock, 'totals')->{ $_[0] } // 0; }
sub book { return $UB_BOOK{"$_[0]|$_[1]|now()"} // 0; }

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

# what Stripe must hold per account, from the test's own book
sub expected
{
	return {
		'acct_A1:cus_1|api_calls' => book('c1', 'api_calls'),
		'acct_B2:cus_2|api_calls' => book('c2', 'api_calls'),
		'cus_3|api_calls' => book('c3', 'api_calls') };
}
sub in_sync
{
	my $t = ub_mock_get($mock, 'totals');
	my %got = map { $_ => $t->{$_} } grep { /\|api_calls$/ && $t->{$_} } keys %$t;
	return JSON::PP->new->canonical->encode(\%got) eq JSON::PP->new->canonical->encode(expected());
}

ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'worker running');

# --- set_stripe_account: validated like stripe_customer_id (22023), unknown customer P0002
for my $bad ('acct_', 'acct_x y', 'cus_1', 'acct_' . ('a' x 251), "acct_1\nX-Evil: 1")
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"SELECT usage_billing.set_stripe_account('c1', \$\$$bad\$\$)",
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	like($err, qr/22023.*invalid Stripe account id/s, 'refused with 22023: ' . substr($bad, 0, 12));
}
my ($rc, $out, $err) = $node->psql('postgres', q{SELECT usage_billing.set_stripe_account('nobody', 'acct_A1')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/P0002.*customer "nobody" does not exist/s, 'an unknown customer: P0002');
is(sql(q{SELECT count(*) FROM usage_billing.customers WHERE stripe_account IS NOT NULL}), '0', 'nothing half-written');

# c1 on acct_A1, c2 on acct_B2, c3 on the platform; the mock knows each customer in its account only
sql(q{SELECT usage_billing.set_stripe_account('c1', 'acct_A1')});
sql(q{SELECT usage_billing.set_stripe_account('c2', 'acct_B2')});
ub_mock_post($mock, 'customers', { id => 'cus_1', account => 'acct_A1' });
ub_mock_post($mock, 'customers', { id => 'cus_2', account => 'acct_B2' });
ub_mock_post($mock, 'customers', { id => 'cus_3', account => undef });

# --- meter events go to each customer's account
ub_add_usage($node, q{'c1', 'c2', 'c3'}, 'api_calls', 10);
ok(settle(\&in_sync), 'each account holds its customer\'s events');
is(sql(q{SELECT count(*) FROM usage_billing.export_outbox WHERE status <> 'sent'}), '0', 'nothing failed');
is(sql(q{SELECT string_agg(customer_id || ' ' || coalesce(stripe_account, '-'), ', ' ORDER BY customer_id)
  FROM usage_billing.export_outbox}), 'c1 acct_A1, c2 acct_B2, c3 -', 'each outbox row keeps its account');
my $seen = ub_mock_get($mock, 'stats')->{accounts_seen};
ok(($seen->{acct_A1} // 0) >= 1 && ($seen->{acct_B2} // 0) >= 1, 'the mock saw both accounts');

# --- a lowered total: the cancel goes to the account the event went to
ub_add_usage($node, q{'c1'}, 'api_calls', 4, 1);
ok(settle(sub { in_sync() && mock_total('acct_A1:cus_1|api_calls') == 4 }), 'c1 lowered to 4 in acct_A1');
is(ub_mock_get($mock, 'adjustments')->{cancelled}, 1, 'the event was cancelled in its account');
is(sql(q{SELECT status FROM usage_billing.export_cancels WHERE customer_id = 'c1'}), 'cancelled', 'cancel confirmed');

# --- reconciliation reads each customer in its account
ub_mock_post($mock, 'meters', { id => 'mtr_api', event_name => 'api_calls', formula => 'sum' });
sql(q{SELECT usage_billing.set_stripe_meter_id('api_calls', 'mtr_api')});
ub_mock_post($mock, 'lose', { customer => 'cus_2', event_name => 'api_calls', count => 1, account => 'acct_B2' });
is(mock_total('acct_B2:cus_2|api_calls'), 0, 'the mock lost c2\'s event in acct_B2');
is(sql(q{SELECT string_agg(customer_id || ' ' || status || ' ' || coalesce(drift::text, '-'), ', ' ORDER BY customer_id)
  FROM usage_billing.reconcile_stripe()}), 'c1 in_sync 0, c2 resending -10, c3 in_sync 0',
	'reconcile_stripe(): c2 short in its account, the others in sync (no customer read in a wrong account)');
ok(settle(\&in_sync), 'c2\'s 10 sent again to acct_B2');

is(ub_mock_get($mock, 'stats')->{violations}, 0, 'no request broke the spec');
is(ub_mock_get($mock, 'stats')->{statuses}{400} // 0, 0, 'no request was refused (no customer named in a wrong account)');

# --- the mock's own strictness: a customer in the wrong account, a malformed account
my $url = "$mock->{url}/v1/billing/meters/mtr_api/event_summaries?customer=cus_1&start_time=0&end_time=60";
my $r = HTTP::Tiny->new->get($url, { headers => { Authorization => "Bearer $UB_KEY", 'Stripe-Account' => 'acct_B2' } });
ok($r->{status} == 400 && $r->{content} =~ /No such customer/, 'mock: cus_1 looked up in acct_B2 is refused');
$r = HTTP::Tiny->new->get($url, { headers => { Authorization => "Bearer $UB_KEY", 'Stripe-Account' => 'acct_A1' } });
is($r->{status}, 200, 'mock: cus_1 looked up in acct_A1 is answered');
$r = HTTP::Tiny->new->get($url, { headers => { Authorization => "Bearer $UB_KEY", 'Stripe-Account' => 'cus_1' } });
is($r->{status}, 400, 'mock: a malformed Stripe-Account is refused');
is(ub_mock_get($mock, 'stats')->{violations}, 1, 'and counted as a violation');

done_testing();
