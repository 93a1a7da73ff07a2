-- security: roles, PUBLIC, row-level security for tenants, search_path hijacking, retention
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

-- login roles for the test (cluster-wide: created only if missing)
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['sec_admin', 'sec_writer', 'sec_reader', 'sec_nobody', 'sec_evil', 'authenticated']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;
GRANT usage_billing_admin TO sec_admin;
GRANT usage_billing_writer TO sec_writer, sec_evil;
GRANT usage_billing_reader TO sec_reader;
SELECT usage_billing.grant_tenant_access('authenticated');

-- the three roles exist, cannot log in, and are the only grantees besides the owner
SELECT rolname, rolcanlogin, rolsuper, rolinherit
  FROM pg_roles WHERE rolname LIKE 'usage\_billing\_%' ORDER BY rolname;

-- PUBLIC has nothing: no schema usage, no table, no sequence, no function
SELECT count(*) AS public_schema_acl
  FROM pg_namespace n, aclexplode(n.nspacl) a
 WHERE n.nspname = 'usage_billing' AND a.grantee = 0;
SELECT c.relname, c.relkind
  FROM pg_class c
 WHERE c.relnamespace = 'usage_billing'::regnamespace AND c.relkind IN ('r', 'v', 'S', 'p')
   AND (c.relacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0));
SELECT p.oid::regprocedure AS executable_by_public
  FROM pg_proc p
 WHERE p.pronamespace = 'usage_billing'::regnamespace
   AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0));
-- every function pins its search_path (check_limit, increment_usage and increment_usage_batch,
-- for speed, pin it in C around the SQL they run; the hijack test below covers them)
SELECT p.oid::regprocedure AS unpinned
  FROM pg_proc p
 WHERE p.pronamespace = 'usage_billing'::regnamespace
   AND p.proname NOT IN ('check_limit', 'increment_usage', 'increment_usage_batch')
   AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false);
-- SECURITY DEFINER functions, and who may run them
SELECT p.proname,
       array(SELECT r.rolname FROM aclexplode(p.proacl) a JOIN pg_roles r ON r.oid = a.grantee
              WHERE a.privilege_type = 'EXECUTE' AND r.rolname <> 'postgres' ORDER BY 1) AS grantees
  FROM pg_proc p
 WHERE p.pronamespace = 'usage_billing'::regnamespace AND p.prosecdef
   AND p.proname IN ('create_meter', 'create_plan', 'set_plan_limit', 'upsert_customer', 'set_customer_limit',
                     'set_customer_status', 'increment_usage', 'increment_usage_batch', 'set_tenant_claim',
                     'drop_ledger_before')
 ORDER BY 1;
-- every SECURITY DEFINER function (those of later sections too) is executable by one role only
SELECT p.oid::regprocedure AS definer_not_for_one_role
  FROM pg_proc p
 WHERE p.pronamespace = 'usage_billing'::regnamespace AND p.prosecdef
   AND (SELECT count(*) FROM aclexplode(p.proacl) a JOIN pg_roles r ON r.oid = a.grantee
         WHERE a.privilege_type = 'EXECUTE' AND NOT r.rolsuper) <> 1;
-- and every function that writes is one of them (insight and alert functions when present)
SELECT p.oid::regprocedure AS writer_not_definer
  FROM pg_proc p
 WHERE p.pronamespace = 'usage_billing'::regnamespace AND NOT p.prosecdef
   AND p.proname IN ('void_usage', 'adjust_usage', 'acknowledge_alert', 'flush_alerts', 'retry_failed_exports');
-- every table with a customer_id has row-level security
SELECT c.relname
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'customer_id'
 WHERE c.relnamespace = 'usage_billing'::regnamespace AND c.relkind = 'r' AND NOT c.relrowsecurity;
-- every view reads with the caller's rights
SELECT c.relname
  FROM pg_class c
 WHERE c.relnamespace = 'usage_billing'::regnamespace AND c.relkind = 'v'
   AND NOT coalesce(c.reloptions @> ARRAY['security_invoker=true'], false);

