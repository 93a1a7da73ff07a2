-- catalog_preload: a backend's first miss loads every customer when there are at most
-- usage_billing.catalog_preload_limit; above it, customers are read one by one.  Either way a
-- committed change applies at the next call, in the own transaction too, and a rolled-back one
-- never survives.
SET timezone = 'UTC';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;

-- reltuples exact (the preload trusts it), and no autovacuum ANALYZE, which empties the
-- cache, during the test
ANALYZE usage_billing.customers;

SELECT usage_billing.create_meter('pl_calls', 'sum');
SELECT usage_billing.create_meter('pl_other', 'sum');
SELECT usage_billing.create_plan('pl_small', 0);
SELECT usage_billing.set_plan_limit('pl_small', 'pl_calls', included => 10, hard_cap => true);
SELECT usage_billing.create_plan('pl_large', 0);
SELECT usage_billing.set_plan_limit('pl_large', 'pl_calls', included => 1000);
SELECT usage_billing.upsert_customer(c, 'pl_small', '2025-01-01')
  FROM unnest(ARRAY['pl_a', 'pl_b', 'pl_c']) AS c;

-- what the hot path sees of a customer and meter
CREATE FUNCTION pg_temp.target(text, text DEFAULT 'pl_calls') RETURNS text
LANGUAGE sql AS $$
    SELECT format('%s: allowed=%s included=%s reason=%s', $1, allowed,
                  coalesce(included::text, '-'), coalesce(reason, '-'))
      FROM usage_billing.check_limit($1, $2, 1)
$$;

-- suspends a customer behind the caches' back: with the triggers off nothing is invalidated,
-- so a row cached before still says active and a row read afterwards says suspended
CREATE FUNCTION pg_temp.suspend_quietly(text) RETURNS void
LANGUAGE sql SET session_replication_role = replica AS $$
    UPDATE usage_billing.customers SET status = 'suspended' WHERE customer_id = $1
$$;

-- sets the preload limit to the number of customers plus delta
CREATE FUNCTION pg_temp.preload_limit(delta int) RETURNS text
LANGUAGE sql AS $$
    SELECT CASE WHEN delta >= 0 THEN 'customers + ' || delta ELSE 'customers - ' || -delta END
      FROM (SELECT set_config('usage_billing.catalog_preload_limit',
                              ((SELECT count(*) FROM usage_billing.customers) + delta)::text,
                              false)) AS s
$$;

-- 1. Preload: exactly as many customers as the limit.  The first miss after a reset loads
-- pl_b with pl_a, so the quiet suspension of pl_b is not seen.
SELECT pg_temp.preload_limit(0);
SELECT usage_billing.set_customer_status('pl_b', 'active');	-- a change: the cache is empty
SELECT pg_temp.target('pl_a');
SELECT pg_temp.suspend_quietly('pl_b');
SELECT pg_temp.target('pl_b');

-- 2. One customer too many: customers are read one by one, pl_b after its quiet suspension.
SELECT pg_temp.preload_limit(-1);
SELECT usage_billing.set_customer_status('pl_b', 'active');
SELECT pg_temp.target('pl_a');
SELECT pg_temp.suspend_quietly('pl_b');
SELECT pg_temp.target('pl_b');

-- 3. Off: the same.
SET usage_billing.catalog_preload_limit = 0;
SELECT usage_billing.set_customer_status('pl_b', 'active');
SELECT pg_temp.target('pl_a');
SELECT pg_temp.suspend_quietly('pl_b');
SELECT pg_temp.target('pl_b');
SELECT usage_billing.set_customer_status('pl_b', 'active');

-- 4. Changes after a preload apply at the next call.
SELECT pg_temp.preload_limit(100);
SELECT pg_temp.target('pl_a');
SELECT usage_billing.upsert_customer('pl_a', 'pl_large');	-- plan change
SELECT pg_temp.target('pl_a');
SELECT usage_billing.set_customer_status('pl_a', 'suspended');
SELECT pg_temp.target('pl_a');
SELECT usage_billing.set_customer_status('pl_a', 'active');
SELECT pg_temp.target('pl_a');
SELECT pg_temp.target('pl_new');	-- the preload is complete: not there means no such customer
SELECT usage_billing.upsert_customer('pl_new', 'pl_small', '2025-01-01');
SELECT pg_temp.target('pl_new');
SELECT usage_billing.set_customer_limit('pl_new', 'pl_calls', 50);
SELECT pg_temp.target('pl_new');
SELECT pg_temp.target('pl_new', 'pl_other');	-- unlimited on the plan
SELECT usage_billing.set_customer_limit('pl_new', 'pl_other', 5, hard_cap => true);
SELECT pg_temp.target('pl_new', 'pl_other');
SELECT usage_billing.set_plan_limit('pl_small', 'pl_calls', included => 20, hard_cap => true);
SELECT pg_temp.target('pl_c');
SELECT pg_temp.target('pl_new');	-- the override still wins

-- 5. In the own transaction, and after it commits.
BEGIN;
SELECT pg_temp.target('pl_c');
SELECT usage_billing.set_customer_limit('pl_c', 'pl_calls', 70);
SELECT pg_temp.target('pl_c');
SELECT usage_billing.upsert_customer('pl_d', 'pl_large', '2025-01-01');
SELECT pg_temp.target('pl_d');
COMMIT;
SELECT pg_temp.target('pl_c');
SELECT pg_temp.target('pl_d');

-- 6. Rolled back, whole or to a savepoint: the cache read the uncommitted rows, but they do
-- not survive.
BEGIN;
SELECT usage_billing.set_customer_status('pl_c', 'suspended');
SELECT usage_billing.upsert_customer('pl_e', 'pl_small', '2025-01-01');
SELECT pg_temp.target('pl_c');
SELECT pg_temp.target('pl_e');
ROLLBACK;
SELECT pg_temp.target('pl_c');
SELECT pg_temp.target('pl_e');
BEGIN;
SELECT pg_temp.target('pl_c');
SAVEPOINT s;
SELECT usage_billing.upsert_customer('pl_c', 'pl_large');
SELECT usage_billing.set_customer_limit('pl_c', 'pl_calls', NULL);
SELECT pg_temp.target('pl_c');
ROLLBACK TO SAVEPOINT s;
SELECT pg_temp.target('pl_c');
COMMIT;
SELECT pg_temp.target('pl_c');

-- 7. The same changes read one customer at a time.
SET usage_billing.catalog_preload_limit = 0;
SELECT usage_billing.upsert_customer('pl_a', 'pl_small');
SELECT pg_temp.target('pl_a');
SELECT usage_billing.set_customer_status('pl_a', 'suspended');
SELECT pg_temp.target('pl_a');
SELECT usage_billing.set_customer_status('pl_a', 'active');
SELECT usage_billing.set_customer_limit('pl_a', 'pl_calls', 15);
SELECT pg_temp.target('pl_a');
SELECT pg_temp.target('pl_f');
BEGIN;
SELECT usage_billing.upsert_customer('pl_f', 'pl_large', '2025-01-01');
SELECT usage_billing.set_customer_status('pl_a', 'canceled');
SELECT pg_temp.target('pl_f');
SELECT pg_temp.target('pl_a');
ROLLBACK;
SELECT pg_temp.target('pl_f');
SELECT pg_temp.target('pl_a');
RESET usage_billing.catalog_preload_limit;
SHOW usage_billing.catalog_preload_limit;
