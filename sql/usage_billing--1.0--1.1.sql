/* usage_billing--1.0--1.1.sql: roles, row-level security, insight and corrections */

\echo Use "ALTER EXTENSION usage_billing UPDATE TO '1.1'" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Insight and corrections
-- ---------------------------------------------------------------------------
-- (insight section: owned by insight)

-- One row per voided usage event: makes voiding twice a no-op and lets readers
-- skip voided events by primary key, without an index on the hot path's ledger.
CREATE TABLE usage_billing.voided_events (
    customer_id text NOT NULL,
    event_id    bigint NOT NULL,        -- the original usage_events.event_id
    voided_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, event_id)  -- customer first: distributable by customer_id
);
COMMENT ON TABLE usage_billing.voided_events IS
    'Usage events voided by void_usage; the void itself is a ledger row of kind ''void''.';
SELECT pg_catalog.pg_extension_config_dump('usage_billing.voided_events', '');

CREATE FUNCTION usage_billing.void_usage(customer_id text, idempotency_key text, reason text)
RETURNS void
AS 'MODULE_PATHNAME', 'ub_void_usage'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.void_usage(text, text, text) IS
    'Voids the usage event recorded with this idempotency key (append-only; voiding twice is a no-op).';

CREATE FUNCTION usage_billing.adjust_usage(
    customer_id text, meter text, delta numeric, reason text,
    occurred_at timestamptz DEFAULT now())
RETURNS void
AS 'MODULE_PATHNAME', 'ub_adjust_usage'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.adjust_usage(text, text, numeric, text, timestamptz) IS
    'Adds delta to the total of a sum or count meter in the period of occurred_at (append-only; never below 0).';

CREATE VIEW usage_billing.usage_corrections AS
SELECT c.event_id, c.kind, c.customer_id, c.meter, c.period_start, c.occurred_at,
       c.amount, c.voided_event_id, o.idempotency_key AS voided_idempotency_key,
       c.reason, c.recorded_by, c.recorded_at
  FROM usage_billing.usage_events c
  LEFT JOIN usage_billing.usage_events o
         ON c.kind = 'void' AND o.event_id = c.voided_event_id AND o.customer_id = c.customer_id
 WHERE c.kind IN ('void', 'adjustment');
COMMENT ON VIEW usage_billing.usage_corrections IS
    'Every void and adjustment of the ledger, with who recorded it, when and why.';

CREATE FUNCTION usage_billing.usage_history(
    customer_id text, meter text, since timestamptz,
    until timestamptz DEFAULT now(), bucket interval DEFAULT '1 day')
RETURNS TABLE (bucket_start timestamptz, usage numeric)
AS 'MODULE_PATHNAME', 'ub_usage_history'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.usage_history(text, text, timestamptz, timestamptz, interval) IS
    'Usage of one meter per bucket (since + k * bucket, UTC) up to until, zeros included, for charts.';

CREATE FUNCTION usage_billing.usage_forecast(customer_id text)
RETURNS TABLE (meter text, current numeric, projected numeric, last_period numeric,
               trend_percent numeric, projected_cost numeric)
AS 'MODULE_PATHNAME', 'ub_usage_forecast'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.usage_forecast(text) IS
    'The current period per meter extrapolated by elapsed time, its trend against the previous period and its projected cost.';

CREATE FUNCTION usage_billing.recommend_plan(customer_id text, periods int DEFAULT 3)
RETURNS TABLE (plan text, cost numeric, current boolean)
AS 'MODULE_PATHNAME', 'ub_recommend_plan'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.recommend_plan(text, int) IS
    'What the last complete billing periods would have cost on each plan of the customer''s currency, cheapest first.';

CREATE FUNCTION usage_billing.usage_report(customer_id text)
RETURNS TABLE (line text)
AS 'MODULE_PATHNAME', 'ub_usage_report'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.usage_report(text) IS
    'The current period for psql: one line per meter with a bar, used / included, overage cost and the period''s end.';