-- the catalog, as an admin
SET ROLE sec_admin;
SELECT usage_billing.create_meter('sec_calls', 'sum');
SELECT usage_billing.create_meter('sec_users', 'unique_count', value_property => 'user');
SELECT usage_billing.create_plan('sec_plan', 10);
SELECT usage_billing.set_plan_limit('sec_plan', 'sec_calls', included => 100, overage_price => 0.5);
SELECT usage_billing.upsert_customer('sec_tenant_a', 'sec_plan');
SELECT usage_billing.upsert_customer('sec_tenant_b', 'sec_plan');
SELECT usage_billing.set_customer_limit('sec_tenant_b', 'sec_calls', 500);
-- an admin does not record usage, and writes no table directly
SELECT total FROM usage_billing.increment_usage('sec_tenant_a', 'sec_calls', 1);
INSERT INTO usage_billing.meters (meter) VALUES ('sec_direct');
UPDATE usage_billing.customers SET plan = 'sec_plan';
RESET ROLE;

-- recording, as a writer
SET ROLE sec_writer;
SELECT total, status, duplicate FROM usage_billing.increment_usage('sec_tenant_a', 'sec_calls', 7, 'sec-a-1');
SELECT total, status, duplicate FROM usage_billing.increment_usage('sec_tenant_b', 'sec_calls', 40, 'sec-b-1');
SELECT total FROM usage_billing.increment_usage('sec_tenant_b', 'sec_users', properties => '{"user": "u1"}');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "sec_tenant_a", "meter": "sec_calls", "amount": 3, "idempotency_key": "sec-a-2"}]');
-- who recorded it: the session's login role, not the function's owner
SELECT DISTINCT recorded_by FROM usage_billing.usage_events WHERE customer_id LIKE 'sec\_%';
-- but not the catalog, and no table directly
SELECT usage_billing.create_meter('sec_by_writer');
SELECT usage_billing.set_customer_status('sec_tenant_a', 'suspended');
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount)
VALUES ('sec_tenant_a', 'sec_calls', now(), now(), 1000);
UPDATE usage_billing.usage_aggregates SET total = 0;
DELETE FROM usage_billing.usage_events;
SELECT usage_billing.drop_ledger_before('2000-01-01');
RESET ROLE;

-- reading, as a reader: every customer, no writes
SET ROLE sec_reader;
SELECT customer_id, meter, total FROM usage_billing.current_usage
 WHERE customer_id LIKE 'sec\_%' ORDER BY 1, 2;
SELECT customer_id, meter, included, overridden FROM usage_billing.effective_limits
 WHERE customer_id LIKE 'sec\_%' ORDER BY 1, 2;
SELECT total FROM usage_billing.increment_usage('sec_tenant_a', 'sec_calls', 1);
SELECT usage_billing.upsert_customer('sec_tenant_c', 'sec_plan');
-- every view and reading function of the schema works for a reader
DO $$
DECLARE
    v regclass;
BEGIN
    FOR v IN SELECT c.oid::regclass FROM pg_class c
              WHERE c.relnamespace = 'usage_billing'::regnamespace AND c.relkind = 'v' ORDER BY 1
    LOOP
        EXECUTE format('SELECT count(*) FROM %s', v);
    END LOOP;
END
$$;
SELECT count(*) >= 0 AS summary_ok FROM usage_billing.get_usage_summary('sec_tenant_b');
SELECT count(*) >= 0 AS invoice_ok FROM usage_billing.preview_invoice('sec_tenant_b');
SELECT count(*) >= 0 AS overage_ok FROM usage_billing.calculate_overage('sec_tenant_b');
SELECT allowed FROM usage_billing.check_limit('sec_tenant_b', 'sec_calls');
SELECT count(*) > 0 AS history_ok FROM usage_billing.usage_history('sec_tenant_b', 'sec_calls', now() - interval '2 days');
SELECT count(*) > 0 AS forecast_ok FROM usage_billing.usage_forecast('sec_tenant_b');
SELECT count(*) > 0 AS report_ok FROM usage_billing.usage_report('sec_tenant_b');
RESET ROLE;

-- a role with no grant: nothing at all
SET ROLE sec_nobody;
SELECT count(*) FROM usage_billing.customers;
SELECT count(*) FROM usage_billing.usage_events;
SELECT total FROM usage_billing.increment_usage('sec_tenant_a', 'sec_calls', 1);
SELECT usage_billing.my_usage();
RESET ROLE;

