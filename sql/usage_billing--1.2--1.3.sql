-- usage_billing 1.2 -> 1.3: escrow slots for hot aggregates.
\echo Use "ALTER EXTENSION usage_billing UPDATE" to load this file. \quit

-- Callers of one (customer, meter, period) used to commit one at a time: each held the
-- aggregate row's lock until its commit was flushed.  A key that is contended now also keeps
-- its total in escrow slots, one per backend that writes it (escrow.c).  A slot holds part
-- of the total and a budget, a share of what is left before the next limit decision (a soft
-- threshold, the included quantity, the hard cap).  A caller that fits its slot's budget
-- writes only its slot, so callers of one key commit in parallel; a caller that does not,
-- and every writer other than increment_usage, first folds the slots back into the
-- aggregate row under that row's lock, so caps and alerts are decided on the exact total.
-- The total of a key is usage_aggregates.total plus its slots: aggregate_totals below.

ALTER TABLE usage_billing.usage_aggregates
    ADD COLUMN slotted boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN usage_billing.usage_aggregates.slotted IS
    'Part of the total is in usage_aggregate_slots; read usage_billing.aggregate_totals.';

CREATE TABLE usage_billing.usage_aggregate_slots (
    customer_id  text NOT NULL,
    meter        text NOT NULL,
    period_start timestamptz NOT NULL,
    slot         integer NOT NULL,
    total        numeric NOT NULL DEFAULT 0,
    event_count  bigint NOT NULL DEFAULT 0,
    budget       numeric,                 -- what the slot may still add; NULL = no limit applies
    floor_total  numeric NOT NULL,        -- the aggregate row's total when the budget was granted
    budget_limit numeric,                 -- the limit decision the budget stays below; NULL = none
    first_usage  timestamptz,
    last_usage   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- no CHECK constraint: the executor would parse it again on every write of the hot
    -- path (our ResultRelInfo lives one call); escrow.c never makes a budget negative
    PRIMARY KEY (customer_id, meter, period_start, slot)
) WITH (fillfactor = 30);
COMMENT ON TABLE usage_billing.usage_aggregate_slots IS
    'Escrow slots of contended aggregates: each holds part of the total and a budget to add without the aggregate row''s lock.';

CREATE VIEW usage_billing.aggregate_totals WITH (security_invoker = true) AS
SELECT a.customer_id, a.meter, a.period_start, a.period_end,
       a.total + coalesce(s.total, 0) AS total,
       a.event_count + coalesce(s.event_count, 0) AS event_count,
       least(a.first_usage, s.first_usage) AS first_usage,
       greatest(a.last_usage, s.last_usage) AS last_usage,
       a.updated_at
  FROM usage_billing.usage_aggregates a
  LEFT JOIN LATERAL (
        SELECT sum(x.total) AS total, sum(x.event_count)::bigint AS event_count,
               min(x.first_usage) AS first_usage, max(x.last_usage) AS last_usage
          FROM usage_billing.usage_aggregate_slots x
         WHERE a.slotted
           AND x.customer_id = a.customer_id AND x.meter = a.meter
           AND x.period_start = a.period_start) s ON true;
COMMENT ON VIEW usage_billing.aggregate_totals IS
    'Per customer, meter and period: the aggregate with its escrow slots added, the total every reader sees.';

