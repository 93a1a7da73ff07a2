# 50 sessions race for the last 10 units under a hard cap: exactly 10 succeed,
# the other 40 get PT402, and the total ends exactly at the limit.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('race');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
max_connections = 80
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_meter('race_calls', 'sum');
SELECT usage_billing.create_plan('race_plan', 0);
SELECT usage_billing.set_plan_limit('race_plan', 'race_calls', included => 100, hard_cap => true);
SELECT usage_billing.upsert_customer('racer', 'race_plan');
SELECT usage_billing.increment_usage('racer', 'race_calls', 90);
CREATE TABLE race_outcome (outcome text);
CREATE FUNCTION race_try() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM usage_billing.increment_usage('racer', 'race_calls', 1);
    INSERT INTO race_outcome VALUES ('ok');
EXCEPTION WHEN SQLSTATE 'PT402' THEN
    INSERT INTO race_outcome VALUES ('refused');
END
$$;
});

# every client runs exactly one call, all started together
$node->pgbench(
	'--no-vacuum --client=50 --jobs=2 --transactions=1',
	0,
	[qr{processed: 50/50}],
	[qr{^$}],
	'50 concurrent increments',
	{ 'race' => 'SELECT race_try();' });

is($node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE outcome = 'ok') || '/' || count(*) FILTER (WHERE outcome = 'refused') FROM race_outcome"),
	'10/40', 'exactly 10 of 50 racing calls succeed');
# aggregate_totals: under contention part of a key's total may sit in escrow slots
is($node->safe_psql('postgres',
		"SELECT total FROM usage_billing.aggregate_totals WHERE customer_id = 'racer'"),
	'100', 'the total stops exactly at the limit');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM usage_billing.usage_events WHERE customer_id = 'racer'"),
	'11', 'the ledger holds the first call and the 10 winners only');

# the same race without a cap: N concurrent calls add exactly N
$node->safe_psql('postgres', q{
SELECT usage_billing.create_meter('race_free', 'sum');
SELECT usage_billing.create_meter('race_count', 'count');
});
$node->pgbench(
	'--no-vacuum --client=20 --jobs=2 --transactions=50',
	0,
	[qr{processed: 1000/1000}],
	[qr{^$}],
	'1000 concurrent unlimited increments',
	{ 'free' => "SELECT usage_billing.increment_usage('racer', 'race_free', 0.25); SELECT usage_billing.increment_usage('racer', 'race_count');" });
is($node->safe_psql('postgres',
		"SELECT string_agg(meter || '=' || total, ',' ORDER BY meter) FROM usage_billing.aggregate_totals WHERE customer_id = 'racer' AND meter <> 'race_calls'"),
	'race_count=1000,race_free=250.00', 'concurrent increments are exact');

$node->stop;
done_testing();