-- ---------------------------------------------------------------------------
-- Tenants, exactly as PostgREST runs a request
-- ---------------------------------------------------------------------------

-- tenant A sees its own rows only, through every table and view
BEGIN;
SET LOCAL ROLE authenticated;
SET LOCAL request.jwt.claims = '{"sub": "sec_tenant_a", "role": "authenticated"}';
SELECT usage_billing.current_customer_id();
SELECT customer_id, plan FROM usage_billing.customers;
SELECT customer_id, meter, included FROM usage_billing.customer_limits;
SELECT customer_id, meter, amount, idempotency_key FROM usage_billing.usage_events ORDER BY event_id;
SELECT customer_id, meter, total FROM usage_billing.usage_aggregates;
SELECT customer_id, meter FROM usage_billing.usage_unique_values;
SELECT customer_id, meter, total FROM usage_billing.current_usage ORDER BY 1, 2;
SELECT customer_id, meter, included FROM usage_billing.effective_limits ORDER BY 1, 2;
SELECT count(*) FROM usage_billing.usage_events WHERE customer_id = 'sec_tenant_b';
COMMIT;

-- tenant B's rows stay invisible to tenant A's functions
BEGIN;
SET LOCAL ROLE authenticated;
SET LOCAL request.jwt.claims = '{"sub": "sec_tenant_a"}';
SAVEPOINT s;
SELECT meter, total, included FROM usage_billing.my_usage();
ROLLBACK TO s;
SELECT meter, total FROM usage_billing.get_usage_summary('sec_tenant_b');
ROLLBACK TO s;
SELECT * FROM usage_billing.calculate_overage('sec_tenant_b');
ROLLBACK TO s;
SELECT * FROM usage_billing.preview_invoice('sec_tenant_b');
ROLLBACK TO s;
-- check_limit reads through the backend's catalog cache, which RLS cannot filter: not granted
SELECT allowed, current, reason FROM usage_billing.check_limit('sec_tenant_b', 'sec_calls');
ROLLBACK TO s;
SELECT allowed, current, reason FROM usage_billing.check_limit('sec_tenant_a', 'sec_calls');
ROLLBACK TO s;
-- and tenant A cannot record usage, nor write anything
SELECT total FROM usage_billing.increment_usage('sec_tenant_a', 'sec_calls', 1);
ROLLBACK TO s;
SELECT * FROM usage_billing.increment_usage_batch('[]');
ROLLBACK TO s;
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount)
VALUES ('sec_tenant_a', 'sec_calls', now(), now(), -7);
ROLLBACK TO s;
UPDATE usage_billing.usage_aggregates SET total = 0;
ROLLBACK TO s;
SELECT usage_billing.set_tenant_claim('role');
ROLLBACK TO s;
SELECT usage_billing.upsert_customer('sec_tenant_a', 'sec_plan', stripe_customer_id => 'cus_evil');
ROLLBACK TO s;
COMMIT;