-- ---------------------------------------------------------------------------
-- Security: roles, grants, row-level security
-- ---------------------------------------------------------------------------
-- (security section: owned by security)

/*
 * Vocabulary of the security model
 *   staff role   one of the three roles the extension creates (NOLOGIN, granted to login roles):
 *                usage_billing_admin (catalog, customers, corrections, retention, export),
 *                usage_billing_writer (record and check usage: what a backend service holds),
 *                usage_billing_reader (summaries, invoices, alerts, export status).
 *                Staff roles read every row of every table and write none directly: every write
 *                goes through a function.
 *   writing function  SECURITY DEFINER (owned by the extension owner, search_path pinned) and
 *                executable by the roles listed below only; the tables stay closed to writes.
 *   reading function  SECURITY INVOKER: it reads with the caller's privileges, so row-level
 *                security applies to it exactly as to a plain SELECT.
 *   tenant       any other role granted access with usage_billing.grant_tenant_access() (the
 *                Supabase/PostgREST role "authenticated" when it exists at install time).
 *                Row-level security shows a tenant only the rows of the customer named by its
 *                request: usage_billing.current_customer_id().
 *   tenant claim the JWT claim holding the caller's customer_id (default "sub"), kept in
 *                usage_billing.settings; change it with usage_billing.set_tenant_claim().
 *
 * Roles are cluster-wide: they are created here when missing and are left behind by DROP
 * EXTENSION (another database may use them); see doc/security_operations.md.
 */

DO $roles$
DECLARE
    r text;
    existing record;
BEGIN
    FOREACH r IN ARRAY ARRAY['usage_billing_admin', 'usage_billing_writer', 'usage_billing_reader']
    LOOP
        SELECT rolsuper, rolbypassrls, rolcanlogin INTO existing
          FROM pg_catalog.pg_roles WHERE rolname = r;
        IF NOT FOUND THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        ELSIF existing.rolsuper OR existing.rolbypassrls THEN
            -- a role made beforehand (by someone else?) would defeat row-level security
            RAISE EXCEPTION 'role "%" already exists with SUPERUSER or BYPASSRLS', r
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'usage_billing grants this role access to billing data and relies on row-level security applying to it.',
                      HINT = pg_catalog.format('Drop the role or ALTER ROLE %I NOSUPERUSER NOBYPASSRLS, then retry.', r);
        ELSIF existing.rolcanlogin THEN
            RAISE WARNING 'role "%" already exists and can log in', r
                USING DETAIL = 'usage_billing reuses it; the roles it creates itself are NOLOGIN.',
                      HINT = 'Check who can log in as this role and who is a member of it.';
        END IF;
    END LOOP;
END
$roles$;
COMMENT ON ROLE usage_billing_admin IS
    'usage_billing: catalog, plans, customers, corrections, retention and export settings.';
COMMENT ON ROLE usage_billing_writer IS
    'usage_billing: records and checks usage (increment_usage, increment_usage_batch, check_limit).';
COMMENT ON ROLE usage_billing_reader IS
    'usage_billing: reads summaries, overage, invoices, alerts and export status.';

-- who recorded an event: the login role (inside the SECURITY DEFINER increment_usage,
-- current_user would always be the extension owner)
ALTER TABLE usage_billing.usage_events ALTER COLUMN recorded_by SET DEFAULT session_user;

-- ---------------------------------------------------------------------------
-- Tenant mapping
-- ---------------------------------------------------------------------------

CREATE TABLE usage_billing.settings (
    name  text PRIMARY KEY CHECK (name IN ('tenant_claim')),
    value text NOT NULL CHECK (value <> '' AND length(value) <= 200)
);
COMMENT ON TABLE usage_billing.settings IS
    'Extension settings that must not be changed by a session: tenant_claim (default sub when absent).';

