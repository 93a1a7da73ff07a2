-- usage_billing 1.4 -> 1.5: scale-out on Citus, Stripe reconciliation and v2 streams.
\echo Use "ALTER EXTENSION usage_billing UPDATE" to load this file. \quit

-- Sections are added below, one per subsystem; usage_billing--1.5.sql holds the same objects
-- for a fresh install.

-- ---------------------------------------------------------------------------
-- Scale-out: one-call distribution on Citus (doc/scaling.md)
-- ---------------------------------------------------------------------------

CREATE FUNCTION usage_billing.citus_distributed()
RETURNS boolean
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'ub_citus_distributed';
COMMENT ON FUNCTION usage_billing.citus_distributed() IS
    'Internal: whether the schema is distributed with Citus (distribute_with_citus() ran); every node of such a cluster says true.';
REVOKE ALL ON FUNCTION usage_billing.citus_distributed() FROM PUBLIC;

CREATE FUNCTION usage_billing.citus_prepare_schema()
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Internal, run by distribute_with_citus() on every node (each node has the extension's own
 * copy of the tables, which Citus uses as the shells of the distributed ones, so they must
 * agree): changes what Citus refuses.  Returns the number of changes; the foreign keys it
 * dropped wait in the temporary table ub_citus_fks, to be added again once both sides are
 * distributed.
 */
DECLARE
    dist_tables constant text[] := ARRAY['customers', 'customer_limits', 'customer_plans',
        'usage_events', 'usage_aggregates', 'usage_aggregate_slots', 'usage_unique_values',
        'voided_events', 'alert_log', 'reservations', 'invoice_starts', 'invoiced_totals',
        'invoices', 'invoice_lines', 'export_state', 'export_outbox', 'export_attempts',
        'export_cancels', 'stripe_reconciliation'];
    ours constant text[] := dist_tables || ARRAY['meters', 'plans', 'plan_limits', 'settings',
                                                  'export_epoch'];
    r record;
    changed integer := 0;
BEGIN
    -- only the logical tables: a worker's internal connections also see the shards
    -- (customers_102008, ...), which Citus keeps in step itself
    CREATE TEMPORARY TABLE IF NOT EXISTS ub_citus_fks (stmt text) ON COMMIT DROP;
    -- 1. triggers Citus refuses on reference and distributed tables
    FOR r IN SELECT tg.tgname, c.relname
               FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
              WHERE c.relnamespace = 'usage_billing'::regnamespace AND NOT tg.tgisinternal
                AND c.relname = ANY (ours)
                AND tg.tgfoid IN ('usage_billing.catalog_changed()'::regprocedure,
                                  'usage_billing.invoice_immutable()'::regprocedure)
    LOOP
        EXECUTE format('DROP TRIGGER %I ON usage_billing.%I', r.tgname, r.relname);
        changed := changed + 1;
    END LOOP;
    -- finalized invoices: no role but the owner (the extension's functions) changes them
    IF EXISTS (SELECT 1 FROM pg_class c
                CROSS JOIN (VALUES ('PUBLIC'), ('usage_billing_admin'), ('usage_billing_writer'),
                                   ('usage_billing_reader')) g(role)
                WHERE c.oid IN ('usage_billing.invoices'::regclass, 'usage_billing.invoice_lines'::regclass)
                  AND (g.role = 'PUBLIC' AND c.relacl::text ~ '(^|[{,])=[a-zA-Z]*[wdD]'
                       OR g.role <> 'PUBLIC' AND has_table_privilege(g.role, c.oid, 'UPDATE,DELETE,TRUNCATE'))) THEN
        REVOKE UPDATE, DELETE, TRUNCATE ON usage_billing.invoices, usage_billing.invoice_lines FROM PUBLIC;
        REVOKE UPDATE, DELETE, TRUNCATE ON usage_billing.invoices, usage_billing.invoice_lines
            FROM usage_billing_admin, usage_billing_writer, usage_billing_reader;
        changed := changed + 1;
    END IF;

    -- 2. tenant policies without a subquery (current_customer_id() is stable: one value a statement)
    FOR r IN SELECT p.tablename FROM pg_policies p
              WHERE p.schemaname = 'usage_billing' AND p.policyname = 'tenant_own_rows'
                AND p.tablename = ANY (ours)
                AND p.qual LIKE '%SELECT usage_billing.current_customer_id()%'
    LOOP
        EXECUTE format('ALTER POLICY tenant_own_rows ON usage_billing.%I'
                       ' USING (customer_id = usage_billing.current_customer_id())', r.tablename);
        changed := changed + 1;
    END LOOP;

    -- 3. foreign keys between our tables: dropped now, added again once both sides are placed
    FOR r IN SELECT c.conname, c.conrelid::regclass AS rel, pg_get_constraintdef(c.oid) AS def,
                    cf.relname AS target
               FROM pg_constraint c JOIN pg_class cf ON cf.oid = c.confrelid
              JOIN pg_class cl ON cl.oid = c.conrelid
              WHERE c.contype = 'f' AND c.connamespace = 'usage_billing'::regnamespace
                AND cl.relname = ANY (ours)
                AND NOT EXISTS (SELECT 1 FROM pg_dist_partition d WHERE d.logicalrelid = c.conrelid)
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.rel, r.conname);
        -- keys to distributed tables must include the distribution column
        IF r.target = 'invoices' THEN
            r.def := 'FOREIGN KEY (customer_id, invoice_id) REFERENCES usage_billing.invoices(customer_id, invoice_id)'
                     ' DEFERRABLE INITIALLY DEFERRED';
        ELSIF r.target = 'export_outbox' THEN
            r.def := 'FOREIGN KEY (customer_id, outbox_id) REFERENCES usage_billing.export_outbox(customer_id, outbox_id)'
                     ' ON DELETE CASCADE';
        END IF;
        INSERT INTO pg_temp.ub_citus_fks VALUES (format('ALTER TABLE %s ADD CONSTRAINT %I %s', r.rel, r.conname, r.def));
        changed := changed + 1;
    END LOOP;

    -- 4. unique keys that do not start with customer_id
    FOR r IN SELECT c.conname, c.conrelid::regclass AS rel, c.contype, cl.relname,
                    array_agg(a.attname ORDER BY k.ord) AS cols
               FROM pg_constraint c
               JOIN pg_class cl ON cl.oid = c.conrelid
               CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
              WHERE c.contype IN ('p', 'u') AND c.connamespace = 'usage_billing'::regnamespace
                AND cl.relname = ANY (dist_tables)
              GROUP BY 1, 2, 3, 4
             HAVING NOT ('customer_id' = ANY (array_agg(a.attname)))
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.rel, r.conname);
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s (customer_id, %s)', r.rel, r.conname,
                       CASE r.contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END,
                       (SELECT string_agg(quote_ident(x), ', ') FROM unnest(r.cols) x));
        changed := changed + 1;
    END LOOP;

    RETURN changed;
END
$$;
COMMENT ON FUNCTION usage_billing.citus_prepare_schema() IS
    'Internal: the schema changes distribute_with_citus() makes on every node before distributing.';
REVOKE ALL ON FUNCTION usage_billing.citus_prepare_schema() FROM PUBLIC;

CREATE FUNCTION usage_billing.distribute_with_citus()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Distributes the schema on a Citus cluster, on the coordinator, in one transaction:
 * the catalog becomes reference tables, every table with customer rows is distributed by
 * customer_id and co-located with customers, and the per-customer functions are routed to the
 * node that holds their customer.  What Citus refuses is changed first: the catalog's
 * invalidation triggers and the invoices' immutability triggers are dropped (distributed
 * backends read the catalog with SQL on every call; invoices are protected by privileges),
 * foreign keys are dropped and added again once both sides are distributed, the tenant
 * policies lose their subquery, and the export and invoice keys gain customer_id.
 * Idempotent: a second call finds everything in place and says so.
 */