-- every table a tenant may read, whatever tables later versions add: no other customer's row
CREATE FUNCTION pg_temp.sec_leak_check(me text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    t regclass;
    n bigint;
    checked int := 0;
    leaks bigint := 0;
BEGIN
    FOR t IN SELECT c.oid::regclass FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
              WHERE c.relnamespace = 'usage_billing'::regnamespace AND a.attname = 'customer_id'
                AND c.relkind IN ('r', 'v') AND has_table_privilege(c.oid, 'SELECT')
    LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE customer_id IS DISTINCT FROM %L', t, me) INTO n;
        leaks := leaks + n;
        checked := checked + 1;
    END LOOP;
    RETURN format('relations checked: %s, rows of other customers seen: %s',
                  CASE WHEN checked >= 7 THEN 'at least 7' ELSE checked::text END,
                  CASE WHEN leaks > 0 THEN 'some' ELSE '0' END);
END
$$;
BEGIN;
SET LOCAL ROLE authenticated;
SET LOCAL request.jwt.claims = '{"sub": "sec_tenant_a"}';
SELECT pg_temp.sec_leak_check('sec_tenant_a') AS tenant_a;
COMMIT;
-- (the check sees other customers' rows where it should: a staff role)
SET ROLE sec_reader;
SELECT pg_temp.sec_leak_check('sec_tenant_a') AS reader;
RESET ROLE;
-- not granted to tenants: the alerts view (it shows hard-cap alerts of every customer still in
-- shared memory), export state, and check_limit
SELECT r AS relation, has_table_privilege('authenticated', r, 'SELECT') AS tenant_can_read
  FROM (SELECT to_regclass(x) AS r
          FROM unnest(ARRAY['usage_billing.alerts', 'usage_billing.export_status', 'usage_billing.export_state',
                            'usage_billing.export_outbox', 'usage_billing.export_attempts']) x) s
 WHERE r IS NOT NULL AND has_table_privilege('authenticated', r, 'SELECT');

-- a request without claims, with an unknown customer, with garbage claims: no rows
BEGIN;
SET LOCAL ROLE authenticated;
SELECT count(*) AS no_claims FROM usage_billing.usage_aggregates;
SAVEPOINT s;
SELECT * FROM usage_billing.my_usage();
ROLLBACK TO s;
SET LOCAL request.jwt.claims = '{"sub": "nobody"}';
SELECT count(*) AS unknown_sub FROM usage_billing.usage_aggregates;
SET LOCAL request.jwt.claims = 'not json';
SELECT count(*) AS garbage FROM usage_billing.usage_aggregates;
SET LOCAL request.jwt.claims = '["sec_tenant_a"]';
SELECT count(*) AS array_claims FROM usage_billing.usage_aggregates;
SET LOCAL request.jwt.claims = '{"sub": {"customer": "sec_tenant_a"}}';
SELECT count(*) AS object_sub FROM usage_billing.usage_aggregates;
COMMIT;

-- the claim is configurable: customer_id instead of sub
SET ROLE sec_admin;
SELECT usage_billing.set_tenant_claim('customer_id');
SELECT usage_billing.set_tenant_claim('');
RESET ROLE;
BEGIN;
SET LOCAL ROLE authenticated;
SET LOCAL request.jwt.claims = '{"sub": "user-123", "customer_id": "sec_tenant_b"}';
SELECT usage_billing.current_customer_id();
SELECT customer_id, meter, total FROM usage_billing.usage_aggregates ORDER BY 1, 2;
COMMIT;
-- older PostgREST: one setting per claim
BEGIN;
SET LOCAL ROLE authenticated;
SET LOCAL request.jwt.claim.customer_id = 'sec_tenant_a';
SELECT usage_billing.current_customer_id();
COMMIT;
DELETE FROM usage_billing.settings;

-- tenant_access refuses staff and superusers
SELECT usage_billing.grant_tenant_access('usage_billing_reader');
SELECT usage_billing.grant_tenant_access('postgres');
SELECT usage_billing.grant_tenant_access('sec_no_such_role');
SET ROLE sec_admin;
SELECT usage_billing.grant_tenant_access('sec_nobody');
RESET ROLE;

-- the Stripe key settings are invisible to the roles (superuser only)
SET ROLE sec_admin;
SHOW usage_billing.stripe_api_key;
SELECT count(*) AS key_rows_in_pg_settings FROM pg_settings WHERE name LIKE 'usage_billing.stripe_api_key%';
SELECT current_setting('usage_billing.stripe_api_key', true) IS NULL AS hidden_from_current_setting;
RESET ROLE;

-- ---------------------------------------------------------------------------
-- search_path hijacking: objects in public shadowing built-ins
-- ---------------------------------------------------------------------------

GRANT CREATE ON SCHEMA public TO sec_evil;
SET ROLE sec_evil;
CREATE TABLE public.sec_hijack_log (who name, what text);
GRANT INSERT ON public.sec_hijack_log TO PUBLIC;
CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sec_hijack_log VALUES (current_user, 'lower');
    RETURN pg_catalog.lower($1);
END $$;
CREATE FUNCTION public.length(text) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sec_hijack_log VALUES (current_user, 'length');
    RETURN pg_catalog.length($1);
END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sec_hijack_log VALUES (current_user, 'now');
    RETURN pg_catalog.now();
END $$;
CREATE FUNCTION public.sec_texteq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sec_hijack_log VALUES (current_user, '=');
    RETURN pg_catalog.texteq($1, $2);
END $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.sec_texteq);
CREATE FUNCTION public.sec_numadd(numeric, numeric) RETURNS numeric LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sec_hijack_log VALUES (current_user, '+');
    RETURN pg_catalog.numeric_add($1, $2);
END $$;
CREATE OPERATOR public.+ (LEFTARG = numeric, RIGHTARG = numeric, FUNCTION = public.sec_numadd);
SET search_path = public, pg_catalog;
-- the trap works for code that does not pin its search_path
SELECT 'abc' = 'abc' AS plain_eq, lower('X') AS plain_lower;
SELECT count(*) > 0 AS trap_works FROM public.sec_hijack_log;
TRUNCATE public.sec_hijack_log;
-- the extension's functions (SECURITY DEFINER ones included) do not fall into it
SELECT total FROM usage_billing.increment_usage('sec_tenant_a', 'sec_calls', 1, 'sec-hijack-1');
SELECT total FROM usage_billing.increment_usage('sec_tenant_a', 'sec_calls', 1, 'sec-hijack-1');
SELECT total FROM usage_billing.increment_usage('sec_tenant_b', 'sec_users', properties => '{"user": "u2"}');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "sec_tenant_a", "meter": "sec_calls", "idempotency_key": "sec-hijack-2"}]');
SELECT allowed FROM usage_billing.check_limit('sec_tenant_a', 'sec_calls');
RESET ROLE;
SET ROLE sec_admin;
SET search_path = public, pg_catalog;
SELECT usage_billing.create_plan('sec_plan_2', 1, 'EUR');
SELECT usage_billing.upsert_customer('sec_tenant_c', 'sec_plan_2');
SELECT usage_billing.set_plan_limit('sec_plan_2', 'sec_calls', tiers => '[{"up_to": null, "unit_price": 1}]');
SELECT usage_billing.set_customer_status('sec_tenant_c', 'canceled');
SELECT usage_billing.set_tenant_claim('sub');
SELECT * FROM usage_billing.drop_ledger_before('2000-01-01');
RESET ROLE;
SET search_path = public, pg_catalog;
SELECT usage_billing.current_customer_id();
RESET search_path;
SELECT who, what FROM public.sec_hijack_log;
SELECT rolsuper FROM pg_roles WHERE rolname = 'sec_evil';
DELETE FROM usage_billing.settings;