CREATE FUNCTION usage_billing.current_customer_id()
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * The customer of the current request: the tenant claim (default "sub") of the JSON in
 * request.jwt.claims, as PostgREST sets it per transaction; older PostgREST versions set one
 * setting per claim (request.jwt.claim.<name>), read as a fallback.  NULL when there is no
 * request, no such claim, or the claims are not a JSON object: NULL matches no row.
 */
DECLARE
    claim  text;
    raw    text;
    claims jsonb;
BEGIN
    SELECT s.value INTO claim FROM usage_billing.settings s WHERE s.name = 'tenant_claim';
    claim := coalesce(claim, 'sub');
    raw := current_setting('request.jwt.claims', true);
    IF raw IS NULL OR raw = '' THEN
        RETURN nullif(current_setting('request.jwt.claim.' || claim, true), '');
    END IF;
    BEGIN
        claims := raw::jsonb;
    EXCEPTION WHEN invalid_text_representation THEN
        RETURN NULL;
    END;
    IF jsonb_typeof(claims) IS DISTINCT FROM 'object' THEN
        RETURN NULL;
    END IF;
    RETURN nullif(claims ->> claim, '');
END
$$;
COMMENT ON FUNCTION usage_billing.current_customer_id() IS
    'The customer_id of the current PostgREST request (JWT claim named by the tenant_claim setting, default sub), or NULL.';

