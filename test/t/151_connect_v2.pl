# 151_connect_v2.pl - Stripe Connect over the v2 meter event stream
# (usage_billing.stripe_api = 'v2'): customers on two connected accounts and on the
# platform, interleaved in one batch.  Every stream request speaks for one account, named
# with Stripe-Context (v2's header for it); the mock keeps v2 events per account and drops
# a customer named in another account than its own, so a missing, wrong or mixed account
# fails here.  Stripe's totals are compared with what this test recorded (ub_add_usage's
# book); a lowered total is then cancelled (v1, Stripe-Account) in the account the
# stream sent the event to.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our ($UB_KEY, %UB_BOOK);
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock(v2 => 1);
my $node = ub_node('connect_v2', $mock, ub_v2_conf($mock) . qq{
usage_billing.reconcile_interval = 0
usage_billing.reconcile_settle = 0
});
ub_customers($node, 1, 6);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub book { return int($UB_BOOK{"$_[0]|api_calls|now()"} // 0); }

# c1 and c4 on acct_A1, c2 and c5 on acct_B2, c3 and c6 on the platform
my %account = (1 => 'acct_A1', 2 => 'acct_B2', 3 => undef, 4 => 'acct_A1', 5 => 'acct_B2', 6 => undef);

# what Stripe must hold per account, from the test's own book
sub expected
{
	my %e;
	for my $i (sort keys %account)
	{
		my $k = ($account{$i} ? "$account{$i}:" : '') . "cus_$i|api_calls";
		$e{$k} = book("c$i") if book("c$i");
	}
	return \%e;
}
sub got
{
	my $t = ub_mock_get($mock, 'totals');
	return { map { $_ => $t->{$_} } grep { /\|api_calls$/ && $t->{$_} } keys %$t };
}
sub in_sync
{
	return JSON::PP->new->canonical->encode(got()) eq JSON::PP->new->canonical->encode(expected());
}
sub settle
{
	my ($cond) = @_;
	my $ok = ub_settle($node, $mock, $cond, 30);
	diag("Stripe: " . JSON::PP->new->canonical->encode(got())
		. "\nrecorded: " . JSON::PP->new->canonical->encode(expected())
		. "\nreports: " . JSON::PP->new->encode([ @{ ub_mock_get($mock, 'v2')->{error_reports} } ])) unless $ok;
	return $ok;
}

ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'worker running');

for my $i (sort keys %account)
{
	sql("SELECT usage_billing.set_stripe_account('c$i', '$account{$i}')") if $account{$i};
	ub_mock_post($mock, 'customers', { id => "cus_$i", account => $account{$i} });
}

# --- one batch, three accounts interleaved
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers}, 'api_calls', 10);
ub_add_usage($node, q{'c1', 'c2', 'c3'}, 'api_calls', 7);
ok(settle(\&in_sync), 'each account holds its customers\' events, as recorded');
is(sql(q{SELECT count(*) FROM usage_billing.export_outbox WHERE status <> 'sent'}), '0', 'nothing failed');
my $v2 = ub_mock_get($mock, 'v2');
is($v2->{events}, 6, 'six events, all through the stream');
is(scalar @{ $v2->{error_reports} }, 0, 'no event dropped (no customer named in a wrong account)');
my $seen = ub_mock_get($mock, 'stats')->{accounts_seen};
ok(($seen->{acct_A1} // 0) >= 1 && ($seen->{acct_B2} // 0) >= 1, 'the mock saw both accounts\' Stripe-Context');
is(got()->{'cus_3|api_calls'}, 17, 'the platform\'s customer stays on the platform');

# --- deltas: one more event per changed customer, in its account
ub_add_usage($node, q{'c4', 'c5', 'c6'}, 'api_calls', 5);
ok(settle(sub { in_sync() && ub_mock_get($mock, 'v2')->{events} == 9 }), 'deltas sent to each account');

# --- a lowered total: the v1 cancel finds the stream's event in its account
ub_add_usage($node, q{'c4'}, 'api_calls', 3, 1);
ok(settle(sub { in_sync() && (got()->{'acct_A1:cus_4|api_calls'} // 0) == 3 }), 'c4 lowered to 3 in acct_A1');
is(sql(q{SELECT string_agg(status, ',') FROM usage_billing.export_cancels WHERE customer_id = 'c4'}),
	'cancelled,cancelled', 'both of c4\'s events (10 and 5) cancelled, 3 sent again');
is(ub_mock_get($mock, 'adjustments')->{cancelled}, 2, 'the mock cancelled them in acct_A1');

my $stats = ub_mock_get($mock, 'stats');
is($stats->{violations}, 0, 'no request broke the spec');
is($stats->{duplicates}, 0, 'no identifier sent twice');

# --- the mock's own strictness: v2 takes Stripe-Context, not Stripe-Account
my $tok = HTTP::Tiny->new->post("$mock->{url}/v2/billing/meter_event_session",
	{ headers => { Authorization => "Bearer $UB_KEY", 'Content-Type' => 'application/json' }, content => '{}' });
my $token = JSON::PP->new->decode($tok->{content})->{authentication_token};
my $body = JSON::PP->new->encode({ events => [ { event_name => 'api_calls', identifier => 'strict-1',
	timestamp => '2030-01-01T00:00:00.000Z', payload => { stripe_customer_id => 'cus_1', value => '1' } } ] });
for my $h ([ 'Stripe-Account', 'acct_A1' ], [ 'Stripe-Context', 'cus_1' ])
{
	my $r = HTTP::Tiny->new->post("$mock->{events_url}/v2/billing/meter_event_stream",
		{ headers => { Authorization => "Bearer $token", 'Content-Type' => 'application/json', $h->[0] => $h->[1] },
		  content => $body });
	is($r->{status}, 400, "mock: a stream request with $h->[0]: $h->[1] is refused");
}
is(ub_mock_get($mock, 'stats')->{violations}, 2, 'and counted as violations');

done_testing();