DECLARE
    ref_tables constant text[] := ARRAY['meters', 'plans', 'plan_limits', 'settings', 'export_epoch'];
    dist_tables constant text[] := ARRAY['customers', 'customer_limits', 'customer_plans',
        'usage_events', 'usage_aggregates', 'usage_aggregate_slots', 'usage_unique_values',
        'voided_events', 'alert_log', 'reservations', 'invoice_starts', 'invoiced_totals',
        'invoices', 'invoice_lines', 'export_state', 'export_outbox', 'export_attempts',
        'export_cancels', 'stripe_reconciliation'];
    routed constant text[] := ARRAY[
        'usage_billing.increment_usage(text,text,numeric,text,timestamptz,jsonb)',
        'usage_billing.record_duration(text,text,timestamptz,timestamptz,text)',
        'usage_billing.reserve_usage(text,text,numeric,interval,text)',
        'usage_billing.check_limit(text,text,numeric)',
        'usage_billing.get_usage_summary(text,timestamptz,timestamptz)',
        'usage_billing.calculate_overage(text,timestamptz)',
        'usage_billing.preview_invoice(text,timestamptz)',
        'usage_billing.price_period(text,timestamptz)',
        'usage_billing.usage_history(text,text,timestamptz,timestamptz,interval)',
        'usage_billing.usage_forecast(text)',
        'usage_billing.recommend_plan(text,integer)',
        'usage_billing.usage_report(text)',
        'usage_billing.void_usage(text,text,text)',
        'usage_billing.adjust_usage(text,text,numeric,text,timestamptz)',
        'usage_billing.plan_at(text,timestamptz)'];
    fks text[] := '{}';
    t text;
    f text;
    r record;
    changed integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'usage_billing.distribute_with_citus() distributes the tables with Citus.',
                  HINT = 'Add citus to shared_preload_libraries on every node, CREATE EXTENSION citus, '
                         'add the workers with citus_add_node(), then call it again on the coordinator.';
    END IF;
    IF NOT pg_catalog.citus_is_coordinator() THEN
        RAISE EXCEPTION 'usage_billing.distribute_with_citus() runs on the coordinator'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Call it on the coordinator: it distributes the tables for the whole cluster.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node WHERE noderole = 'primary' AND groupid <> 0) THEN
        RAISE EXCEPTION 'the Citus cluster has no worker nodes'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Add the workers with citus_add_node() first: shards are placed on the nodes present.';
    END IF;

    -- foreign keys to reference tables: one connection per node for the whole transaction
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);

    -- distributed, hot keys take the row path: what escrow slots hold goes back into the rows
    IF NOT EXISTS (SELECT 1 FROM pg_dist_partition
                    WHERE logicalrelid = 'usage_billing.usage_aggregate_slots'::regclass) THEN
        PERFORM usage_billing.fold_escrow_slots();
    END IF;

    -- 1-4. the schema changes Citus needs, on every node (each has the extension's own tables)
    changed := usage_billing.citus_prepare_schema();
    FOR r IN SELECT * FROM run_command_on_workers('SELECT usage_billing.citus_prepare_schema()') LOOP
        IF NOT r.success THEN
            RAISE EXCEPTION 'preparing the schema on %:% failed: %', r.nodename, r.nodeport, r.result
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'CREATE EXTENSION usage_billing must have run on every node (Citus does it when the '
                             'extension is created on the coordinator after the workers were added).';
        END IF;
        changed := changed + r.result::integer;
    END LOOP;
    FOR r IN SELECT * FROM pg_temp.ub_citus_fks LOOP
        fks := fks || r.stmt;
    END LOOP;

    -- 5. the catalog on every node, customer rows in co-located shards
    FOREACH t IN ARRAY ref_tables LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_partition
                               WHERE logicalrelid = ('usage_billing.' || t)::regclass);
        PERFORM create_reference_table(('usage_billing.' || t)::regclass);
        changed := changed + 1;
    END LOOP;
    FOREACH t IN ARRAY dist_tables LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_partition
                               WHERE logicalrelid = ('usage_billing.' || t)::regclass);
        IF t = 'customers' THEN
            PERFORM create_distributed_table('usage_billing.customers', 'customer_id');
        ELSE
            PERFORM create_distributed_table(('usage_billing.' || t)::regclass, 'customer_id',
                                             colocate_with => 'usage_billing.customers');
        END IF;
        changed := changed + 1;
    END LOOP;
    FOREACH t IN ARRAY fks LOOP
        EXECUTE t;
    END LOOP;

    -- 6. per-customer functions run on the node of their customer
    FOREACH f IN ARRAY routed LOOP
        CONTINUE WHEN to_regprocedure(f) IS NULL;
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_object o
                               WHERE o.classid = 'pg_proc'::regclass AND o.objid = to_regprocedure(f)
                                 AND o.distribution_argument_index = 0
                                 AND o.colocationid = (SELECT colocationid FROM pg_dist_partition
                                                        WHERE logicalrelid = 'usage_billing.customers'::regclass));
        PERFORM create_distributed_function(f::regprocedure, distribution_arg_name => 'customer_id',
                                            colocate_with => 'usage_billing.customers');
        changed := changed + 1;
    END LOOP;

    IF changed = 0 THEN
        RAISE NOTICE 'usage_billing is already distributed: nothing to do';
    ELSE
        RAISE NOTICE 'usage_billing distributed with Citus (% changes)', changed;
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.distribute_with_citus() IS
    'On a Citus coordinator: reference tables for the catalog, every customer table distributed and co-located by customer_id, the per-customer functions routed. Idempotent.';
REVOKE ALL ON FUNCTION usage_billing.distribute_with_citus() FROM PUBLIC;

-- The limits in force now, without a function call per row: Citus runs a view's query on the
-- shards, where plan_at()'s own query (a query from inside a query on a shard) cannot run.
-- The plan in force is the latest history row that has begun, else the customer's plan, as
-- plan_at(customer_id, now()) says.
CREATE OR REPLACE VIEW usage_billing.effective_limits WITH (security_invoker = true) AS
SELECT c.customer_id, pl.meter,
       CASE WHEN cl.customer_id IS NOT NULL THEN cl.included ELSE pl.included END AS included,
       coalesce(cl.hard_cap, pl.hard_cap) AS hard_cap,
       pl.overage_price, pl.overage_unit, pl.soft_threshold, pl.tiers, pl.tier_mode,
       cl.customer_id IS NOT NULL AS overridden
  FROM usage_billing.customers c
  LEFT JOIN (SELECT DISTINCT ON (h.customer_id) h.customer_id, h.plan
               FROM usage_billing.customer_plans h
              WHERE h.effective_from <= now()
              ORDER BY h.customer_id, h.effective_from DESC) h ON h.customer_id = c.customer_id
  JOIN usage_billing.plan_limits pl ON pl.plan = coalesce(h.plan, c.plan)
  LEFT JOIN usage_billing.customer_limits cl ON cl.customer_id = c.customer_id AND cl.meter = pl.meter
UNION ALL
SELECT cl.customer_id, cl.meter, cl.included, coalesce(cl.hard_cap, false),
       NULL, 1, 0.8, NULL, 'graduated', true
  FROM usage_billing.customer_limits cl
  JOIN usage_billing.customers c ON c.customer_id = cl.customer_id
  LEFT JOIN (SELECT DISTINCT ON (h.customer_id) h.customer_id, h.plan
               FROM usage_billing.customer_plans h
              WHERE h.effective_from <= now()
              ORDER BY h.customer_id, h.effective_from DESC) h ON h.customer_id = c.customer_id
  LEFT JOIN usage_billing.plan_limits pl ON pl.plan = coalesce(h.plan, c.plan) AND pl.meter = cl.meter
 WHERE pl.plan IS NULL;

-- plan_at in PL/pgSQL: Citus cannot plan a SQL function's parameterized statement when the
-- function runs inside a query on a shard; PL/pgSQL hands it the values.
CREATE OR REPLACE FUNCTION usage_billing.plan_at(customer_id text, at timestamptz)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p text;
BEGIN
    SELECT h.plan INTO p FROM usage_billing.customer_plans h
     WHERE h.customer_id = plan_at.customer_id AND h.effective_from <= plan_at.at
     ORDER BY h.effective_from DESC LIMIT 1;
    IF p IS NULL THEN
        SELECT c.plan INTO p FROM usage_billing.customers c WHERE c.customer_id = plan_at.customer_id;
    END IF;
    RETURN p;
END
$$;

-- apply_plan_change: the customer's plan now from the function's argument, not from the row
-- (Citus refuses a stable function of the row's columns in an UPDATE); otherwise as in 1.4.
CREATE OR REPLACE FUNCTION usage_billing.apply_plan_change(
    customer_id text,
    new_plan text,
    effective text,
    at timestamptz,
    OUT plan text,
    OUT effective_from timestamptz)
RETURNS record
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cust record;
    cur record;
    new record;
    mode text := apply_plan_change.effective;
    from_at timestamptz;
    invoiced_end timestamptz;
    before_plan text;
BEGIN
    IF mode IS NULL OR mode NOT IN ('immediate', 'period_end', 'auto') THEN
        RAISE EXCEPTION 'invalid effective "%"', coalesce(mode, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use immediate, period_end or auto (an upgrade now, a downgrade at the next period).';
    END IF;
    IF apply_plan_change.at IS NULL OR NOT isfinite(apply_plan_change.at) THEN
        RAISE EXCEPTION 'invalid plan change time'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "at" was %s; it must be a finite timestamp.',
                                  coalesce(apply_plan_change.at::text, 'NULL'));
    END IF;
    SELECT c.customer_id, c.billing_anchor INTO cust
      FROM usage_billing.customers c
     WHERE c.customer_id = apply_plan_change.customer_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'customer "%" does not exist', apply_plan_change.customer_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'Create it with usage_billing.upsert_customer().';
    END IF;
    SELECT p.plan, p.base_price, p.currency, p.period INTO new
      FROM usage_billing.plans p WHERE p.plan = new_plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'plan "%" does not exist', new_plan
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT p.plan, p.base_price, p.currency, p.period INTO cur
      FROM usage_billing.plans p
     WHERE p.plan = usage_billing.plan_at(apply_plan_change.customer_id, apply_plan_change.at);
    IF new.currency <> cur.currency OR new.period <> cur.period THEN
        RAISE EXCEPTION 'customer "%" cannot change from plan "%" to plan "%"',
                        apply_plan_change.customer_id, cur.plan, new.plan
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Plan "%s" bills %s per %s, plan "%s" %s per %s; the plans of one customer share their currency and period.',
                                  cur.plan, cur.currency, cur.period, new.plan, new.currency, new.period),
                  HINT = 'Create a plan with the same currency and period, or a new customer for the new subscription.';
    END IF;

    IF mode = 'auto' THEN
        -- a lower base price waits for the period's end; a higher or equal one applies now
        mode := CASE WHEN new.base_price >= cur.base_price THEN 'immediate' ELSE 'period_end' END;
    END IF;
    IF mode = 'immediate' THEN
        from_at := apply_plan_change.at;
    ELSE
        SELECT b.period_end INTO from_at
          FROM usage_billing.period_bounds(cust.billing_anchor, cur.period, apply_plan_change.at) b;
    END IF;

    SELECT max(i.period_end) INTO invoiced_end
      FROM usage_billing.invoices i WHERE i.customer_id = apply_plan_change.customer_id;
    IF invoiced_end > from_at THEN
        RAISE EXCEPTION 'period of % for customer "%" is invoiced', from_at, apply_plan_change.customer_id
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('A plan change from %s would reprice a finalized invoice; customer "%s" is invoiced until %s.',
                                  from_at, apply_plan_change.customer_id, invoiced_end),
                  HINT = 'Change the plan from a later instant.';
    END IF;

    -- a change supersedes every change from its instant on (scheduled ones included)
    DELETE FROM usage_billing.customer_plans h
     WHERE h.customer_id = apply_plan_change.customer_id AND h.effective_from >= from_at;
    before_plan := usage_billing.plan_at(apply_plan_change.customer_id, from_at);
    IF before_plan IS DISTINCT FROM new.plan THEN
        INSERT INTO usage_billing.customer_plans (customer_id, effective_from, plan)
        VALUES (apply_plan_change.customer_id, from_at, new.plan);
    END IF;
    UPDATE usage_billing.customers c
       SET plan = usage_billing.plan_at(apply_plan_change.customer_id, now()), updated_at = now()
     WHERE c.customer_id = apply_plan_change.customer_id;

    plan := new.plan;
    SELECT max(h.effective_from) INTO apply_plan_change.effective_from
      FROM usage_billing.customer_plans h
     WHERE h.customer_id = apply_plan_change.customer_id AND h.effective_from <= from_at;
