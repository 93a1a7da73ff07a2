# 098_export_reason.pl - export_status.reason with a real worker: a server started without a
# Stripe API key says so on every pending row (and the worker sends nothing); once the key is
# configured and the worker has exported, the rows are in sync and the reason is NULL.  The
# admin role reads export_worker_info().  The key never shows in the reason.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $mock = ub_start_mock();
# the last setting wins: the server starts without a key
my $node = ub_node('reason', $mock, "usage_billing.stripe_api_key = ''\n");
ub_customers($node, 1, 3);
$node->safe_psql('postgres', q{SELECT usage_billing.upsert_customer('nocus', 'basic')});
ub_add_usage($node, q{SELECT customer_id FROM usage_billing.customers}, 'api_calls', 5);

ok(ub_wait_for(sub { ub_worker_pid($node) ne '' }, 20), 'the worker runs');
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
sleep(1);
is($node->safe_psql('postgres', q{SELECT state || ': ' || reason FROM usage_billing.export_status
  WHERE customer_id = 'c1'}),
	'pending: no Stripe API key is configured (usage_billing.stripe_api_key or usage_billing.stripe_api_key_file)',
	'without a key a pending row says so');
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_status
  WHERE state = 'pending' AND reason LIKE 'no Stripe API key is configured%'}), '3',
	'every pending row says so');
is($node->safe_psql('postgres', q{SELECT state || ': ' || reason FROM usage_billing.export_status
  WHERE customer_id = 'nocus'}),
	'no_stripe_customer: the customer has no stripe_customer_id', 'a customer without a Stripe id says that');
is(scalar(@{ ub_mock_get($mock, 'events') }), 0, 'nothing was sent');

# the admin role monitors the worker
$node->safe_psql('postgres', q{CREATE ROLE ops LOGIN; GRANT usage_billing_admin TO ops;});
is($node->safe_psql('postgres', q{SELECT preloaded, pid IS NOT NULL FROM usage_billing.export_worker_info()},
	extra_params => [ '-U', 'ops' ]), 't|t', 'usage_billing_admin reads export_worker_info()');

# with the key configured the worker exports, and the reason goes
$node->append_conf('postgresql.conf', "usage_billing.stripe_api_key = '$UB_KEY'\n");
$node->reload;
ok(ub_wait_for(sub { $node->safe_psql('postgres', q{SELECT usage_billing.export_blocker() IS NULL}) eq 't' }, 10),
	'export_blocker() sees the key after the reload');
ok(ub_export_and_wait($node, $mock), 'exported once the key is there');
is($node->safe_psql('postgres', q{SELECT string_agg(state || '/' || coalesce(reason, 'NULL'), ' ' ORDER BY customer_id)
  FROM usage_billing.export_status WHERE customer_id LIKE 'c%'}),
	'in_sync/NULL in_sync/NULL in_sync/NULL', 'rows in sync have no reason');
unlike($node->safe_psql('postgres', q{SELECT string_agg(coalesce(reason, ''), ' ') FROM usage_billing.export_status}),
	qr/\Q$UB_KEY\E/, 'the key is not in any reason');

$node->stop;
ub_stop_mock($mock);
done_testing();