-- ---------------------------------------------------------------------------
-- Retention: drop the ledger of ended periods, keep the aggregates
-- ---------------------------------------------------------------------------

SELECT usage_billing.create_plan('sec_ret_plan', 0);
SELECT usage_billing.set_plan_limit('sec_ret_plan', 'sec_calls', included => 10, overage_price => 1);
SELECT usage_billing.upsert_customer('sec_ret', 'sec_ret_plan', '2024-01-01 00:00+00');
SELECT total FROM usage_billing.increment_usage('sec_ret', 'sec_calls', 12, 'ret-1', '2024-01-05 00:00+00');
SELECT total FROM usage_billing.increment_usage('sec_ret', 'sec_calls', 8, 'ret-2', '2024-02-05 00:00+00');
SELECT total FROM usage_billing.increment_usage('sec_ret', 'sec_users', occurred_at => '2024-01-06 00:00+00', properties => '{"user": "x"}');
SELECT total FROM usage_billing.increment_usage('sec_ret', 'sec_calls', 5, 'ret-now');
-- a voided event in January: its correction and its void marker are ledger data too
SELECT total FROM usage_billing.increment_usage('sec_ret', 'sec_calls', 100, 'ret-void', '2024-01-20 00:00+00');
SET ROLE sec_admin;
SELECT usage_billing.void_usage('sec_ret', 'ret-void', 'sent twice by the client');
RESET ROLE;
SELECT count(*) AS void_markers FROM usage_billing.voided_events WHERE customer_id = 'sec_ret';
CREATE TEMP TABLE sec_ret_before AS
SELECT meter, period_start, total, event_count FROM usage_billing.usage_aggregates WHERE customer_id = 'sec_ret';
CREATE TEMP TABLE sec_ret_reads AS
SELECT 'invoice' AS what, p, i::text AS r FROM (VALUES ('2024-01-01'::timestamptz), ('2024-02-01')) v(p),
       LATERAL usage_billing.preview_invoice('sec_ret', p) i