CREATE FUNCTION usage_billing.set_tenant_claim(claim text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF claim IS NULL OR claim = '' OR length(claim) > 200 THEN
        RAISE EXCEPTION 'invalid tenant claim'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'The claim name must have between 1 and 200 characters.',
                  HINT = 'Name the JWT claim that holds the customer_id, e.g. sub or customer_id.';
    END IF;
    INSERT INTO usage_billing.settings AS s (name, value) VALUES ('tenant_claim', claim)
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value;
END
$$;
COMMENT ON FUNCTION usage_billing.set_tenant_claim(text) IS
    'Names the JWT claim (in request.jwt.claims) that holds a tenant''s customer_id; the default is sub.';

CREATE FUNCTION usage_billing.my_usage()
RETURNS TABLE (
    meter text,
    total numeric,
    event_count bigint,
    included numeric,
    usage_percent numeric,
    overage_quantity numeric,
    overage_cost numeric,
    first_usage timestamptz,
    last_usage timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    me text := usage_billing.current_customer_id();
BEGIN
    IF me IS NULL THEN
        RAISE EXCEPTION 'the request names no customer'
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'request.jwt.claims has no usable tenant claim.',
                  HINT = 'Call my_usage through PostgREST with a signed JWT, or see usage_billing.set_tenant_claim().';
    END IF;
    RETURN QUERY SELECT s.* FROM usage_billing.get_usage_summary(me) s;
END
$$;
COMMENT ON FUNCTION usage_billing.my_usage() IS
    'The caller''s usage in the current billing period (as get_usage_summary), for POST /rpc/my_usage.';

-- ---------------------------------------------------------------------------
-- Retention
-- ---------------------------------------------------------------------------

CREATE FUNCTION usage_billing.drop_ledger_before(before timestamptz)
RETURNS TABLE (periods bigint, events bigint, unique_values bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Deletes the ledger rows and unique-value rows of every (customer, meter, period) whose
 * period ended at or before "before".  Aggregates stay, so totals, summaries of whole periods,
 * overage, invoices and the export are unchanged.  What goes: the events themselves (ranges
 * that are not one billing period, usage_history), and their idempotency keys, which are
 * forgotten: a late retry of a dropped key is recorded again.
 */
DECLARE
    n_periods bigint;
    n_events bigint;
    n_values bigint;
BEGIN
    IF before IS NULL OR NOT isfinite(before) THEN
        RAISE EXCEPTION 'invalid retention boundary'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The boundary must be a finite timestamp, not %s.', coalesce(before::text, 'NULL'));
    END IF;
    IF before > now() THEN
        RAISE EXCEPTION 'cannot drop the ledger of periods that have not ended'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'The boundary is in the future; current billing periods must keep their events.',
                  HINT = 'Give a boundary in the past, e.g. now() - interval ''13 months''.';
    END IF;

    -- no temporary table: a caller could have created one with a trigger of its own
    WITH gone AS (
        DELETE FROM usage_billing.usage_events e
         USING usage_billing.usage_aggregates a
         WHERE a.customer_id = e.customer_id AND a.meter = e.meter
           AND a.period_start = e.period_start AND a.period_end <= before
        RETURNING e.customer_id, e.meter, e.period_start)
    SELECT count(*), count(DISTINCT (g.customer_id, g.meter, g.period_start))
      INTO n_events, n_periods
      FROM gone g;

    DELETE FROM usage_billing.usage_unique_values u
     USING usage_billing.usage_aggregates a
     WHERE a.customer_id = u.customer_id AND a.meter = u.meter
       AND a.period_start = u.period_start AND a.period_end <= before;
    GET DIAGNOSTICS n_values = ROW_COUNT;

    -- void markers of dropped events (corrections, when present) go with them
    IF to_regclass('usage_billing.voided_events') IS NOT NULL THEN
        EXECUTE 'DELETE FROM usage_billing.voided_events v
                  WHERE NOT EXISTS (SELECT 1 FROM usage_billing.usage_events e WHERE e.event_id = v.event_id)';
    END IF;

    RETURN QUERY SELECT n_periods, n_events, n_values;
END
$$;
COMMENT ON FUNCTION usage_billing.drop_ledger_before(timestamptz) IS
    'Retention: deletes ledger and unique-value rows of periods that ended at or before the boundary; aggregates stay.';

-- ---------------------------------------------------------------------------
-- Tenant grants
-- ---------------------------------------------------------------------------

CREATE FUNCTION usage_billing.grant_tenant_access(tenant_role name)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Lets a tenant role (PostgREST's "authenticated") read its own customer's rows: USAGE on the
 * schema, SELECT on the customer tables (row-level security filters them) and the catalog, and
 * EXECUTE on my_usage and the reading functions that run as the invoker (so that row-level
 * security applies inside them).  Nothing that writes.
 */
DECLARE
    t text;
    f regprocedure;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = tenant_role) THEN
        RAISE EXCEPTION 'role "%" does not exist', tenant_role
            USING ERRCODE = 'undefined_object';
    END IF;
    IF tenant_role IN ('usage_billing_admin', 'usage_billing_writer', 'usage_billing_reader')
       OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = tenant_role AND (r.rolsuper OR r.rolbypassrls)) THEN
        RAISE EXCEPTION 'role "%" cannot be a tenant role', tenant_role
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Staff roles, superusers and roles with BYPASSRLS see every customer.';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA usage_billing TO %I', tenant_role);
    FOREACH t IN ARRAY usage_billing.tenant_relations()
    LOOP
        EXECUTE format('GRANT SELECT ON %s TO %I', t, tenant_role);
    END LOOP;
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
              WHERE p.pronamespace = 'usage_billing'::regnamespace
                AND p.proname = ANY (usage_billing.tenant_functions())
                AND (NOT p.prosecdef OR p.proname = 'my_usage')
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, tenant_role);
    END LOOP;
END
$$;
COMMENT ON FUNCTION usage_billing.grant_tenant_access(name) IS
    'Superuser: lets a tenant role (e.g. authenticated) read its own customer''s rows under row-level security.';

CREATE FUNCTION usage_billing.revoke_tenant_access(tenant_role name)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
    f regprocedure;
BEGIN
    FOREACH t IN ARRAY usage_billing.tenant_relations()
    LOOP
        EXECUTE format('REVOKE ALL ON %s FROM %I', t, tenant_role);
    END LOOP;
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
              WHERE p.pronamespace = 'usage_billing'::regnamespace
                AND p.proname = ANY (usage_billing.tenant_functions())
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', f, tenant_role);
    END LOOP;
    EXECUTE format('REVOKE USAGE ON SCHEMA usage_billing FROM %I', tenant_role);
