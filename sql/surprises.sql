-- surprises: what a new user tripped over in 1.3, one block per case
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

-- roles of this test (cluster-wide: created only if missing)
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['sp_admin', 'sp_backend', 'sp_tenant']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;
GRANT usage_billing_admin TO sp_admin;
GRANT usage_billing_service TO sp_backend;
SELECT usage_billing.grant_tenant_access('sp_tenant');

SELECT usage_billing.create_meter('sp_calls', 'sum', 'calls', stripe_event_name => 'sp_calls');
SELECT usage_billing.create_meter('sp_cents', 'sum', 'usd', decimals => 2);
SELECT usage_billing.create_meter('sp_whole', 'sum', 'jobs', decimals => 0);
SELECT usage_billing.create_plan('sp_plan', 10, 'usd', '1 month');
SELECT usage_billing.set_plan_limit('sp_plan', 'sp_calls', included => 10, overage_price => 1);
SELECT usage_billing.upsert_customer('sp_a', 'sp_plan', stripe_customer_id => 'cus_spA');
SELECT usage_billing.upsert_customer('sp_b', 'sp_plan');

-- ---------------------------------------------------------------------------
-- 1. check_limit's status is the projected one: the status increment_usage(requested) would
--    return. With requested => 0 it is the status of the total as it stands, which is what the
--    last increment_usage returned. Included 10, soft threshold 0.8: 7 ok, 8 warning, 11 over.
-- ---------------------------------------------------------------------------
SELECT total, status AS increment_status FROM usage_billing.increment_usage('sp_a', 'sp_calls', 7);
SELECT current, status AS status_now FROM usage_billing.check_limit('sp_a', 'sp_calls', 0);
SELECT current, status AS status_after_1, allowed FROM usage_billing.check_limit('sp_a', 'sp_calls');
SELECT total, status AS increment_status FROM usage_billing.increment_usage('sp_a', 'sp_calls', 1);
SELECT current, status AS status_after_3, allowed, estimated_overage_cost
  FROM usage_billing.check_limit('sp_a', 'sp_calls', 3);
SELECT total, status AS increment_status FROM usage_billing.increment_usage('sp_a', 'sp_calls', 3);
SELECT current, status AS status_now FROM usage_billing.check_limit('sp_a', 'sp_calls', 0);

-- ---------------------------------------------------------------------------
-- 2. current_usage: customer_status (the account) and usage_status (ok / warning / over_limit)
--    are separate columns; status is kept as the old name of customer_status
-- ---------------------------------------------------------------------------
SELECT usage_billing.set_customer_status('sp_a', 'suspended');
SELECT customer_id, meter, total, included, status, customer_status, usage_status
  FROM usage_billing.current_usage WHERE customer_id LIKE 'sp\_%' ORDER BY 1, 2;
SELECT usage_billing.set_customer_status('sp_a', 'active');
SELECT total FROM usage_billing.increment_usage('sp_b', 'sp_calls', 8);
SELECT customer_id, total, customer_status, usage_status
  FROM usage_billing.current_usage WHERE customer_id LIKE 'sp\_%' ORDER BY 1, 2;
SELECT col_description('usage_billing.current_usage'::regclass, 11) AS status_column;