UNION ALL
SELECT 'overage', p, o::text FROM (VALUES ('2024-01-01'::timestamptz), ('2024-02-01')) v(p),
       LATERAL usage_billing.calculate_overage('sec_ret', p) o
UNION ALL
SELECT 'summary', p, s::text FROM (VALUES ('2024-01-01'::timestamptz), ('2024-02-01')) v(p),
       LATERAL usage_billing.get_usage_summary('sec_ret', p, p + interval '1 month') s;
SELECT what, p, r FROM sec_ret_reads WHERE what = 'invoice' ORDER BY p, r;
-- the boundary must be finite and in the past
SELECT * FROM usage_billing.drop_ledger_before(now() + interval '1 day');
SELECT * FROM usage_billing.drop_ledger_before(NULL);
SELECT * FROM usage_billing.drop_ledger_before('infinity');
-- January ended before Feb 1: only its rows go (other tests' old rows may go too: counts are >=)
SELECT periods >= 2 AND events >= 2 AND unique_values >= 1 AS dropped
  FROM usage_billing.drop_ledger_before('2024-02-01 00:00+00');
SELECT * FROM usage_billing.drop_ledger_before('2024-02-01 00:00+00');
SELECT meter, period_start < '2025-01-01' AS old_period, amount
  FROM usage_billing.usage_events WHERE customer_id = 'sec_ret' ORDER BY occurred_at;
SELECT count(*) AS unique_rows_left FROM usage_billing.usage_unique_values WHERE customer_id = 'sec_ret';
SELECT count(*) AS void_markers_left FROM usage_billing.voided_events WHERE customer_id = 'sec_ret';
-- aggregates unchanged
SELECT a.meter, a.period_start, a.total, a.event_count
  FROM usage_billing.usage_aggregates a
  FULL JOIN sec_ret_before b USING (meter, period_start)
 WHERE a.customer_id = 'sec_ret' AND (a.total, a.event_count) IS DISTINCT FROM (b.total, b.event_count);
-- everything up to now (the current period stays)
SELECT periods >= 1 AND events >= 1 AS dropped FROM usage_billing.drop_ledger_before(now());
SELECT amount, idempotency_key FROM usage_billing.usage_events WHERE customer_id = 'sec_ret';
SELECT count(*) AS aggregates_kept FROM usage_billing.usage_aggregates WHERE customer_id = 'sec_ret';
-- invoices, overage and whole-period summaries are unchanged
(SELECT what, p, r FROM sec_ret_reads
 EXCEPT ALL
 (SELECT 'invoice', p, i::text FROM (VALUES ('2024-01-01'::timestamptz), ('2024-02-01')) v(p),
         LATERAL usage_billing.preview_invoice('sec_ret', p) i
  UNION ALL
  SELECT 'overage', p, o::text FROM (VALUES ('2024-01-01'::timestamptz), ('2024-02-01')) v(p),
         LATERAL usage_billing.calculate_overage('sec_ret', p) o
  UNION ALL
  SELECT 'summary', p, s::text FROM (VALUES ('2024-01-01'::timestamptz), ('2024-02-01')) v(p),
         LATERAL usage_billing.get_usage_summary('sec_ret', p, p + interval '1 month') s))
UNION ALL
SELECT 'rows compared', NULL, count(*)::text FROM sec_ret_reads;
-- a dropped key is forgotten: a retry is recorded again (documented)
SELECT total, duplicate FROM usage_billing.increment_usage('sec_ret', 'sec_calls', 12, 'ret-1', '2024-01-05 00:00+00');

-- clean up what is not needed by later tests
DROP TABLE public.sec_hijack_log;
DROP FUNCTION public.lower(text), public.length(text), public.now();
DROP OPERATOR public.= (text, text);
DROP OPERATOR public.+ (numeric, numeric);
DROP FUNCTION public.sec_texteq(text, text), public.sec_numadd(numeric, numeric);
REVOKE CREATE ON SCHEMA public FROM sec_evil;
