# The direct writes under concurrent load: 8 clients mix single calls (direct and, in their own
# transactions, SQL), batches with keys shared across batches and single calls, and repeated
# idempotency keys, on few customers so that aggregates and keys collide all the time.  Bounded
# by a transaction count, not time.  Afterwards every aggregate must equal what its ledger rows
# say (sum, count, max, last), every key must be recorded once, and nothing may have failed
# (in particular no deadlock between batches that share keys).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('direct_load');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
max_connections = 40
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_meter('l_sum', 'sum');
SELECT usage_billing.create_meter('l_count', 'count');
SELECT usage_billing.create_meter('l_max', 'max');
SELECT usage_billing.create_meter('l_last', 'last');
SELECT usage_billing.create_plan('l_plan', 0);
SELECT usage_billing.upsert_customer('lc' || g, 'l_plan') FROM generate_series(1, 6) g;
});

# A key always names the same event (idempotency is exact: a key repeated with other parameters
# is refused): its customer, meter, amount and occurred_at follow from the key's number.  The
# occurred_at of keyed events lies an hour before the start, distinct per key; unkeyed calls use
# clock_timestamp(), distinct per call, so "last" has one answer.  Count meters take amount 1.
my $base = $node->safe_psql('postgres', q{SELECT now() - interval '1 hour'});
sub keyed
{
	my ($k) = @_;
	return qq{'lc' || (:$k % 6 + 1), (ARRAY['l_sum', 'l_count', 'l_max', 'l_last'])[:$k % 4 + 1],
  CASE WHEN :$k % 4 = 1 THEN 1 ELSE :$k END, 'k' || :$k, '$base'::timestamptz + :$k * interval '1 millisecond'};
}
sub keyed_json
{
	my ($k) = @_;
	return qq{jsonb_build_object('customer_id', 'lc' || (:$k % 6 + 1), 'meter', (ARRAY['l_sum', 'l_count', 'l_max', 'l_last'])[:$k % 4 + 1],
                     'amount', CASE WHEN :$k % 4 = 1 THEN 1 ELSE :$k END, 'idempotency_key', 'k' || :$k,
                     'occurred_at', '$base'::timestamptz + :$k * interval '1 millisecond')};
}
my $amount = q{CASE WHEN :m = 2 THEN 1 ELSE :a END};

my $pick = q{
\set c random(1, 6)
\set m random(1, 4)
\set a random(1, 1000)
\set k random(1, 400)
};
my $meter = q{(ARRAY['l_sum', 'l_count', 'l_max', 'l_last'])[:m]};
my %scripts = (
	'single_direct' => $pick . qq{
SELECT duplicate FROM usage_billing.increment_usage(} . keyed('k') . qq{);
},
	'single_sql' => $pick . qq{
BEGIN;
SET LOCAL usage_billing.direct_writes = off;
SELECT duplicate FROM usage_billing.increment_usage(} . keyed('k') . qq{);
COMMIT;
},
	'batch' => q{
\set c1 random(1, 6)
\set c2 random(1, 6)
\set m1 random(1, 4)
\set m2 random(1, 4)
\set k1 random(1, 400)
\set k2 random(1, 400)
\set k3 random(1, 400)
SELECT accepted + duplicates FROM usage_billing.increment_usage_batch(jsonb_build_array(
  } . keyed_json('k1') . q{,
  } . keyed_json('k2') . q{,
  } . keyed_json('k3') . q{,
  jsonb_build_object('customer_id', 'lc' || :c2, 'meter', (ARRAY['l_sum', 'l_count', 'l_max', 'l_last'])[:m2],
                     'amount', CASE WHEN :m2 = 2 THEN 1 ELSE 7 END, 'occurred_at', clock_timestamp()),
  jsonb_build_object('customer_id', 'lc' || :c1, 'meter', 'l_sum', 'amount', 1)));
},
	'no_key' => $pick . qq{
SELECT total FROM usage_billing.increment_usage('lc' || :c, $meter, $amount, occurred_at => clock_timestamp());
},);

$node->pgbench(
	'--no-vacuum --client=8 --jobs=2 --transactions=250',
	0,
	[qr{processed: 2000/2000}],
	[qr{^$}],
	'2,000 mixed transactions from 8 clients, none failed',
	\%scripts);

my $events = $node->safe_psql('postgres', 'SELECT count(*) FROM usage_billing.usage_events');
cmp_ok($events, '>', 1500, "the load recorded events ($events)");
is($node->safe_psql('postgres', q{
SELECT count(*) FROM (SELECT customer_id, idempotency_key FROM usage_billing.usage_events
                       WHERE idempotency_key IS NOT NULL
                       GROUP BY 1, 2 HAVING count(*) > 1) d}),
	'0', 'every idempotency key is recorded once');

# every aggregate against its ledger rows, read with its escrow slots (aggregate_totals)
my $mismatch_q = q{
WITH l AS (
    SELECT customer_id, meter, period_start, count(*) AS n, sum(amount) AS s, max(amount) AS mx,
           (array_agg(amount ORDER BY occurred_at DESC))[1] AS latest,
           count(*) FILTER (WHERE occurred_at = (SELECT max(occurred_at) FROM usage_billing.usage_events i
                                                  WHERE i.customer_id = e.customer_id AND i.meter = e.meter
                                                    AND i.period_start = e.period_start)) AS ties
      FROM usage_billing.usage_events e
     GROUP BY 1, 2, 3)
SELECT customer_id || '/' || meter || ': total ' || coalesce(a.total::text, 'none')
       || ', events ' || coalesce(a.event_count::text, 'none')
       || ' vs ledger ' || coalesce(l.n::text, 'none') || ' rows, sum ' || coalesce(l.s::text, '-')
       || ', max ' || coalesce(l.mx::text, '-') || ', latest ' || coalesce(l.latest::text, '-')
  FROM usage_billing.aggregate_totals a
  FULL JOIN l USING (customer_id, meter, period_start)
 WHERE l.n IS NULL OR a.event_count IS DISTINCT FROM l.n
    OR a.total IS DISTINCT FROM CASE meter WHEN 'l_sum' THEN l.s
                                           WHEN 'l_count' THEN l.n
                                           WHEN 'l_max' THEN l.mx
                                           WHEN 'l_last' THEN CASE WHEN l.ties = 1 THEN l.latest ELSE a.total END
                                END
 ORDER BY 1};
is($node->safe_psql('postgres', $mismatch_q), '',
	'every aggregate equals its ledger rows (sum, count, max, last)');
# the check itself sees a wrong total, a missing aggregate and an aggregate without events
is($node->safe_psql('postgres', qq{
BEGIN;
UPDATE usage_billing.usage_aggregates SET total = total + 1 WHERE customer_id = 'lc1' AND meter = 'l_sum';
DELETE FROM usage_billing.usage_aggregates WHERE customer_id = 'lc2' AND meter = 'l_max';
INSERT INTO usage_billing.usage_aggregates (customer_id, meter, period_start, period_end, total, event_count)
VALUES ('lc3', 'l_sum', '2001-01-01', '2001-02-01', 5, 1);
SELECT count(*) FROM ($mismatch_q) m;
ROLLBACK;
}), '3', 'the check reports a wrong total, a missing aggregate and an aggregate without events');
is($node->safe_psql('postgres', q{
SELECT count(DISTINCT (customer_id, meter, period_start)) FROM usage_billing.usage_events}),
	$node->safe_psql('postgres', 'SELECT count(*) FROM usage_billing.usage_aggregates'),
	'one aggregate per (customer, meter, period) recorded');

$node->stop;
done_testing();
