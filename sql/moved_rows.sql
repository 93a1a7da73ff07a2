-- Aggregate rows that move under a backend that read them before: the row moved (an update
-- that is not HOT), its page was cut off by VACUUM, the table was rewritten.  increment_usage
-- and check_limit keep finding the row through its primary key: totals stay exact and nothing
-- fails.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';

SELECT usage_billing.create_meter('rh_calls', 'sum', 'calls');
SELECT usage_billing.create_plan('rh_plan', 0);
SELECT usage_billing.set_plan_limit('rh_plan', 'rh_calls', included => 100000, hard_cap => true);
SELECT count(usage_billing.upsert_customer('rh_' || g, 'rh_plan')) AS customers
  FROM generate_series(1, 400) AS g;

-- 400 rows at the end of the table, over several pages; the reads remember where they are
SELECT count(*) AS recorded
  FROM generate_series(1, 400) AS g, LATERAL usage_billing.increment_usage('rh_' || g, 'rh_calls', g);
SELECT sum(c.current) AS remembered
  FROM generate_series(1, 400) AS g, LATERAL usage_billing.check_limit('rh_' || g, 'rh_calls', 1) AS c;

-- the row of rh_10 moves twice (its key changes and changes back): new TID, new index entry
UPDATE usage_billing.usage_aggregates SET period_start = period_start + interval '1 microsecond'
 WHERE customer_id = 'rh_10' AND meter = 'rh_calls';
UPDATE usage_billing.usage_aggregates SET period_start = period_start - interval '1 microsecond'
 WHERE customer_id = 'rh_10' AND meter = 'rh_calls';
SELECT current FROM usage_billing.check_limit('rh_10', 'rh_calls', 1);
SELECT total FROM usage_billing.increment_usage('rh_10', 'rh_calls', 1);
SELECT current FROM usage_billing.check_limit('rh_10', 'rh_calls', 1);

-- the last pages lose their rows and VACUUM cuts them off: rh_400's row was past the new end
CREATE TEMP TABLE kept AS
SELECT * FROM usage_billing.usage_aggregates
 WHERE customer_id LIKE 'rh\_%' AND substr(customer_id, 4)::int > 300;
DELETE FROM usage_billing.usage_aggregates
 WHERE customer_id LIKE 'rh\_%' AND substr(customer_id, 4)::int > 300;
SELECT pg_relation_size('usage_billing.usage_aggregates') AS size_before \gset
VACUUM usage_billing.usage_aggregates;
SELECT pg_relation_size('usage_billing.usage_aggregates') < :size_before AS truncated;
SELECT current FROM usage_billing.check_limit('rh_400', 'rh_calls', 1);
-- the rows come back elsewhere: found through the index, and remembered there
INSERT INTO usage_billing.usage_aggregates SELECT * FROM kept;
SELECT current FROM usage_billing.check_limit('rh_400', 'rh_calls', 1);
SELECT total FROM usage_billing.increment_usage('rh_400', 'rh_calls', 1);
SELECT current FROM usage_billing.check_limit('rh_400', 'rh_calls', 1);

-- a rewrite gives the table a new file
VACUUM FULL usage_billing.usage_aggregates;
SELECT sum(c.current) AS after_rewrite
  FROM generate_series(1, 400) AS g, LATERAL usage_billing.check_limit('rh_' || g, 'rh_calls', 1) AS c;
SELECT total FROM usage_billing.increment_usage('rh_1', 'rh_calls', 1);

-- through all of it, the aggregates agree with the ledger
SELECT count(*) AS disagreeing
  FROM usage_billing.usage_aggregates a
 WHERE a.customer_id LIKE 'rh\_%'
   AND a.total <> (SELECT sum(e.amount) FROM usage_billing.usage_events e
                    WHERE e.customer_id = a.customer_id AND e.meter = a.meter
                      AND e.period_start = a.period_start);