END
$$;

-- export_plan: the identifier (export_identifier()'s formula) computed in the statement from the
-- epoch read once, so that the statement can run on Citus shards (a function that reads a table
-- cannot run inside a query on a shard); otherwise as in 1.3.
CREATE OR REPLACE FUNCTION usage_billing.export_plan(max_rows integer DEFAULT 10000)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Writes the outbox rows that bring Stripe from "planned" to floor(total), at most one open
 * (pending or failed) row per customer, meter and period.  Timestamps: now, clamped into the
 * period (at most period_end - 1 s, at least period_start); for formula-last meters strictly
 * after the previous event of the period when the period leaves room.  A period whose events
 * would be older than Stripe's 35-day window (less a one-hour margin) is not sent: its row is
 * created failed with that reason, so the gap shows in export_status instead of landing in the
 * wrong Stripe period.  A lowered sum/count total is never sent (no negative events): it shows
 * as needs_manual_credit.
 */
DECLARE
    ep text;
    n integer;
    now_s bigint := extract(epoch FROM clock_timestamp())::bigint;
    horizon bigint := extract(epoch FROM clock_timestamp() - interval '35 days' + interval '1 hour')::bigint;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be positive'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- one planner at a time (the worker; a manual call waits)
    PERFORM pg_advisory_xact_lock(7245170349586201);
    INSERT INTO usage_billing.export_epoch (epoch)
    SELECT left(md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text), 8)
     WHERE NOT EXISTS (SELECT 1 FROM usage_billing.export_epoch);
    SELECT e.epoch INTO ep FROM usage_billing.export_epoch e;

    WITH cand AS (
        SELECT a.customer_id, a.meter, a.period_start, a.period_end,
               floor(a.total) AS target,
               m.aggregation IN ('sum', 'count') AS additive,
               m.stripe_event_name, c.stripe_customer_id, c.stripe_account,
               coalesce(s.planned, 0) AS planned,
               coalesce(s.last_seq, 0) + 1 AS seq,
               s.last_ts
          FROM usage_billing.aggregate_totals a
          JOIN usage_billing.meters m ON m.meter = a.meter
          JOIN usage_billing.customers c ON c.customer_id = a.customer_id
          LEFT JOIN usage_billing.export_state s
                 ON s.customer_id = a.customer_id AND s.meter = a.meter AND s.period_start = a.period_start
         WHERE m.stripe_event_name IS NOT NULL
           AND c.stripe_customer_id IS NOT NULL
           AND a.total >= 0
           AND extract(epoch FROM a.period_start) <= now_s + 240
           AND CASE WHEN m.aggregation IN ('sum', 'count')
                    THEN floor(a.total) > coalesce(s.planned, 0)
                    ELSE floor(a.total) <> coalesce(s.planned, 0) END
           AND NOT EXISTS (SELECT 1 FROM usage_billing.export_outbox o
                            WHERE o.customer_id = a.customer_id AND o.meter = a.meter
                              AND o.period_start = a.period_start
                              AND o.status IN ('pending', 'failed'))
         ORDER BY a.period_start, a.customer_id, a.meter
         LIMIT max_rows
    ), timed AS (
        SELECT cand.*,
               greatest(least(now_s, extract(epoch FROM period_end)::bigint - 1),
                        extract(epoch FROM period_start)::bigint) AS ts_raw
          FROM cand
    ), ev AS (
        SELECT timed.*,
               CASE WHEN NOT additive AND last_ts IS NOT NULL AND ts_raw <= last_ts
                         AND last_ts + 1 < extract(epoch FROM period_end)::bigint
                    THEN last_ts + 1 ELSE ts_raw END AS event_ts,
               'ub-' || ep || '-'
                   || left(md5(customer_id || chr(31) || meter || chr(31)
                               || extract(epoch FROM period_start)::bigint::text), 24)
                   || '-' || seq::text AS ident
          FROM timed
    ), ins AS (
        INSERT INTO usage_billing.export_outbox
            (customer_id, meter, period_start, seq, stripe_customer_id, stripe_account, event_name,
             value, additive, identifier, idempotency_key, event_ts, status, last_error)
        SELECT customer_id, meter, period_start, seq, stripe_customer_id, stripe_account, stripe_event_name,
               CASE WHEN additive THEN target - planned ELSE target END, additive,
               ident, ident, event_ts,
               CASE WHEN event_ts < horizon THEN 'failed' ELSE 'pending' END,
               CASE WHEN event_ts < horizon
                    THEN 'the period ended more than 35 days ago: Stripe no longer accepts events for it' END
          FROM ev
        RETURNING customer_id, meter, period_start, seq, event_ts
    )
    INSERT INTO usage_billing.export_state AS s (customer_id, meter, period_start, planned, last_seq, last_ts)
    SELECT i.customer_id, i.meter, i.period_start, e.target, i.seq, i.event_ts
      FROM ins i
      JOIN ev e ON e.customer_id = i.customer_id AND e.meter = i.meter AND e.period_start = i.period_start
    ON CONFLICT (customer_id, meter, period_start) DO UPDATE
        SET planned = EXCLUDED.planned, last_seq = EXCLUDED.last_seq, last_ts = EXCLUDED.last_ts;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- The export attempts and the finalized invoice lines name their customer, as every other row
-- with customer data does: on Citus they live in their customer's shard (distribute_with_citus).
ALTER TABLE usage_billing.export_attempts ADD COLUMN customer_id text;
UPDATE usage_billing.export_attempts a SET customer_id = o.customer_id
  FROM usage_billing.export_outbox o WHERE o.outbox_id = a.outbox_id;
ALTER TABLE usage_billing.export_attempts ALTER COLUMN customer_id SET NOT NULL;
ALTER TABLE usage_billing.invoice_lines ADD COLUMN customer_id text;
ALTER TABLE usage_billing.invoice_lines DISABLE TRIGGER invoice_lines_immutable;
UPDATE usage_billing.invoice_lines l SET customer_id = i.customer_id
  FROM usage_billing.invoices i WHERE i.invoice_id = l.invoice_id;
ALTER TABLE usage_billing.invoice_lines ENABLE TRIGGER invoice_lines_immutable;
ALTER TABLE usage_billing.invoice_lines ALTER COLUMN customer_id SET NOT NULL;
DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['export_attempts', 'invoice_lines'] LOOP
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