-- ---------------------------------------------------------------------------
-- 3. export_status says why a row is not exported: no Stripe key, no Stripe customer, a worker
--    serving another database (the regression database is not the worker's "postgres")
-- ---------------------------------------------------------------------------
SELECT customer_id, state, pending, reason
  FROM usage_billing.export_status WHERE customer_id LIKE 'sp\_%' ORDER BY 1;
BEGIN;
SET LOCAL usage_billing.stripe_api_key = 'sk_test_surprises';
SELECT customer_id, state, reason
  FROM usage_billing.export_status WHERE customer_id LIKE 'sp\_%' ORDER BY 1;
-- the key itself is never shown
SELECT count(*) AS key_shown FROM usage_billing.export_status WHERE reason LIKE '%sk\_test%';
ROLLBACK;

-- ---------------------------------------------------------------------------
-- 4. export_worker_info() is readable by usage_billing_admin
-- ---------------------------------------------------------------------------
SET ROLE sp_admin;
SELECT preloaded, cycles >= 0 AS counters FROM usage_billing.export_worker_info();
RESET ROLE;

-- ---------------------------------------------------------------------------
-- 5. usage_forecast's projection is rounded to the meter's decimals (half away from zero)
-- ---------------------------------------------------------------------------
SELECT usage_billing.upsert_customer('sp_fc', 'sp_plan');
SELECT count(*) FROM usage_billing.increment_usage('sp_fc', 'sp_cents', 1.01);
SELECT count(*) FROM usage_billing.increment_usage('sp_fc', 'sp_whole', 3);
SELECT count(*) FROM usage_billing.increment_usage('sp_fc', 'sp_calls', 7);
SELECT f.meter, m.decimals,
       min_scale(f.projected) <= m.decimals AS within_decimals,
       abs(f.projected - round(f.current * extract(epoch FROM b.period_end - b.period_start)
                               / extract(epoch FROM now() - b.period_start), m.decimals))
         <= 10 ^ (-m.decimals) AS rounded_formula,
       f.projected_cost IS NOT DISTINCT FROM
         CASE f.meter WHEN 'sp_calls' THEN greatest(f.projected - 10, 0) END AS cost_of_rounded
  FROM usage_billing.usage_forecast('sp_fc') f
  JOIN usage_billing.meters m ON m.meter = f.meter,
       usage_billing.customers c,
       LATERAL usage_billing.period_bounds(c.billing_anchor, '1 month', now()) b
 WHERE c.customer_id = 'sp_fc'
 ORDER BY f.meter;

-- ---------------------------------------------------------------------------
-- 6. usage_history buckets are aligned in UTC: '1 day' at midnight, '1 hour' on the hour,
--    '1 week' on Monday, '3 months' on quarters; an aligned since keeps since + k * bucket;
--    a bucket that mixes months with days has no grid and starts at since
-- ---------------------------------------------------------------------------
SELECT usage_billing.upsert_customer('sp_h', 'sp_plan', '2025-01-01');
SELECT total FROM usage_billing.increment_usage('sp_h', 'sp_calls', 2, 'sph-1', '2025-02-03 09:00');
SELECT total FROM usage_billing.increment_usage('sp_h', 'sp_calls', 3, 'sph-2', '2025-02-03 11:15');
SELECT total FROM usage_billing.increment_usage('sp_h', 'sp_calls', 5, 'sph-3', '2025-02-04 23:59');
SELECT total FROM usage_billing.increment_usage('sp_h', 'sp_calls', 7, 'sph-4', '2025-04-02 00:00');
-- the first bucket is the whole day that contains since (09:00 counts although since is 10:30)
SELECT * FROM usage_billing.usage_history('sp_h', 'sp_calls', '2025-02-03 10:30', '2025-02-06', '1 day');
SELECT * FROM usage_billing.usage_history('sp_h', 'sp_calls', '2025-02-03 10:30', '2025-02-03 13:00', '1 hour');
SELECT * FROM usage_billing.usage_history('sp_h', 'sp_calls', '2025-02-03 11:10', '2025-02-03 11:40', '15 minutes');
-- 2025-02-05 is a Wednesday: its week starts on Monday 2025-02-03
SELECT * FROM usage_billing.usage_history('sp_h', 'sp_calls', '2025-02-05', '2025-02-12', '1 week');
SELECT * FROM usage_billing.usage_history('sp_h', 'sp_calls', '2025-02-14', '2025-07-01', '3 months');
SELECT * FROM usage_billing.usage_history('sp_h', 'sp_calls', '2025-02-14', '2026-01-01', '1 year');
-- since already aligned: the buckets of 1.3
SELECT * FROM usage_billing.usage_history('sp_h', 'sp_calls', '2025-02-03', '2025-02-05', '1 day');
-- no natural grid: since + k * bucket
SELECT * FROM usage_billing.usage_history('sp_h', 'sp_calls', '2025-02-03 10:30', '2025-04-10', '1 mon 1 day');
-- extreme but valid input neither crashes nor errors inside
SELECT count(*) FROM usage_billing.usage_history('sp_h', 'sp_calls', '4713-01-01 00:00:00 BC', '4713-01-03 BC', '1 day');
SELECT count(*) FROM usage_billing.usage_history('sp_h', 'sp_calls', '4713-02-01 00:00:00 BC', '4713-03-01 BC', '1 year');

-- ---------------------------------------------------------------------------
-- 7. nested JWT claim paths: set_tenant_claim('app_metadata.org_id')
-- ---------------------------------------------------------------------------
SELECT usage_billing.set_tenant_claim('app_metadata.org_id');
BEGIN;
SET LOCAL ROLE sp_tenant;
SET LOCAL request.jwt.claims = '{"sub": "user-42", "app_metadata": {"org_id": "sp_b"}}';
SELECT usage_billing.current_customer_id();
SELECT meter, total FROM usage_billing.my_usage();
SELECT DISTINCT customer_id FROM usage_billing.usage_aggregates;
-- the claim is an object or missing: no customer
SET LOCAL request.jwt.claims = '{"app_metadata": {"org_id": {"id": "sp_b"}}}';
SELECT usage_billing.current_customer_id() IS NULL AS object_claim_is_null;
SET LOCAL request.jwt.claims = '{"sub": "sp_b"}';
SELECT usage_billing.current_customer_id() IS NULL AS missing_path_is_null;
-- a number is read as its text
SET LOCAL request.jwt.claims = '{"app_metadata": {"org_id": 42}}';
SELECT usage_billing.current_customer_id();
-- PostgREST before 9: one setting per top-level claim, objects as JSON text
SET LOCAL request.jwt.claims = '';
SET LOCAL request.jwt.claim.app_metadata = '{"org_id": "sp_b"}';
SELECT usage_billing.current_customer_id();
ROLLBACK;
-- a top-level claim whose name has dots (namespaced claims) wins over the path
SELECT usage_billing.set_tenant_claim('https://example.com/org');
BEGIN;
SET LOCAL ROLE sp_tenant;
SET LOCAL request.jwt.claims = '{"https://example.com/org": "sp_a", "https://example": {"com/org": "sp_b"}}';
SELECT usage_billing.current_customer_id();
ROLLBACK;
SELECT usage_billing.set_tenant_claim('app_metadata..org_id');
SELECT usage_billing.set_tenant_claim('.org_id');
SELECT usage_billing.set_tenant_claim('sub');

-- ---------------------------------------------------------------------------
-- 8. usage_billing_service: a backend that records and reads (Supabase's service_role, when
--    it exists at install, is made a member)
-- ---------------------------------------------------------------------------
SELECT pg_has_role('usage_billing_service', 'usage_billing_writer', 'MEMBER') AS writes,
       pg_has_role('usage_billing_service', 'usage_billing_reader', 'MEMBER') AS reads,
       pg_has_role('usage_billing_service', 'usage_billing_admin', 'MEMBER') AS administers;
SET ROLE sp_backend;
SELECT total, status FROM usage_billing.increment_usage('sp_b', 'sp_calls', 1, 'sp-svc-1');
SELECT allowed, current FROM usage_billing.check_limit('sp_b', 'sp_calls');
SELECT meter, total FROM usage_billing.get_usage_summary('sp_b') WHERE meter = 'sp_calls';
SELECT line, amount FROM usage_billing.preview_invoice('sp_b') WHERE line = 'total';
SELECT count(*) AS rows_seen FROM usage_billing.usage_aggregates WHERE customer_id LIKE 'sp\_%';
-- not an admin
SELECT usage_billing.create_meter('sp_nope');
RESET ROLE;
-- it sees every customer: it cannot be a tenant role, nor can its members
SELECT usage_billing.grant_tenant_access('usage_billing_service');
SELECT usage_billing.grant_tenant_access('sp_backend');
-- Supabase: a service_role that exists at install is made a member (in a database of its own)
SELECT current_database() AS regress_db \gset
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN;
    END IF;
END
$$;
SELECT pg_has_role('service_role', 'usage_billing_service', 'MEMBER') AS member_before_install;
CREATE DATABASE sp_supabase;
\c sp_supabase
SET client_min_messages = warning;
CREATE EXTENSION usage_billing;
RESET client_min_messages;
SELECT pg_has_role('service_role', 'usage_billing_service', 'MEMBER') AS member_after_install,
       pg_has_role('service_role', 'usage_billing_admin', 'MEMBER') AS admin_after_install;
\c :regress_db
DROP DATABASE sp_supabase;
DROP ROLE service_role;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

-- ---------------------------------------------------------------------------
-- 9. errors raised to tenants do not point at admin functions; staff still get the hint
-- ---------------------------------------------------------------------------
BEGIN;
SET LOCAL ROLE sp_tenant;
SET LOCAL request.jwt.claims = '{"sub": "sp_a"}';
SAVEPOINT s;
SELECT * FROM usage_billing.get_usage_summary('sp_b');
ROLLBACK TO s;
SELECT * FROM usage_billing.preview_invoice('sp_nobody');
ROLLBACK TO s;
SET LOCAL request.jwt.claims = '{"role": "authenticated"}';
SELECT * FROM usage_billing.my_usage();
ROLLBACK;
SET ROLE sp_admin;
SELECT * FROM usage_billing.get_usage_summary('sp_nobody');
RESET ROLE;