END
$$;
COMMENT ON FUNCTION usage_billing.revoke_tenant_access(name) IS
    'Superuser: undoes grant_tenant_access.';

CREATE FUNCTION usage_billing.tenant_relations()
RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(r ORDER BY r), '{}')
      FROM unnest(ARRAY[
               'usage_billing.meters', 'usage_billing.plans', 'usage_billing.plan_limits',
               'usage_billing.customers', 'usage_billing.customer_limits',
               'usage_billing.usage_events', 'usage_billing.usage_aggregates',
               'usage_billing.usage_unique_values', 'usage_billing.alert_log',
               'usage_billing.effective_limits', 'usage_billing.current_usage',
               'usage_billing.settings']) r
     WHERE to_regclass(r) IS NOT NULL
$$;
COMMENT ON FUNCTION usage_billing.tenant_relations() IS
    'Internal: the tables and views a tenant role may SELECT (customer rows filtered by row-level security).';

CREATE FUNCTION usage_billing.tenant_functions()
RETURNS name[]
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- not check_limit: its customer and limit lookups go through the backend-local catalog
    -- cache (catalog_cache.c), which every role of a backend shares, so row-level security
    -- cannot filter them
    SELECT ARRAY['my_usage', 'current_customer_id', 'period_bounds', 'get_usage_summary',
                 'calculate_overage', 'preview_invoice']::name[]
$$;
COMMENT ON FUNCTION usage_billing.tenant_functions() IS
    'Internal: the functions a tenant role may execute (SECURITY DEFINER ones are skipped, my_usage aside).';

-- ---------------------------------------------------------------------------
-- Row-level security on every table with customer rows
-- ---------------------------------------------------------------------------

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['customers', 'customer_limits', 'usage_events', 'usage_aggregates',
                             'usage_unique_values', 'alert_log', 'export_state', 'export_outbox',
                             'voided_events']
    LOOP
        CONTINUE WHEN to_regclass('usage_billing.' || t) IS NULL;
        EXECUTE format('ALTER TABLE usage_billing.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY staff_all ON usage_billing.%I FOR ALL'
                       ' TO usage_billing_admin, usage_billing_writer, usage_billing_reader'
                       ' USING (true) WITH CHECK (true)', t);
        EXECUTE format('CREATE POLICY tenant_own_rows ON usage_billing.%I FOR SELECT TO PUBLIC'
                       ' USING (customer_id = (SELECT usage_billing.current_customer_id()))', t);
        EXECUTE format('COMMENT ON POLICY staff_all ON usage_billing.%I IS %L', t,
                       'The three usage_billing roles see every row (they write only through functions).');
        EXECUTE format('COMMENT ON POLICY tenant_own_rows ON usage_billing.%I IS %L', t,
                       'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().');
    END LOOP;
END
$rls$;

-- views read with the caller's rights, so row-level security applies through them
DO $views$
DECLARE
    v regclass;
BEGIN
    FOR v IN SELECT c.oid::regclass FROM pg_class c
              WHERE c.relnamespace = 'usage_billing'::regnamespace AND c.relkind = 'v'
    LOOP
        EXECUTE format('ALTER VIEW %s SET (security_invoker = true)', v);
    END LOOP;
END
$views$;

-- ---------------------------------------------------------------------------
-- Privileges: nothing for PUBLIC; writes only through SECURITY DEFINER functions
-- ---------------------------------------------------------------------------

REVOKE ALL ON SCHEMA usage_billing FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA usage_billing FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA usage_billing FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA usage_billing FROM PUBLIC;
GRANT USAGE ON SCHEMA usage_billing TO usage_billing_admin, usage_billing_writer, usage_billing_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA usage_billing TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