-- export_record: the attempts name their customer, the batch's instant is read once; otherwise as
-- in 1.0.
CREATE OR REPLACE FUNCTION usage_billing.export_record(
    outbox_ids bigint[], outcomes text[], http_statuses integer[], request_ids text[], errors text[],
    retry_in_ms integer[], rotate_keys boolean[], durations_ms integer[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Records the outcomes of one batch of HTTP attempts (parallel arrays, one element per
 * outbox row): sent (Stripe holds it), retry (later, same identifier; after an error
 * answer with a new Idempotency-Key, since Stripe replays saved answers), failed.
 * A batch holds at most one row per customer and meter.
 */
DECLARE
    -- one instant for the batch, as a value: Citus refuses volatile functions in UPDATE
    now_t constant timestamptz := clock_timestamp();
    cids text[];
    cid text;
    row_meter text;
    row_ps timestamptz;
    row_seq integer;
    row_value numeric;
    row_additive boolean;
    row_attempts integer;
    v_id bigint;
    v_outcome text;
    v_status text;
    v_http integer;
    v_request text;
    v_error text;
    v_next timestamptz;
    v_sent_at timestamptz;
    v_rotate boolean;
BEGIN
    IF usage_billing.citus_distributed() THEN
        -- row by row in its customer's shard: Citus cannot join the batch's arrays with the
        -- outbox's shards in one modifying statement
        -- the rows' customers in one read over the shards
        SELECT array_agg(o.customer_id ORDER BY k.i) INTO cids
          FROM unnest(outbox_ids) WITH ORDINALITY AS k(id, i)
          LEFT JOIN (SELECT x.outbox_id, x.customer_id FROM usage_billing.export_outbox x
                      WHERE x.outbox_id = ANY (outbox_ids)) o ON o.outbox_id = k.id;
        FOR i IN 1 .. coalesce(array_length(outbox_ids, 1), 0) LOOP
            cid := cids[i];
            CONTINUE WHEN cid IS NULL;
            -- plain values only in the statements (Citus deparses them for the shard)
            v_id := outbox_ids[i];
            v_outcome := outcomes[i];
            v_status := CASE v_outcome WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed' ELSE 'pending' END;
            v_http := http_statuses[i];
            v_request := request_ids[i];
            v_error := errors[i];
            v_next := now_t + coalesce(retry_in_ms[i], 0) * interval '1 millisecond';
            v_sent_at := CASE WHEN v_outcome = 'sent' THEN now_t END;
            v_rotate := coalesce(rotate_keys[i], false);
            UPDATE usage_billing.export_outbox o
               SET attempts = o.attempts + 1,
                   status = v_status,
                   next_attempt_at = v_next,
                   last_attempt_at = now_t,
                   last_http_status = v_http,
                   last_request_id = v_request,
                   last_error = v_error,
                   sent_at = v_sent_at,
                   idempotency_key = CASE WHEN v_rotate
                                          THEN o.identifier || '-k' || (o.attempts + 1)::text
                                          ELSE o.idempotency_key END
             WHERE o.customer_id = cid AND o.outbox_id = v_id AND o.status = 'pending'
            RETURNING o.meter, o.period_start, o.seq, o.value, o.additive, o.attempts
                 INTO row_meter, row_ps, row_seq, row_value, row_additive, row_attempts;
            CONTINUE WHEN NOT FOUND;
            INSERT INTO usage_billing.export_attempts
                (customer_id, outbox_id, attempt, attempted_at, outcome, http_status, request_id, error,
                 duration_ms)
            VALUES (cid, v_id, row_attempts, now_t, v_outcome, v_http, v_request, v_error, durations_ms[i]);
            IF v_outcome = 'sent' THEN
                UPDATE usage_billing.export_state s
                   SET exported = CASE WHEN row_additive THEN s.exported + row_value
                                       WHEN row_seq > s.exported_seq THEN row_value
                                       ELSE s.exported END,
                       exported_seq = greatest(s.exported_seq, row_seq),
                       attempts = s.attempts + 1, last_attempt_at = now_t, last_http_status = v_http,
                       last_request_id = v_request, last_error = v_error
                 WHERE s.customer_id = cid AND s.meter = row_meter AND s.period_start = row_ps;
            ELSE
                UPDATE usage_billing.export_state s
                   SET attempts = s.attempts + 1, last_attempt_at = now_t, last_http_status = v_http,
                       last_request_id = v_request, last_error = v_error
                 WHERE s.customer_id = cid AND s.meter = row_meter AND s.period_start = row_ps;
            END IF;
        END LOOP;
        RETURN;
    END IF;
    WITH r AS (
        SELECT * FROM unnest(outbox_ids, outcomes, http_statuses, request_ids, errors,
                             retry_in_ms, rotate_keys, durations_ms)
               AS r(outbox_id, outcome, http_status, request_id, error, retry_ms, rotate, duration_ms)
    ), upd AS (
        UPDATE usage_billing.export_outbox o
           SET attempts = o.attempts + 1,
               status = CASE r.outcome WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed' ELSE 'pending' END,
               next_attempt_at = now_t + make_interval(secs => coalesce(r.retry_ms, 0) / 1000.0),
               last_attempt_at = now_t,
               last_http_status = r.http_status,
               last_request_id = r.request_id,
               last_error = r.error,
               sent_at = CASE WHEN r.outcome = 'sent' THEN now_t END,
               idempotency_key = CASE WHEN r.rotate
                                      THEN o.identifier || '-k' || (o.attempts + 1)::text
                                      ELSE o.idempotency_key END
          FROM r
         WHERE o.outbox_id = r.outbox_id AND o.status = 'pending'
        RETURNING o.outbox_id, o.customer_id, o.meter, o.period_start, o.seq, o.value, o.additive,
                  o.attempts, o.last_attempt_at, r.outcome, r.http_status, r.request_id, r.error,
                  r.duration_ms
    ), att AS (
        INSERT INTO usage_billing.export_attempts
            (customer_id, outbox_id, attempt, attempted_at, outcome, http_status, request_id, error,
             duration_ms)
        SELECT customer_id, outbox_id, attempts, last_attempt_at, outcome, http_status, request_id, error,
               duration_ms
          FROM upd
    )
    UPDATE usage_billing.export_state s
       SET exported = CASE WHEN u.outcome <> 'sent' THEN s.exported
                           WHEN u.additive THEN s.exported + u.value
                           WHEN u.seq > s.exported_seq THEN u.value
                           ELSE s.exported END,
           exported_seq = CASE WHEN u.outcome = 'sent' THEN greatest(s.exported_seq, u.seq) ELSE s.exported_seq END,
           attempts = s.attempts + 1,
           last_attempt_at = u.last_attempt_at,
           last_http_status = u.http_status,
           last_request_id = u.request_id,
           last_error = u.error
      FROM upd u
     WHERE s.customer_id = u.customer_id AND s.meter = u.meter AND s.period_start = u.period_start;
END
$$;

-- export_cancel_plan: a cancel is looked up with its customer (an identifier belongs to one),
-- which Citus needs to join co-located shards; otherwise as in 1.3.
CREATE OR REPLACE FUNCTION usage_billing.export_cancel_plan(cancel_window interval, max_rows integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Writes the cancels that bring what Stripe holds down to floor(total) where a correction
 * lowered a sum/count total: per customer, meter and period, the cancellable events newest
 * first, as long as the ones before cover less than the excess.  Skips a period with an open
 * (pending or failed) outbox row or a pending cancel: its level is not known yet.
 */
DECLARE
    n integer;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be positive'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cancel_window IS NULL OR cancel_window <= interval '0' THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(7245170349586201);

    WITH over AS (
        SELECT s.customer_id, s.meter, s.period_start, s.planned - floor(a.total) AS excess
          FROM usage_billing.export_state s
          JOIN usage_billing.aggregate_totals a
            ON a.customer_id = s.customer_id AND a.meter = s.meter AND a.period_start = s.period_start
          JOIN usage_billing.meters m ON m.meter = s.meter
         WHERE m.aggregation IN ('sum', 'count')
           AND s.planned > floor(a.total)
           AND NOT EXISTS (SELECT 1 FROM usage_billing.export_outbox o
                            WHERE o.customer_id = s.customer_id AND o.meter = s.meter
                              AND o.period_start = s.period_start
                              AND o.status IN ('pending', 'failed'))
           AND NOT EXISTS (SELECT 1 FROM usage_billing.export_cancels x
                            WHERE x.customer_id = s.customer_id AND x.meter = s.meter
                              AND x.period_start = s.period_start AND x.status = 'pending')
         ORDER BY s.period_start, s.customer_id, s.meter
         LIMIT max_rows
    ), cand AS (
        SELECT o.outbox_id, o.customer_id, o.meter, o.period_start, o.identifier, o.event_name,
               o.value, over.excess,
               coalesce(sum(o.value) OVER (PARTITION BY o.customer_id, o.meter, o.period_start
                                           ORDER BY o.seq DESC
                                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS newer
          FROM over
          JOIN usage_billing.export_outbox o
            ON o.customer_id = over.customer_id AND o.meter = over.meter AND o.period_start = over.period_start
         WHERE o.status = 'sent' AND o.additive AND o.value > 0
           AND o.created_at > clock_timestamp() - cancel_window
           AND NOT EXISTS (SELECT 1 FROM usage_billing.export_cancels x
                            WHERE x.customer_id = o.customer_id AND x.identifier = o.identifier)
    )
    INSERT INTO usage_billing.export_cancels
        (customer_id, meter, period_start, outbox_id, identifier, event_name, value, idempotency_key)
    SELECT customer_id, meter, period_start, outbox_id, identifier, event_name, value,
           'ubc-' || identifier
      FROM cand
     WHERE newer < excess;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- finalize_one: the lines name their customer and are joined with it; otherwise as in 1.4.
CREATE OR REPLACE FUNCTION usage_billing.finalize_one(cid text, ps timestamptz, pe timestamptz)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    iid bigint;
    num integer;
    cur text;
    n integer := 0;
    tot numeric := 0;
    k timestamptz;
    r record;
BEGIN
    SELECT p.currency INTO cur
      FROM usage_billing.customers c JOIN usage_billing.plans p ON p.plan = c.plan
     WHERE c.customer_id = cid;
    iid := nextval(pg_get_serial_sequence('usage_billing.invoices', 'invoice_id'));

    FOR r IN SELECT * FROM usage_billing.price_period(cid, ps) LOOP
        n := n + 1;
        INSERT INTO usage_billing.invoice_lines
            (customer_id, invoice_id, line_no, line, meter, segment_start, quantity, unit_price, amount,
             for_period_start, usage_total, pricing)
        VALUES (cid, iid, n, r.line, r.meter, r.segment_start, r.quantity, r.unit_price, r.amount,
                ps, r.usage_total, r.pricing);
        tot := tot + r.amount;
    END LOOP;

    FOR k IN
        SELECT i.period_start
          FROM usage_billing.invoices i
         WHERE i.customer_id = cid AND i.period_start < ps
           AND (EXISTS (SELECT 1
                          FROM usage_billing.invoiced_totals t
                          LEFT JOIN usage_billing.aggregate_totals a
                                 ON a.customer_id = t.customer_id AND a.meter = t.meter
                                AND a.period_start = t.period_start
                         WHERE t.customer_id = cid AND t.period_start = i.period_start
                           AND t.total IS DISTINCT FROM coalesce(a.total, 0))
                OR EXISTS (SELECT 1
                             FROM usage_billing.aggregate_totals a
                            WHERE a.customer_id = cid AND a.period_start = i.period_start
                              AND a.total <> 0
                              AND NOT EXISTS (SELECT 1 FROM usage_billing.invoiced_totals t
                                               WHERE t.customer_id = cid AND t.meter = a.meter
                                                 AND t.period_start = a.period_start)))
         ORDER BY i.period_start
    LOOP
        FOR r IN
            SELECT p.meter, p.segment_start, p.usage_total, o.pricing,
                   p.usage_total - b.last_total AS quantity,
                   usage_billing.round_money(coalesce(usage_billing.price_usage(o.pricing, p.usage_total), 0), cur)
                       - b.billed AS delta
              FROM usage_billing.price_period(cid, k) p
              JOIN usage_billing.invoices oi ON oi.customer_id = cid AND oi.period_start = k
              JOIN usage_billing.invoice_lines o
                ON o.customer_id = oi.customer_id AND o.invoice_id = oi.invoice_id AND o.line = 'usage' AND o.meter = p.meter
               AND o.segment_start = p.segment_start
             CROSS JOIN LATERAL (
                   SELECT sum(l.amount) AS billed,
                          (array_agg(l.usage_total ORDER BY l.invoice_id DESC, l.line_no DESC))[1] AS last_total
                     FROM usage_billing.invoices li
                     JOIN usage_billing.invoice_lines l
                       ON l.customer_id = li.customer_id AND l.invoice_id = li.invoice_id
                    WHERE li.customer_id = cid AND l.for_period_start = k AND l.meter = p.meter
                      AND l.segment_start = p.segment_start
                      AND l.line IN ('usage', 'credit', 'debit')) b
             WHERE p.line = 'usage'
             ORDER BY p.segment_start, p.meter
        LOOP
            CONTINUE WHEN r.delta = 0;
            n := n + 1;
            INSERT INTO usage_billing.invoice_lines
                (customer_id, invoice_id, line_no, line, meter, segment_start, quantity, unit_price, amount,
                 for_period_start, usage_total, pricing)
            VALUES (cid, iid, n, CASE WHEN r.delta < 0 THEN 'credit' ELSE 'debit' END, r.meter,
                    r.segment_start, r.quantity, NULL, r.delta, k, r.usage_total, r.pricing);
            tot := tot + r.delta;
        END LOOP;
        -- the period is billed as it is now
        DELETE FROM usage_billing.invoiced_totals t WHERE t.customer_id = cid AND t.period_start = k;
        INSERT INTO usage_billing.invoiced_totals (customer_id, meter, period_start, total)
        SELECT cid, a.meter, k, a.total FROM usage_billing.aggregate_totals a
         WHERE a.customer_id = cid AND a.period_start = k;
    END LOOP;

    INSERT INTO usage_billing.invoiced_totals (customer_id, meter, period_start, total)
    SELECT cid, a.meter, ps, a.total FROM usage_billing.aggregate_totals a
     WHERE a.customer_id = cid AND a.period_start = ps;

    tot := usage_billing.round_money(tot, cur);
    n := n + 1;
    INSERT INTO usage_billing.invoice_lines (customer_id, invoice_id, line_no, line, amount, for_period_start)
    VALUES (cid, iid, n, 'total', tot, ps);
    SELECT coalesce(max(i.invoice_number), 0) + 1 INTO num
      FROM usage_billing.invoices i WHERE i.customer_id = cid;
    INSERT INTO usage_billing.invoices
        (invoice_id, invoice_number, customer_id, period_start, period_end, currency, total,
         status, finalized_at)
    OVERRIDING SYSTEM VALUE
    VALUES (iid, num, cid, ps, pe, cur, tot, 'finalized', now());
    PERFORM pg_notify('usage_billing_invoices',
                      json_build_object('invoice_id', iid, 'invoice_number', num, 'customer_id', cid,
                                        'period_start', ps, 'period_end', pe, 'currency', cur,
                                        'total', tot)::text);
    RETURN iid;
END
$$;

-- export_cancel_record: the instant read once, as a value; otherwise as in 1.0.
CREATE OR REPLACE FUNCTION usage_billing.export_cancel_record(
    cancel_id bigint, outcome text, http_status integer, request_id text, error text,
    retry_in_ms integer, rotate_key boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Records one cancel attempt: cancelled (Stripe dropped the event: its value leaves planned
 * and exported), refused (for good: the value stays, needs_manual_credit shows it) or retry
 * (same identifier later; with a new Idempotency-Key after an error answer, since Stripe
 * replays saved answers).  Only a pending row changes, so a replayed outcome counts once.
 * Returns whether the cancel was confirmed now.
 */
DECLARE
    now_t constant timestamptz := clock_timestamp();
    done boolean;
BEGIN
    IF outcome NOT IN ('cancelled', 'refused', 'retry') THEN
        RAISE EXCEPTION 'unknown cancel outcome "%"', outcome
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(7245170349586201);
    WITH c AS (
        UPDATE usage_billing.export_cancels x
           SET attempts = x.attempts + 1,
               status = CASE export_cancel_record.outcome WHEN 'retry' THEN 'pending'
                             ELSE export_cancel_record.outcome END,
               next_attempt_at = now_t
                                 + make_interval(secs => coalesce(retry_in_ms, 0) / 1000.0),
               last_attempt_at = now_t,
               last_http_status = export_cancel_record.http_status,
               last_request_id = export_cancel_record.request_id,
               last_error = export_cancel_record.error,
               done_at = CASE WHEN export_cancel_record.outcome <> 'retry' THEN now_t END,
               idempotency_key = CASE WHEN rotate_key
                                      THEN 'ubc-' || x.identifier || '-k' || (x.attempts + 1)::text
                                      ELSE x.idempotency_key END
         WHERE x.cancel_id = export_cancel_record.cancel_id AND x.status = 'pending'
        RETURNING x.customer_id, x.meter, x.period_start, x.value, x.status
    ), st AS (
        UPDATE usage_billing.export_state s
           SET planned = CASE WHEN c.status = 'cancelled' THEN s.planned - c.value ELSE s.planned END,
               exported = CASE WHEN c.status = 'cancelled' THEN s.exported - c.value ELSE s.exported END,
               attempts = s.attempts + 1,
               last_attempt_at = now_t,
               last_http_status = export_cancel_record.http_status,
               last_request_id = export_cancel_record.request_id,
               last_error = export_cancel_record.error
          FROM c
         WHERE s.customer_id = c.customer_id AND s.meter = c.meter AND s.period_start = c.period_start
        RETURNING c.status
    )
    SELECT coalesce(bool_or(st.status = 'cancelled'), false) INTO done FROM st;
    RETURN done;
END
$$;

-- current_usage: the plan in force found with a join, as in effective_limits above (plan_at()
-- per row cannot run inside a query on a Citus shard); otherwise as in 1.4.
CREATE OR REPLACE VIEW usage_billing.current_usage WITH (security_invoker = true) AS
SELECT c.customer_id, p.plan, m.meter, pb.period_start, pb.period_end,
       coalesce(a.total, 0) AS total,
       coalesce(a.event_count, 0) AS event_count,
       l.included,
       l.hard_cap,
       CASE WHEN l.included > 0 THEN round(100 * coalesce(a.total, 0) / l.included, 1) END AS usage_percent,
       c.status,
       c.status AS customer_status,
       -- the rule of increment_usage's status (pricing.c, ub_usage_status)
       CASE WHEN l.included IS NULL THEN 'ok'
            WHEN coalesce(a.total, 0) > l.included THEN 'over_limit'
            WHEN l.soft_threshold IS NOT NULL AND l.included > 0
                 AND coalesce(a.total, 0) >= l.soft_threshold * l.included THEN 'warning'
            ELSE 'ok' END AS usage_status
  FROM usage_billing.customers c
  LEFT JOIN (SELECT DISTINCT ON (h.customer_id) h.customer_id, h.plan
               FROM usage_billing.customer_plans h
              WHERE h.effective_from <= now()
              ORDER BY h.customer_id, h.effective_from DESC) h ON h.customer_id = c.customer_id
  JOIN usage_billing.plans p ON p.plan = coalesce(h.plan, c.plan)
 CROSS JOIN LATERAL usage_billing.period_bounds(c.billing_anchor, p.period, now()) pb
 CROSS JOIN usage_billing.meters m
  LEFT JOIN usage_billing.effective_limits l ON l.customer_id = c.customer_id AND l.meter = m.meter
  LEFT JOIN usage_billing.aggregate_totals a
         ON a.customer_id = c.customer_id AND a.meter = m.meter AND a.period_start = pb.period_start
 WHERE a.customer_id IS NOT NULL OR l.meter IS NOT NULL;

-- ---------------------------------------------------------------------------
-- Stripe reconciliation and Connect (stripe_http.c, reconcile.c, reconcile_http.c)
--
-- Connect: a customer may belong to a connected account (stripe_account, acct_...); every
-- request about its events (meter events, cancels, event summaries) then carries the header
-- Stripe-Account.  An outbox row keeps the account it was planned for (export_plan copies it
-- from the customer), so that a resend and a later cancel go where the event went.
--
-- Reconciliation: the export worker reads Stripe's
-- GET /v1/billing/meters/{stripe_meter_id}/event_summaries per customer, meter and period
-- and compares Stripe's aggregated_value with what the database says Stripe holds
-- (export_state.exported).  A difference is recorded in stripe_reconciliation (view
-- stripe_drift) and corrected through the export's own bookkeeping: export_state is set to
-- what Stripe holds, so that the planner sends the difference (Stripe holds less, or a
-- formula-last meter holds another value) or the cancel planner cancels recent events
-- (Stripe holds more; what is older than export_cancel_window shows as needs_manual_credit).
-- ---------------------------------------------------------------------------

ALTER TABLE usage_billing.meters
    ADD COLUMN stripe_meter_id text CHECK (stripe_meter_id ~ '^[A-Za-z0-9_]{1,255}$');
COMMENT ON COLUMN usage_billing.meters.stripe_meter_id IS
    'The id of the Stripe meter (mtr_...) whose event_summaries reconciliation reads; NULL: not reconciled.';

ALTER TABLE usage_billing.customers
    ADD COLUMN stripe_account text CHECK (stripe_account ~ '^acct_[A-Za-z0-9]{1,250}$');
COMMENT ON COLUMN usage_billing.customers.stripe_account IS
    'Stripe Connect: the connected account (acct_...) the customer belongs to, sent as Stripe-Account; NULL: the platform account.';

ALTER TABLE usage_billing.export_outbox ADD COLUMN stripe_account text;
COMMENT ON COLUMN usage_billing.export_outbox.stripe_account IS
    'Stripe Connect: the account the event is sent to (the customer''s when the row was planned); NULL: the platform.';

-- Raises 22023 unless a Stripe Connect account id looks like one (acct_ and letters or digits).
CREATE FUNCTION usage_billing.check_stripe_account(stripe_account text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF stripe_account IS NOT NULL AND stripe_account !~ '^acct_[A-Za-z0-9]{1,250}$' THEN
        RAISE EXCEPTION 'invalid Stripe account id'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "stripe_account" has %s characters; a Stripe account id is "acct_" followed by 1 to 250 letters or digits.',
                                  length(stripe_account)),
                  HINT = 'Pass the id of the connected account, e.g. ''acct_1032D82eZvKYlo2C'', or NULL for the platform account.';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.check_stripe_account(text) IS
    'Internal: raises 22023 unless a Stripe account id is "acct_" followed by 1 to 250 letters or digits.';
REVOKE ALL ON FUNCTION usage_billing.check_stripe_account(text) FROM PUBLIC;

CREATE FUNCTION usage_billing.set_stripe_account(customer_id text, stripe_account text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Sets (or with NULL clears) the connected account of a customer.  Rows already planned keep
 * the account they were planned for; what is planned from now on goes to the new one.
 */
BEGIN
    PERFORM usage_billing.check_stripe_account(stripe_account);
    UPDATE usage_billing.customers c
       SET stripe_account = set_stripe_account.stripe_account, updated_at = now()
     WHERE c.customer_id = set_stripe_account.customer_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'customer "%" does not exist', customer_id
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.set_stripe_account(text, text) IS
    'Stripe Connect: sets the connected account (acct_...) a customer''s events, cancels and summaries are sent to; NULL: the platform account.';
REVOKE ALL ON FUNCTION usage_billing.set_stripe_account(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.set_stripe_account(text, text) TO usage_billing_admin;

CREATE FUNCTION usage_billing.set_stripe_meter_id(meter text, stripe_meter_id text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF stripe_meter_id IS NOT NULL AND stripe_meter_id !~ '^[A-Za-z0-9_]{1,255}$' THEN
        RAISE EXCEPTION 'invalid Stripe meter id'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "stripe_meter_id" has %s characters; a Stripe meter id has 1 to 255 letters, digits or underscores.',
                                  length(stripe_meter_id)),
                  HINT = 'Pass the id Stripe returned for the meter, e.g. ''mtr_test_61Q8nQMqIFK9fRQmr41CMAXJrFdZ5MnA'', or NULL.';
    END IF;
    UPDATE usage_billing.meters m
       SET stripe_meter_id = set_stripe_meter_id.stripe_meter_id
     WHERE m.meter = set_stripe_meter_id.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', meter
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.set_stripe_meter_id(text, text) IS
    'Sets the Stripe meter id (mtr_...) whose event summaries the export worker reconciles a meter with; NULL: not reconciled.';
REVOKE ALL ON FUNCTION usage_billing.set_stripe_meter_id(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.set_stripe_meter_id(text, text) TO usage_billing_admin;

CREATE TABLE usage_billing.stripe_reconciliation (
    customer_id        text NOT NULL,
    meter              text NOT NULL,
    period_start       timestamptz NOT NULL,
    period_end         timestamptz NOT NULL,
    stripe_customer_id text,
    stripe_account     text,
    stripe_meter_id    text,
    status             text NOT NULL
                       CHECK (status IN ('in_sync', 'resending', 'cancelling', 'not_correctable',
                                         'skipped', 'error')),
    stripe_value       numeric,
    expected           numeric,
    drift              numeric,
    detail             text,
    checked_at         timestamptz NOT NULL DEFAULT now(),
    request_id         text,
    last_drift         numeric,
    last_drift_at      timestamptz,
    corrections        integer NOT NULL DEFAULT 0,
    PRIMARY KEY (customer_id, meter, period_start)
);
COMMENT ON TABLE usage_billing.stripe_reconciliation IS
    'The last comparison of Stripe''s event summary with the database per customer, meter and period (export worker), and what was done about a difference.';
COMMENT ON COLUMN usage_billing.stripe_reconciliation.stripe_value IS
    'Stripe''s aggregated_value for the period (GET /v1/billing/meters/{id}/event_summaries).';
COMMENT ON COLUMN usage_billing.stripe_reconciliation.expected IS
    'What the database said Stripe holds (export_state.exported) when Stripe was read.';
COMMENT ON COLUMN usage_billing.stripe_reconciliation.drift IS
    'stripe_value - expected: above 0 Stripe holds more (cancelled within the cancel window, else a manual credit), below 0 less (sent again).';
COMMENT ON COLUMN usage_billing.stripe_reconciliation.status IS
    'in_sync; resending (the difference is planned as a new event); cancelling (recent events are cancelled); not_correctable (needs a hand: see detail); skipped (events or cancels in flight, or sent within usage_billing.reconcile_settle); error (Stripe''s summary could not be read: see detail).';
ALTER TABLE usage_billing.stripe_reconciliation ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.stripe_reconciliation FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.stripe_reconciliation FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
REVOKE ALL ON usage_billing.stripe_reconciliation FROM PUBLIC;
GRANT SELECT ON usage_billing.stripe_reconciliation
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

CREATE VIEW usage_billing.stripe_drift WITH (security_invoker = true) AS
SELECT r.customer_id, r.meter, r.period_start, r.period_end, r.stripe_customer_id,
       r.stripe_account, r.stripe_meter_id, r.stripe_value, r.expected, r.drift, r.status,
       r.detail, r.checked_at, r.last_drift, r.last_drift_at, r.corrections
  FROM usage_billing.stripe_reconciliation r
 WHERE r.status IN ('resending', 'cancelling', 'not_correctable', 'error')
    OR coalesce(r.drift, 0) <> 0;
COMMENT ON VIEW usage_billing.stripe_drift IS
    'Where Stripe differed from the database at the last reconciliation (or could not be read), and what is being done about it.';
REVOKE ALL ON usage_billing.stripe_drift FROM PUBLIC;
GRANT SELECT ON usage_billing.stripe_drift
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

-- The export worker: the keys to read from Stripe, least recently checked first (and not
-- checked since checked_before: a pass cut by its time budget resumes where it stopped).
CREATE FUNCTION usage_billing.reconcile_candidates(customer_id text, meter text, max_rows integer,
                                                   checked_before timestamptz)
RETURNS TABLE (customer_id text, meter text, period_start timestamptz, period_end timestamptz,
               stripe_customer_id text, stripe_account text, stripe_meter_id text,
               exported numeric)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.customer_id, s.meter, s.period_start, a.period_end, c.stripe_customer_id,
           c.stripe_account, m.stripe_meter_id, s.exported
      FROM usage_billing.export_state s
      JOIN usage_billing.customers c ON c.customer_id = s.customer_id
      JOIN usage_billing.meters m ON m.meter = s.meter
      JOIN usage_billing.aggregate_totals a
        ON a.customer_id = s.customer_id AND a.meter = s.meter AND a.period_start = s.period_start
      LEFT JOIN usage_billing.stripe_reconciliation r
        ON r.customer_id = s.customer_id AND r.meter = s.meter AND r.period_start = s.period_start
     WHERE m.stripe_meter_id IS NOT NULL AND m.stripe_event_name IS NOT NULL
       AND c.stripe_customer_id IS NOT NULL
       AND a.period_end > now() - interval '35 days'
       AND (reconcile_candidates.customer_id IS NULL OR s.customer_id = reconcile_candidates.customer_id)
       AND (reconcile_candidates.meter IS NULL OR s.meter = reconcile_candidates.meter)
       AND (r.checked_at IS NULL OR r.checked_at < checked_before)
     ORDER BY r.checked_at NULLS FIRST, s.period_start, s.customer_id, s.meter
     LIMIT max_rows
$$;
COMMENT ON FUNCTION usage_billing.reconcile_candidates(text, text, integer, timestamptz) IS
    'Internal (export worker): the customer, meter and period keys to compare with Stripe, least recently checked first.';
REVOKE ALL ON FUNCTION usage_billing.reconcile_candidates(text, text, integer, timestamptz) FROM PUBLIC;

-- The export worker: compares what Stripe answered with the database and corrects.
CREATE FUNCTION usage_billing.reconcile_record(
    customer_id text, meter text, period_start timestamptz, period_end timestamptz,
    stripe_value numeric, exported_seen numeric, error text, request_id text,
    settle interval, cancel_window interval)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Under the export's lock: a key with events or cancels in flight, or one sent within
 * "settle" (Stripe's summaries lag behind), is skipped; so is one whose exported level moved
 * since Stripe was read.  Else drift = stripe_value - exported; export_state is set to what
 * Stripe holds, so that the export itself corrects it: sum/count meters get the missing
 * difference planned as a new event, or an excess cancelled among the events sent within
 * cancel_window (the rest shows as needs_manual_credit); formula-last meters get the current
 * value sent again.  A key whose events went to another Stripe customer or account than the
 * current one is not corrected (not_correctable).  Returns the status recorded.
 */
DECLARE
    s usage_billing.export_state%ROWTYPE;
    c usage_billing.customers%ROWTYPE;
    additive boolean;
    d numeric;
    st text;
    det text;
    cancellable numeric;
BEGIN
    PERFORM pg_advisory_xact_lock(7245170349586201);
    SELECT * INTO s FROM usage_billing.export_state x
     WHERE x.customer_id = reconcile_record.customer_id AND x.meter = reconcile_record.meter
       AND x.period_start = reconcile_record.period_start
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO c FROM usage_billing.customers x WHERE x.customer_id = reconcile_record.customer_id;
    SELECT m.aggregation IN ('sum', 'count') INTO additive
      FROM usage_billing.meters m WHERE m.meter = reconcile_record.meter;

    IF error IS NOT NULL THEN
        st := 'error';
        det := error;
    ELSIF EXISTS (SELECT 1 FROM usage_billing.export_outbox o
                   WHERE o.customer_id = s.customer_id AND o.meter = s.meter
                     AND o.period_start = s.period_start AND o.status IN ('pending', 'failed'))
          OR EXISTS (SELECT 1 FROM usage_billing.export_cancels x
                      WHERE x.customer_id = s.customer_id AND x.meter = s.meter
                        AND x.period_start = s.period_start AND x.status = 'pending')
          OR s.exported IS DISTINCT FROM exported_seen
          OR (additive AND s.planned <> s.exported) THEN
        st := 'skipped';
        det := 'events or cancels of the period are in flight';
    ELSIF EXISTS (SELECT 1 FROM usage_billing.export_outbox o
                   WHERE o.customer_id = s.customer_id AND o.meter = s.meter
                     AND o.period_start = s.period_start AND o.sent_at > clock_timestamp() - settle)
          OR EXISTS (SELECT 1 FROM usage_billing.export_cancels x
                      WHERE x.customer_id = s.customer_id AND x.meter = s.meter
                        AND x.period_start = s.period_start AND x.done_at > clock_timestamp() - settle) THEN
        st := 'skipped';
        det := 'sent within usage_billing.reconcile_settle: Stripe''s summary may not show it yet';
    ELSE
        d := stripe_value - s.exported;
        IF d = 0 THEN
            st := 'in_sync';
        ELSIF EXISTS (SELECT 1 FROM usage_billing.export_outbox o
                       WHERE o.customer_id = s.customer_id AND o.meter = s.meter
                         AND o.period_start = s.period_start AND o.status = 'sent'
                         AND (o.stripe_customer_id IS DISTINCT FROM c.stripe_customer_id
                              OR o.stripe_account IS DISTINCT FROM c.stripe_account)) THEN
            st := 'not_correctable';
            det := format('Stripe holds %s where %s was sent, but events of this period went to another Stripe customer or account than the current one: compare by hand',
                          stripe_value, s.exported);
        ELSIF additive AND d < 0 THEN
            UPDATE usage_billing.export_state x
               SET planned = x.planned + d, exported = x.exported + d
             WHERE x.customer_id = s.customer_id AND x.meter = s.meter AND x.period_start = s.period_start;
            st := 'resending';
            det := format('Stripe holds %s less than was sent: the difference is sent again', -d);
        ELSIF additive THEN
            UPDATE usage_billing.export_state x
               SET planned = x.planned + d, exported = x.exported + d
             WHERE x.customer_id = s.customer_id AND x.meter = s.meter AND x.period_start = s.period_start;
            SELECT coalesce(sum(o.value), 0) INTO cancellable
              FROM usage_billing.export_outbox o
             WHERE o.customer_id = s.customer_id AND o.meter = s.meter AND o.period_start = s.period_start
               AND o.status = 'sent' AND o.additive AND o.value > 0
               AND o.created_at > clock_timestamp() - coalesce(cancel_window, interval '0')
               AND NOT EXISTS (SELECT 1 FROM usage_billing.export_cancels x WHERE x.identifier = o.identifier);
            IF cancellable >= d THEN
                st := 'cancelling';
                det := format('Stripe holds %s more than was sent: recent events are cancelled and the difference sent again', d);
            ELSE
                st := 'not_correctable';
                det := format('Stripe holds %s more than was sent and only %s can still be cancelled: credit the rest by hand (export_status.needs_manual_credit)',
                              d, cancellable);
            END IF;
        ELSE
            UPDATE usage_billing.export_state x
               SET planned = reconcile_record.stripe_value, exported = reconcile_record.stripe_value
             WHERE x.customer_id = s.customer_id AND x.meter = s.meter AND x.period_start = s.period_start;
            st := 'resending';
            det := format('Stripe holds %s where %s was sent: the current value is sent again', stripe_value, s.exported);
        END IF;
    END IF;

    INSERT INTO usage_billing.stripe_reconciliation AS r
        (customer_id, meter, period_start, period_end, stripe_customer_id, stripe_account,
         stripe_meter_id, status, stripe_value, expected, drift, detail, checked_at, request_id,
         last_drift, last_drift_at, corrections)
    SELECT s.customer_id, s.meter, s.period_start, reconcile_record.period_end, c.stripe_customer_id,
           c.stripe_account, m.stripe_meter_id, st,
           CASE WHEN st <> 'error' THEN stripe_value END, s.exported,
           CASE WHEN st NOT IN ('error', 'skipped') THEN d END, det, clock_timestamp(),
           reconcile_record.request_id,
           CASE WHEN coalesce(d, 0) <> 0 AND st <> 'skipped' THEN d END,
           CASE WHEN coalesce(d, 0) <> 0 AND st <> 'skipped' THEN clock_timestamp() END,
           CASE WHEN st IN ('resending', 'cancelling') THEN 1 ELSE 0 END
      FROM usage_billing.meters m WHERE m.meter = s.meter
    ON CONFLICT ON CONSTRAINT stripe_reconciliation_pkey DO UPDATE
       SET period_end = EXCLUDED.period_end, stripe_customer_id = EXCLUDED.stripe_customer_id,
           stripe_account = EXCLUDED.stripe_account, stripe_meter_id = EXCLUDED.stripe_meter_id,
           status = EXCLUDED.status, stripe_value = EXCLUDED.stripe_value,
           expected = EXCLUDED.expected, drift = EXCLUDED.drift, detail = EXCLUDED.detail,
           checked_at = EXCLUDED.checked_at, request_id = EXCLUDED.request_id,
           last_drift = coalesce(EXCLUDED.last_drift, r.last_drift),
           last_drift_at = coalesce(EXCLUDED.last_drift_at, r.last_drift_at),
           corrections = r.corrections + EXCLUDED.corrections;
    RETURN st;
END
$$;
COMMENT ON FUNCTION usage_billing.reconcile_record(text, text, timestamptz, timestamptz, numeric, numeric, text, text, interval, interval) IS
    'Internal (export worker): compares Stripe''s summary of a period with the database, records the result and corrects the export''s bookkeeping.';
REVOKE ALL ON FUNCTION usage_billing.reconcile_record(text, text, timestamptz, timestamptz, numeric, numeric, text, text, interval, interval) FROM PUBLIC;

CREATE FUNCTION usage_billing.reconcile_request(customer_id text, meter text, timeout_ms integer)
RETURNS boolean
AS 'MODULE_PATHNAME', 'ub_reconcile_request'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.reconcile_request(text, text, integer) IS
    'Internal (reconcile_stripe): asks the export worker to reconcile now and waits for it at most timeout_ms; true when it finished.';
REVOKE ALL ON FUNCTION usage_billing.reconcile_request(text, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.reconcile_request(text, text, integer) TO usage_billing_admin;

CREATE FUNCTION usage_billing.reconcile_stripe(p_customer_id text DEFAULT NULL, p_meter text DEFAULT NULL)
RETURNS TABLE (customer_id text, meter text, period_start timestamptz, period_end timestamptz,
               stripe_value numeric, expected numeric, drift numeric, status text, detail text,
               checked_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Asks the export worker to read Stripe's summaries now (of one customer and/or meter, or all)
 * and waits for it (at most 60 s); the HTTP requests are the worker's, outside this
 * transaction.  Returns the results of the keys asked for.  Call it outside an explicit
 * transaction that holds locks on the export's tables: the worker needs them.
 */
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'reconcile_stripe() needs the read committed isolation level'
            USING ERRCODE = 'active_sql_transaction',
                  DETAIL = 'It waits for the export worker and then reads what the worker committed.',
                  HINT = 'Call it in its own transaction at the default isolation level.';
    END IF;
    IF NOT usage_billing.reconcile_request(p_customer_id, p_meter, 60000) THEN
        RAISE WARNING 'the export worker did not reconcile'
            USING DETAIL = 'It is not running, has no Stripe API key, failed, or did not finish within 60 s; the rows shown are the results of the last reconciliation.',
                  HINT = 'See usage_billing.export_status.reason and the server log.';
    END IF;
    RETURN QUERY
    SELECT r.customer_id, r.meter, r.period_start, r.period_end, r.stripe_value, r.expected,
           r.drift, r.status, r.detail, r.checked_at
      FROM usage_billing.stripe_reconciliation r
     WHERE (p_customer_id IS NULL OR r.customer_id = p_customer_id)
       AND (p_meter IS NULL OR r.meter = p_meter)
     ORDER BY r.customer_id, r.meter, r.period_start;
END
$$;
COMMENT ON FUNCTION usage_billing.reconcile_stripe(text, text) IS
    'Compares Stripe''s event summaries with the database now (through the export worker) and corrects what can be corrected; returns the results.';
REVOKE ALL ON FUNCTION usage_billing.reconcile_stripe(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.reconcile_stripe(text, text) TO usage_billing_admin;

-- export_status: never in_sync while reconciliation knows Stripe differs and cannot correct it
-- (state stripe_drift); what Stripe held at the last check, and when (the 1.4 view plus two
-- columns at the end).  Drift that is being corrected shows through export_state already:
-- pending (Stripe holds less), cancelling or needs_manual_credit (Stripe holds more).
CREATE OR REPLACE VIEW usage_billing.export_status WITH (security_invoker = true) AS
SELECT a.customer_id, a.meter, a.period_start, a.period_end,
       c.stripe_customer_id,
       m.stripe_event_name AS event_name,
       m.aggregation,
       a.total,
       floor(a.total) AS target,
       coalesce(s.exported, 0) AS exported,
       CASE WHEN m.aggregation IN ('sum', 'count')
            THEN greatest(floor(a.total) - coalesce(s.exported, 0), 0)
            WHEN floor(a.total) = coalesce(s.exported, 0) THEN 0
            ELSE floor(a.total) END AS pending,
       coalesce(o.failed, 0) AS failed,
       coalesce(o.pending_events, 0) AS pending_events,
       coalesce(o.failed_events, 0) AS failed_events,
       CASE WHEN m.aggregation IN ('sum', 'count')
            THEN greatest(coalesce(s.planned, 0) - floor(a.total) - coalesce(x.cancelling, 0)
                          - coalesce(k.cancellable, 0), 0)
            ELSE 0 END AS needs_manual_credit,
       coalesce(s.attempts, 0) AS attempts,
       s.last_attempt_at,
       s.last_http_status,
       s.last_request_id,
       coalesce(o.failed_error, s.last_error) AS last_error,
       st.state,
       coalesce(x.cancelling, 0) AS cancelling,
       coalesce(x.cancelled, 0) AS cancelled,
       CASE st.state
            WHEN 'in_sync' THEN NULL
            WHEN 'no_stripe_customer' THEN 'the customer has no stripe_customer_id'
            WHEN 'failed' THEN coalesce(o.failed_error, s.last_error, 'Stripe refused the events')
            WHEN 'needs_manual_credit' THEN
                'Stripe holds more than the total and the excess can no longer be cancelled: credit it by hand'
            WHEN 'cancelling' THEN 'cancelling events Stripe holds above the total'
            WHEN 'stripe_drift' THEN rc.detail
            ELSE coalesce(b.blocker,
                          CASE WHEN a.total < 0 THEN 'the total is negative: nothing is sent'
                               WHEN coalesce(o.pending_events, 0) > 0 THEN 'sent or being sent, waiting for Stripe''s answer'
                               ELSE 'waiting for the next export cycle' END)
            END AS reason,
       rc.stripe_value,
       rc.checked_at AS stripe_checked_at
  FROM usage_billing.aggregate_totals a
  JOIN usage_billing.meters m ON m.meter = a.meter AND m.stripe_event_name IS NOT NULL
  JOIN usage_billing.customers c ON c.customer_id = a.customer_id
  LEFT JOIN usage_billing.export_state s
         ON s.customer_id = a.customer_id AND s.meter = a.meter AND s.period_start = a.period_start
  LEFT JOIN LATERAL (
        SELECT sum(ob.value) FILTER (WHERE ob.status = 'failed') AS failed,
               count(*) FILTER (WHERE ob.status = 'pending') AS pending_events,
               count(*) FILTER (WHERE ob.status = 'failed') AS failed_events,
               max(ob.last_error) FILTER (WHERE ob.status = 'failed') AS failed_error
          FROM usage_billing.export_outbox ob
         WHERE ob.customer_id = a.customer_id AND ob.meter = a.meter
           AND ob.period_start = a.period_start AND ob.status IN ('pending', 'failed')) o ON true
  LEFT JOIN LATERAL (
        SELECT sum(xc.value) FILTER (WHERE xc.status = 'pending') AS cancelling,
               sum(xc.value) FILTER (WHERE xc.status = 'cancelled') AS cancelled
          FROM usage_billing.export_cancels xc
         WHERE xc.customer_id = a.customer_id AND xc.meter = a.meter
           AND xc.period_start = a.period_start) x ON true
  LEFT JOIN LATERAL (
        -- what the worker can still cancel (usage_billing.export_cancel_window, default 23 h);
        -- a pending event counts too: it becomes cancellable once Stripe confirms it
        SELECT sum(ob.value) AS cancellable
          FROM usage_billing.export_outbox ob
         WHERE m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
           AND ob.customer_id = a.customer_id AND ob.meter = a.meter
           AND ob.period_start = a.period_start AND ob.status IN ('sent', 'pending') AND ob.additive
           AND ob.created_at > clock_timestamp()
                 - coalesce(nullif(pg_catalog.current_setting('usage_billing.export_cancel_window', true), ''),
                            '23h')::interval
           AND NOT EXISTS (SELECT 1 FROM usage_billing.export_cancels xc
                            WHERE xc.customer_id = ob.customer_id
                              AND xc.identifier = ob.identifier)) k ON true
  LEFT JOIN usage_billing.stripe_reconciliation rc
         ON rc.customer_id = a.customer_id AND rc.meter = a.meter AND rc.period_start = a.period_start
 CROSS JOIN LATERAL (
        SELECT CASE WHEN c.stripe_customer_id IS NULL THEN 'no_stripe_customer'
                    WHEN coalesce(o.failed_events, 0) > 0 THEN 'failed'
                    WHEN m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
                         AND coalesce(s.planned, 0) - floor(a.total)
                             > coalesce(x.cancelling, 0) + coalesce(k.cancellable, 0)
                         THEN 'needs_manual_credit'
                    WHEN m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
                         THEN 'cancelling'
                    WHEN rc.status = 'not_correctable' AND coalesce(rc.drift, 0) <> 0 THEN 'stripe_drift'
                    WHEN coalesce(s.exported, 0) = floor(a.total) THEN 'in_sync'
                    ELSE 'pending' END AS state) st
 CROSS JOIN (SELECT usage_billing.export_blocker() AS blocker) b;

COMMENT ON COLUMN usage_billing.export_status.stripe_value IS
    'Stripe''s aggregated_value for the period at the last reconciliation (NULL: not read yet).';
COMMENT ON COLUMN usage_billing.export_status.stripe_checked_at IS
    'When reconciliation last compared the period with Stripe.';

-- ---------------------------------------------------------------------------
-- Security: the tenants' policies of the escrow slots and reservations say what they do
-- ---------------------------------------------------------------------------
COMMENT ON POLICY tenant_own_rows ON usage_billing.usage_aggregate_slots IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';
COMMENT ON POLICY tenant_own_rows ON usage_billing.reservations IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';
