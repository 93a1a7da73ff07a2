-- usage_billing 1.4 -> 1.5: scale-out on Citus, Stripe reconciliation and v2 streams.
\echo Use "ALTER EXTENSION usage_billing UPDATE" to load this file. \quit

-- Sections are added below, one per subsystem; usage_billing--1.5.sql holds the same objects
-- for a fresh install.

-- ---------------------------------------------------------------------------
-- Scale-out: one-call distribution on Citus (doc/scaling.md)
-- ---------------------------------------------------------------------------

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
        'export_cancels'];
    ours constant text[] := dist_tables || ARRAY['meters', 'plans', 'plan_limits', 'settings',
                                                  'export_epoch'];
    r record;
    changed integer := 0;
BEGIN
    -- only the logical tables: a worker's internal connections also see the shards
    -- (customers_102008, ...), which Citus keeps in step itself
    CREATE TEMPORARY TABLE IF NOT EXISTS ub_citus_fks (stmt text) ON COMMIT DROP;
    -- 0. rows without their customer: the invoice lines and export attempts name it too
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'usage_billing.invoice_lines'::regclass
                      AND attname = 'customer_id' AND NOT attisdropped) THEN
        ALTER TABLE usage_billing.invoice_lines ADD COLUMN customer_id text;
        UPDATE usage_billing.invoice_lines l SET customer_id = i.customer_id
          FROM usage_billing.invoices i WHERE i.invoice_id = l.invoice_id;
        ALTER TABLE usage_billing.invoice_lines ALTER COLUMN customer_id SET NOT NULL;
        changed := changed + 1;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'usage_billing.export_attempts'::regclass
                      AND attname = 'customer_id' AND NOT attisdropped) THEN
        ALTER TABLE usage_billing.export_attempts ADD COLUMN customer_id text;
        UPDATE usage_billing.export_attempts a SET customer_id = o.customer_id
          FROM usage_billing.export_outbox o WHERE o.outbox_id = a.outbox_id;
        ALTER TABLE usage_billing.export_attempts ALTER COLUMN customer_id SET NOT NULL;
        changed := changed + 1;
    END IF;

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
        'export_cancels'];
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

    -- 0-4. the schema changes Citus needs, on every node (each has the extension's own tables)
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