CREATE FUNCTION usage_billing.fold_escrow_slots(customer_id text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'ub_fold_escrow_slots'
LANGUAGE C VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.fold_escrow_slots(text) IS
    'Moves the escrow slots of every aggregate (or one customer''s) back into the aggregate rows; returns how many aggregates.';
REVOKE ALL ON FUNCTION usage_billing.fold_escrow_slots(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.fold_escrow_slots(text) TO usage_billing_admin;

-- the same access, row-level security and dump rules as usage_aggregates
REVOKE ALL ON usage_billing.usage_aggregate_slots, usage_billing.aggregate_totals FROM PUBLIC;
GRANT SELECT ON usage_billing.usage_aggregate_slots, usage_billing.aggregate_totals
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;
ALTER TABLE usage_billing.usage_aggregate_slots ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.usage_aggregate_slots FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.usage_aggregate_slots FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.usage_aggregate_slots IS
    'The three usage_billing roles see every row (they write only through functions).';
SELECT pg_catalog.pg_extension_config_dump('usage_billing.usage_aggregate_slots', '');

CREATE OR REPLACE FUNCTION usage_billing.tenant_relations()
RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(r ORDER BY r), '{}')
      FROM unnest(ARRAY[
               'usage_billing.meters', 'usage_billing.plans', 'usage_billing.plan_limits',
               'usage_billing.customers', 'usage_billing.customer_limits',
               'usage_billing.usage_events', 'usage_billing.usage_aggregates',
               'usage_billing.usage_aggregate_slots', 'usage_billing.aggregate_totals',
               'usage_billing.usage_unique_values', 'usage_billing.alert_log',
               'usage_billing.effective_limits', 'usage_billing.current_usage',
               'usage_billing.settings']) r
     WHERE to_regclass(r) IS NOT NULL
$$;

-- roles given tenant access before this version can read the new relations too
DO $tenants$
DECLARE
    r name;
BEGIN
    FOR r IN SELECT DISTINCT g.rolname
               FROM pg_class c, aclexplode(c.relacl) x
               JOIN pg_roles g ON g.oid = x.grantee
              WHERE c.oid = 'usage_billing.usage_aggregates'::regclass
                AND x.privilege_type = 'SELECT'
                AND g.rolname NOT IN ('usage_billing_admin', 'usage_billing_writer', 'usage_billing_reader')
                AND NOT g.rolsuper
    LOOP
        EXECUTE format('GRANT SELECT ON usage_billing.usage_aggregate_slots, usage_billing.aggregate_totals TO %I', r);
    END LOOP;
END
$tenants$;

-- the views that show totals read them with the slots
CREATE OR REPLACE VIEW usage_billing.current_usage WITH (security_invoker = true) AS
SELECT c.customer_id, c.plan, m.meter, pb.period_start, pb.period_end,
       coalesce(a.total, 0) AS total,
       coalesce(a.event_count, 0) AS event_count,
       l.included,
       l.hard_cap,
       CASE WHEN l.included > 0 THEN round(100 * coalesce(a.total, 0) / l.included, 1) END AS usage_percent,
       c.status
  FROM usage_billing.customers c
  JOIN usage_billing.plans p ON p.plan = c.plan
 CROSS JOIN LATERAL usage_billing.period_bounds(c.billing_anchor, p.period, now()) pb
 CROSS JOIN usage_billing.meters m
  LEFT JOIN usage_billing.effective_limits l ON l.customer_id = c.customer_id AND l.meter = m.meter
  LEFT JOIN usage_billing.aggregate_totals a
         ON a.customer_id = c.customer_id AND a.meter = m.meter AND a.period_start = pb.period_start
 WHERE a.customer_id IS NOT NULL OR l.meter IS NOT NULL;
COMMENT ON VIEW usage_billing.current_usage IS
    'Current billing period usage per customer and meter, with limit and percent used.';

-- ---------------------------------------------------------------------------
-- Alerts (read by the hot path, so part of 1.0)
-- ---------------------------------------------------------------------------

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
       CASE WHEN c.stripe_customer_id IS NULL THEN 'no_stripe_customer'
            WHEN coalesce(o.failed_events, 0) > 0 THEN 'failed'
            WHEN m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
                 AND coalesce(s.planned, 0) - floor(a.total)
                     > coalesce(x.cancelling, 0) + coalesce(k.cancellable, 0)
                 THEN 'needs_manual_credit'
            WHEN m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
                 THEN 'cancelling'
            WHEN coalesce(s.exported, 0) = floor(a.total) THEN 'in_sync'
            ELSE 'pending' END AS state,
       coalesce(x.cancelling, 0) AS cancelling,
       coalesce(x.cancelled, 0) AS cancelled
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
                            WHERE xc.identifier = ob.identifier)) k ON true;

-- the export plans what Stripe has not received from the totals with their slots
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

    WITH cand AS (
        SELECT a.customer_id, a.meter, a.period_start, a.period_end,
               floor(a.total) AS target,
               m.aggregation IN ('sum', 'count') AS additive,
               m.stripe_event_name, c.stripe_customer_id,
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
               usage_billing.export_identifier(customer_id, meter, period_start, seq::integer) AS ident
          FROM timed
    ), ins AS (
        INSERT INTO usage_billing.export_outbox
            (customer_id, meter, period_start, seq, stripe_customer_id, event_name, value, additive,
             identifier, idempotency_key, event_ts, status, last_error)
        SELECT customer_id, meter, period_start, seq, stripe_customer_id, stripe_event_name,
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
COMMENT ON FUNCTION usage_billing.export_plan(integer) IS
    'Internal (export worker): writes the outbox rows that bring Stripe to floor(total); returns how many.';

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
           AND NOT EXISTS (SELECT 1 FROM usage_billing.export_cancels x WHERE x.identifier = o.identifier)
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
COMMENT ON FUNCTION usage_billing.export_cancel_plan(interval, integer) IS
    'Internal (export worker): writes the meter event cancels that bring Stripe down to a lowered floor(total); returns how many.';