DO $grants$
DECLARE
    -- functions that write: SECURITY DEFINER, executable by the listed role only
    admin_writes text[] := ARRAY[
        'create_meter', 'create_plan', 'set_plan_limit', 'upsert_customer', 'set_customer_limit',
        'set_customer_status', 'set_tenant_claim', 'drop_ledger_before', 'acknowledge_alert',
        'flush_alerts', 'void_usage', 'adjust_usage', 'retry_failed_exports'];
    -- needs no table access (wakes the worker through shared memory)
    admin_calls text[] := ARRAY['export_now'];
    writer_writes text[] := ARRAY['increment_usage', 'increment_usage_batch'];
    -- functions that read: SECURITY INVOKER (row-level security applies inside them)
    writer_reads text[] := ARRAY['check_limit', 'period_bounds', 'current_customer_id'];
    reader_reads text[] := ARRAY[
        'check_limit', 'period_bounds', 'current_customer_id', 'my_usage', 'get_usage_summary',
        'calculate_overage', 'preview_invoice', 'pending_alerts',
        'usage_history', 'usage_forecast', 'recommend_plan', 'usage_report'];
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig, p.proname::text AS name
               FROM pg_proc p
              WHERE p.pronamespace = 'usage_billing'::regnamespace
    LOOP
        IF f.name = ANY (admin_writes) OR f.name = ANY (writer_writes) THEN
            EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', f.sig);
        END IF;
        IF f.name = ANY (admin_writes) OR f.name = ANY (admin_calls) OR f.name = ANY (reader_reads) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO usage_billing_admin', f.sig);
        END IF;
        IF f.name = ANY (writer_writes) OR f.name = ANY (writer_reads) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO usage_billing_writer', f.sig);
        END IF;
        IF f.name = ANY (reader_reads) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO usage_billing_reader', f.sig);
        END IF;
    END LOOP;
END
$grants$;

-- ---------------------------------------------------------------------------
-- pg_dump keeps the data of every table (and the ledger's identity sequence)
-- ---------------------------------------------------------------------------

DO $dump$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['meters', 'plans', 'plan_limits', 'customers', 'customer_limits',
                             'usage_events', 'usage_aggregates', 'usage_unique_values', 'settings',
                             'alert_log', 'export_state', 'export_outbox', 'export_attempts',
                             'export_settings', 'voided_events']
    LOOP
        CONTINUE WHEN to_regclass('usage_billing.' || t) IS NULL;
        PERFORM pg_catalog.pg_extension_config_dump('usage_billing.' || t, '');
    END LOOP;
    FOR t IN SELECT c.oid::regclass::text FROM pg_class c
              WHERE c.relnamespace = 'usage_billing'::regnamespace AND c.relkind = 'S'
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(t, '');
    END LOOP;
END
$dump$;

-- the Supabase / PostgREST tenant role, when it exists already
DO $tenant$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        PERFORM usage_billing.grant_tenant_access('authenticated');
    END IF;
END
$tenant$;

-- ---------------------------------------------------------------------------
-- Export corrections (block owned by export_cancel.c): export_cancels follows export_state
-- and export_outbox — row-level security with the same two policies, data kept by pg_dump.
-- (Its SELECT grant to the three roles and the REVOKEs from PUBLIC come from the blocks above.)
-- ---------------------------------------------------------------------------
DO $cancels$
BEGIN
    ALTER TABLE usage_billing.export_cancels ENABLE ROW LEVEL SECURITY;
    CREATE POLICY staff_all ON usage_billing.export_cancels FOR ALL
        TO usage_billing_admin, usage_billing_writer, usage_billing_reader
        USING (true) WITH CHECK (true);
    CREATE POLICY tenant_own_rows ON usage_billing.export_cancels FOR SELECT TO PUBLIC
        USING (customer_id = (SELECT usage_billing.current_customer_id()));
    COMMENT ON POLICY staff_all ON usage_billing.export_cancels IS
        'The three usage_billing roles see every row (they write only through functions).';
    COMMENT ON POLICY tenant_own_rows ON usage_billing.export_cancels IS
        'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';
    PERFORM pg_catalog.pg_extension_config_dump('usage_billing.export_cancels', '');
END
$cancels$;
