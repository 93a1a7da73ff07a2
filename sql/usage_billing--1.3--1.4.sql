-- usage_billing 1.3 -> 1.4: recording you can bill from.
\echo Use "ALTER EXTENSION usage_billing UPDATE" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Strict input and exact idempotency
-- ---------------------------------------------------------------------------
-- Every path that records (increment_usage, increment_usage_batch, the corrections) refuses
-- what would corrupt billing, with 22023 and a detail naming the field and the limit:
-- amounts with more decimals than their meter's, above its max_amount, other than 1 on a count
-- meter; occurred_at more than usage_billing.max_future_skew ahead or older than the
-- late-event grace (35 days after the period's end by default); unknown or missing keys of a
-- batch event; a stripe_customer_id Stripe would not take; a hard cap with an overage price; a
-- void without a reason.  Those checks are in C (record_prepare.c, batch.c, corrections.c) and
-- in the catalog functions below.  An idempotency key repeated with different parameters is
-- 23505, no longer a duplicate.
--
-- Nothing recorded before changes: rows that break the new rules stay as they are, count as
-- before and are listed by the view usage_billing.input_violations.

ALTER TABLE usage_billing.meters
    ADD COLUMN decimals integer NOT NULL DEFAULT 6 CHECK (decimals BETWEEN 0 AND 20),
    ADD COLUMN max_amount numeric NOT NULL DEFAULT 1e12
        CHECK (max_amount > 0 AND max_amount < 'Infinity'::numeric);
COMMENT ON COLUMN usage_billing.meters.decimals IS
    'Most fractional digits of an amount (and of totals): more is refused with 22023.';
COMMENT ON COLUMN usage_billing.meters.max_amount IS
    'Largest amount of one event (and largest correction delta): more is refused with 22023.';

-- Duration meters: sum meters whose unit is a time unit.  create_meter(meter, 'duration',
-- unit => 'seconds' | 'minutes' | 'hours') stores aggregation 'sum' (they add up like sum
-- meters everywhere: limits, pricing, export) and the unit in duration_unit, which
-- record_duration converts spans of time to.
ALTER TABLE usage_billing.meters
    ADD COLUMN duration_unit text CHECK (duration_unit IN ('seconds', 'minutes', 'hours')),
    ADD CHECK (duration_unit IS NULL OR aggregation = 'sum');
COMMENT ON COLUMN usage_billing.meters.duration_unit IS
    'Duration meters: the time unit (seconds, minutes, hours) amounts are in; NULL for other meters.';

DROP FUNCTION usage_billing.create_meter(text, text, text, text, text, text);
CREATE FUNCTION usage_billing.create_meter(
    meter text,
    aggregation text DEFAULT 'sum',
    unit text DEFAULT NULL,
    display_name text DEFAULT NULL,
    stripe_event_name text DEFAULT NULL,
    value_property text DEFAULT NULL,
    decimals integer DEFAULT 6,
    max_amount numeric DEFAULT 1e12)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_billing.check_name('meter name', meter);
    IF aggregation IS NULL OR aggregation NOT IN ('count', 'sum', 'max', 'last', 'unique_count', 'duration') THEN
        RAISE EXCEPTION 'invalid aggregation "%"', aggregation
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use one of count, sum, max, last, unique_count or duration.';
    END IF;
    IF aggregation = 'duration' AND (unit IS NULL OR unit NOT IN ('seconds', 'minutes', 'hours')) THEN
        RAISE EXCEPTION 'duration meter "%" needs a time unit', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "unit" was %s; a duration meter takes seconds, minutes or hours.',
                                  coalesce(quote_literal(unit), 'NULL')),
                  HINT = 'Pass unit => ''seconds'', ''minutes'' or ''hours''.';
    END IF;
    IF aggregation = 'unique_count' AND (value_property IS NULL OR value_property = '') THEN
        RAISE EXCEPTION 'unique_count meter "%" needs a value_property', meter
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Name the properties key whose distinct values are counted, e.g. value_property => ''user_id''.';
    END IF;
    IF stripe_event_name IS NOT NULL AND (stripe_event_name = '' OR length(stripe_event_name) > 100) THEN
        RAISE EXCEPTION 'invalid Stripe event name for meter "%"', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Stripe event names must have between 1 and 100 characters.';
    END IF;
    IF decimals IS NULL OR decimals < 0 OR decimals > 20 THEN
        RAISE EXCEPTION 'invalid decimals for meter "%"', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "decimals" was %s; it must be between 0 and 20.',
                                  coalesce(decimals::text, 'NULL'));
    END IF;
    IF max_amount IS NULL OR max_amount <= 0 OR max_amount = 'NaN'::numeric
       OR max_amount = 'Infinity'::numeric THEN
        RAISE EXCEPTION 'invalid max_amount for meter "%"', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "max_amount" was %s; it must be a finite number greater than 0.',
                                  coalesce(max_amount::text, 'NULL'));
    END IF;
    IF EXISTS (SELECT 1 FROM usage_billing.meters m WHERE m.meter = create_meter.meter) THEN
        RAISE EXCEPTION 'meter "%" already exists', meter
            USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO usage_billing.meters (meter, aggregation, unit, display_name, stripe_event_name,
                                      value_property, decimals, max_amount, duration_unit)
    VALUES (meter, CASE WHEN aggregation = 'duration' THEN 'sum' ELSE aggregation END, unit,
            display_name, stripe_event_name, value_property, decimals, max_amount,
            CASE WHEN aggregation = 'duration' THEN unit END);
END
$$;
COMMENT ON FUNCTION usage_billing.create_meter(text, text, text, text, text, text, integer, numeric) IS
    'Creates a meter; aggregation is count, sum, max, last, unique_count or duration (unit seconds, minutes or hours); amounts have at most decimals fractional digits and are at most max_amount.';
REVOKE ALL ON FUNCTION usage_billing.create_meter(text, text, text, text, text, text, integer, numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.create_meter(text, text, text, text, text, text, integer, numeric)
    TO usage_billing_admin;

CREATE FUNCTION usage_billing.record_duration(
    customer_id text,
    meter text,
    started_at timestamptz,
    ended_at timestamptz,
    idempotency_key text DEFAULT NULL)
RETURNS TABLE (
    total numeric,
    included numeric,
    remaining numeric,
    status text,
    duplicate boolean,
    period_start timestamptz,
    period_end timestamptz)
AS 'MODULE_PATHNAME', 'ub_record_duration'
LANGUAGE C VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.record_duration(text, text, timestamptz, timestamptz, text) IS
    'Records the span [started_at, ended_at) on a duration meter in its unit, split across billing periods; returns the state of the period of ended_at.';
REVOKE ALL ON FUNCTION usage_billing.record_duration(text, text, timestamptz, timestamptz, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.record_duration(text, text, timestamptz, timestamptz, text)
    TO usage_billing_writer;

-- Stripe customer ids: 1 to 100 characters, none of them white space or control characters.
CREATE FUNCTION usage_billing.check_stripe_customer_id(stripe_customer_id text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF stripe_customer_id IS NOT NULL
       AND (stripe_customer_id = '' OR length(stripe_customer_id) > 100
            OR stripe_customer_id ~ '[[:space:][:cntrl:]]') THEN
        RAISE EXCEPTION 'invalid Stripe customer id'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "stripe_customer_id" has %s characters%s; Stripe takes 1 to 100 characters without white space or control characters.',
                                  length(stripe_customer_id),
                                  CASE WHEN stripe_customer_id ~ '[[:space:][:cntrl:]]'
                                       THEN ' with white space or control characters' ELSE '' END),
                  HINT = 'Pass the id Stripe returned for the customer, e.g. ''cus_NffrFeUfNV2Hib''.';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.check_stripe_customer_id(text) IS
    'Internal: raises 22023 unless a Stripe customer id has 1 to 100 characters without white space or control characters.';
REVOKE ALL ON FUNCTION usage_billing.check_stripe_customer_id(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION usage_billing.upsert_customer(
    customer_id text,
    plan text,
    billing_anchor timestamptz DEFAULT NULL,
    stripe_customer_id text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_billing.check_name('customer id', customer_id);
    IF billing_anchor IN ('infinity'::timestamptz, '-infinity'::timestamptz) THEN
        RAISE EXCEPTION 'invalid billing anchor for customer "%"', customer_id
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'The billing anchor must be a finite timestamp.';
    END IF;
    PERFORM usage_billing.check_stripe_customer_id(stripe_customer_id);
    IF plan IS NOT NULL AND NOT EXISTS (SELECT 1 FROM usage_billing.plans p WHERE p.plan = upsert_customer.plan) THEN
        RAISE EXCEPTION 'plan "%" does not exist', plan
            USING ERRCODE = 'no_data_found';
    END IF;

    UPDATE usage_billing.customers c
       SET plan = coalesce(upsert_customer.plan, c.plan),
           billing_anchor = coalesce(upsert_customer.billing_anchor, c.billing_anchor),
           stripe_customer_id = coalesce(upsert_customer.stripe_customer_id, c.stripe_customer_id),
           updated_at = now()
     WHERE c.customer_id = upsert_customer.customer_id;
    IF FOUND THEN
        RETURN;
    END IF;

    IF plan IS NULL THEN
        RAISE EXCEPTION 'a new customer needs a plan'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Customer "%s" does not exist yet.', customer_id);
    END IF;
    INSERT INTO usage_billing.customers (customer_id, plan, billing_anchor, stripe_customer_id)
    VALUES (customer_id, plan,
            coalesce(billing_anchor, date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
            stripe_customer_id)
    ON CONFLICT ON CONSTRAINT customers_pkey DO UPDATE
        SET plan = EXCLUDED.plan,
            billing_anchor = coalesce(upsert_customer.billing_anchor, usage_billing.customers.billing_anchor),
            stripe_customer_id = coalesce(EXCLUDED.stripe_customer_id, usage_billing.customers.stripe_customer_id),
            updated_at = now();
END
$$;
COMMENT ON FUNCTION usage_billing.upsert_customer(text, text, timestamptz, text) IS
    'Creates a customer, or changes its plan, billing anchor or Stripe id (NULL = unchanged; a Stripe id has 1 to 100 characters, no white space).';

CREATE OR REPLACE FUNCTION usage_billing.set_plan_limit(
    plan text,
    meter text,
    included numeric DEFAULT NULL,
    hard_cap boolean DEFAULT false,
    overage_price numeric DEFAULT NULL,
    overage_unit numeric DEFAULT 1,
    soft_threshold numeric DEFAULT 0.8,
    tiers jsonb DEFAULT NULL,
    tier_mode text DEFAULT 'graduated')
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM usage_billing.plans p WHERE p.plan = set_plan_limit.plan) THEN
        RAISE EXCEPTION 'plan "%" does not exist', plan
            USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM usage_billing.meters m WHERE m.meter = set_plan_limit.meter) THEN
        RAISE EXCEPTION 'meter "%" does not exist', meter
            USING ERRCODE = 'no_data_found';
    END IF;
    IF included < 0 OR included = 'NaN'::numeric OR included = 'Infinity'::numeric THEN
        RAISE EXCEPTION 'invalid included quantity for meter "%"', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The included quantity must be a finite number of zero or more, not %s.', included);
    END IF;
    IF hard_cap IS NULL THEN
        hard_cap := false;
    END IF;
    IF hard_cap AND included IS NULL THEN
        RAISE EXCEPTION 'hard cap on meter "%" needs an included quantity', meter
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Give included, or set hard_cap => false for an unlimited meter.';
    END IF;
    IF hard_cap AND overage_price IS NOT NULL THEN
        RAISE EXCEPTION 'meter "%" cannot have both a hard cap and an overage price', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Fields "hard_cap" (true) and "overage_price" (%s) contradict each other: a hard cap refuses the usage an overage price would bill.', overage_price),
                  HINT = 'Keep hard_cap => true to stop at included, or an overage_price to bill beyond it.';
    END IF;
    IF overage_price < 0 OR overage_price = 'NaN'::numeric OR overage_price = 'Infinity'::numeric THEN
        RAISE EXCEPTION 'invalid overage price for meter "%"', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The overage price must be a finite number of zero or more, not %s.', overage_price);
    END IF;
    IF overage_unit IS NULL OR overage_unit <= 0 OR overage_unit = 'NaN'::numeric OR overage_unit = 'Infinity'::numeric THEN
        RAISE EXCEPTION 'invalid overage unit for meter "%"', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The overage unit must be greater than zero, not %s.', coalesce(overage_unit::text, 'NULL'));
    END IF;
    IF soft_threshold < 0 OR soft_threshold = 'NaN'::numeric OR soft_threshold = 'Infinity'::numeric THEN
        RAISE EXCEPTION 'invalid soft threshold for meter "%"', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The soft threshold is a fraction of included and must be zero or more, not %s.', soft_threshold);
    END IF;
    IF tier_mode IS NULL OR tier_mode NOT IN ('graduated', 'volume') THEN
        RAISE EXCEPTION 'invalid tier mode "%"', tier_mode
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use graduated or volume.';
    END IF;
    IF tiers IS NOT NULL THEN
        IF overage_price IS NOT NULL THEN
            RAISE EXCEPTION 'meter "%" cannot have both tiers and an overage price', meter
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Tiers price the whole quantity; express a free allowance as a first tier with unit_price 0.';
        END IF;
        PERFORM usage_billing.validate_tiers(tiers);
    END IF;

    INSERT INTO usage_billing.plan_limits AS l
        (plan, meter, included, hard_cap, overage_price, overage_unit, soft_threshold, tiers, tier_mode)
    VALUES (plan, meter, included, hard_cap, overage_price, overage_unit, soft_threshold, tiers, tier_mode)
    ON CONFLICT ON CONSTRAINT plan_limits_pkey DO UPDATE
        SET included = EXCLUDED.included,
            hard_cap = EXCLUDED.hard_cap,
            overage_price = EXCLUDED.overage_price,
            overage_unit = EXCLUDED.overage_unit,
            soft_threshold = EXCLUDED.soft_threshold,
            tiers = EXCLUDED.tiers,
            tier_mode = EXCLUDED.tier_mode;
END
$$;
COMMENT ON FUNCTION usage_billing.set_plan_limit(text, text, numeric, boolean, numeric, numeric, numeric, jsonb, text) IS
    'Inserts or replaces the limit and pricing of a meter in a plan (a hard cap and an overage price exclude each other).';

-- What was recorded or configured before 1.4 and breaks its rules: kept as it was, listed here.
CREATE VIEW usage_billing.input_violations WITH (security_invoker = true) AS
SELECT 'customer'::text AS object, c.customer_id AS customer_id, NULL::text AS meter,
       NULL::bigint AS event_id, 'stripe_customer_id'::text AS field,
       format('stripe_customer_id has %s characters%s; Stripe takes 1 to 100 without white space or control characters',
              length(c.stripe_customer_id),
              CASE WHEN c.stripe_customer_id ~ '[[:space:][:cntrl:]]'
                   THEN ' with white space or control characters' ELSE '' END) AS problem
  FROM usage_billing.customers c
 WHERE c.stripe_customer_id IS NOT NULL
   AND (length(c.stripe_customer_id) > 100 OR c.stripe_customer_id ~ '[[:space:][:cntrl:]]')
UNION ALL
SELECT 'plan_limit', NULL, l.meter, NULL, 'hard_cap',
       format('plan "%s" has both a hard cap and an overage price (%s) on this meter', l.plan, l.overage_price)
  FROM usage_billing.plan_limits l
 WHERE l.hard_cap AND l.overage_price IS NOT NULL
UNION ALL
SELECT 'usage_event', e.customer_id, e.meter, e.event_id, v.field, v.problem
  FROM usage_billing.usage_events e
  JOIN usage_billing.meters m ON m.meter = e.meter
 CROSS JOIN LATERAL (VALUES
        ('amount',
         CASE WHEN m.aggregation = 'count' AND e.amount <> 1
              THEN format('amount %s on a count meter, which takes 1 per event', e.amount) END),
        ('amount',
         CASE WHEN min_scale(e.amount) > m.decimals
              THEN format('amount %s has %s decimals; the meter takes %s', e.amount, min_scale(e.amount), m.decimals) END),
        ('amount',
         CASE WHEN abs(e.amount) > m.max_amount
              THEN format('amount %s is above the meter''s max_amount %s', e.amount, m.max_amount) END),
        ('occurred_at',
         CASE WHEN e.occurred_at > e.recorded_at + interval '5 minutes'
              THEN 'occurred_at is more than 5 minutes after the event was recorded' END))
        AS v(field, problem)
 WHERE e.kind = 'usage' AND v.problem IS NOT NULL
UNION ALL
SELECT 'usage_event', e.customer_id, e.meter, e.event_id, 'reason',
       format('%s without a reason', e.kind)
  FROM usage_billing.usage_events e
 WHERE e.kind = 'void' AND (e.reason IS NULL OR btrim(e.reason) = '');
COMMENT ON VIEW usage_billing.input_violations IS
    'Catalog rows and ledger rows from before 1.4 that break its input rules; they keep counting as recorded.';
REVOKE ALL ON usage_billing.input_violations FROM PUBLIC;
GRANT SELECT ON usage_billing.input_violations
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

-- ---------------------------------------------------------------------------
-- Reservations: check and hold in one step
-- ---------------------------------------------------------------------------
-- A hold is a reservation row with status 'held' that has not expired.  Holds count against
-- the hard cap of their key at once: usage_aggregates.reserved is the sum of the key's held
-- amounts, changed only under the aggregate row's lock (reserve, commit, release, and the
-- lazy expiry of holds past expires_at when a decision needs the room).  Readers that must not
-- count expired holds (check_limit) sum the live ones.

ALTER TABLE usage_billing.usage_aggregates
    ADD COLUMN reserved numeric NOT NULL DEFAULT 0;

CREATE TABLE usage_billing.reservations (
    reservation_id  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id     text NOT NULL,
    meter           text NOT NULL,
    period_start    timestamptz NOT NULL,
    amount          numeric NOT NULL,
    expires_at      timestamptz NOT NULL,
    idempotency_key text,
    -- 'held', then 'committed', 'released' or 'expired'
    status          text NOT NULL DEFAULT 'held',
    committed_amount numeric,
    created_at      timestamptz NOT NULL DEFAULT now(),
    ended_at        timestamptz
);
CREATE UNIQUE INDEX reservations_idempotency_idx
    ON usage_billing.reservations (customer_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX reservations_held_idx
    ON usage_billing.reservations (customer_id, meter, period_start) WHERE status = 'held';
COMMENT ON TABLE usage_billing.reservations IS
    'Holds against hard caps: reserve_usage makes one, commit_reservation records it as usage, release_reservation or expiry frees it.';
SELECT pg_catalog.pg_extension_config_dump('usage_billing.reservations', '');
-- the same access and row-level security as the aggregates: tenants see their own holds
REVOKE ALL ON usage_billing.reservations FROM PUBLIC;
GRANT SELECT ON usage_billing.reservations
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;
ALTER TABLE usage_billing.reservations ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.reservations FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.reservations FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.reservations IS
    'The three usage_billing roles see every row (they write only through functions).';

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
               'usage_billing.settings', 'usage_billing.reservations']) r
     WHERE to_regclass(r) IS NOT NULL
$$;

-- roles given tenant access before this version can read their holds too
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
        EXECUTE format('GRANT SELECT ON usage_billing.reservations TO %I', r);
    END LOOP;
END
$tenants$;

CREATE FUNCTION usage_billing.reserve_usage(
    customer_id text, meter text, amount numeric,
    ttl interval DEFAULT '15 minutes', idempotency_key text DEFAULT NULL)
RETURNS TABLE (reservation_id uuid, expires_at timestamptz, remaining numeric)
AS 'MODULE_PATHNAME', 'ub_reserve_usage'
LANGUAGE C VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.reserve_usage(text, text, numeric, interval, text) IS
    'Holds amount against the meter''s hard cap until commit_reservation, release_reservation or ttl (PT402 when it does not fit).';

CREATE FUNCTION usage_billing.commit_reservation(reservation_id uuid, amount numeric DEFAULT NULL)
RETURNS TABLE (total numeric, included numeric, remaining numeric, status text,
               duplicate boolean, period_start timestamptz, period_end timestamptz)
AS 'MODULE_PATHNAME', 'ub_commit_reservation'
LANGUAGE C VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.commit_reservation(uuid, numeric) IS
    'Records the reservation as usage, exactly once (NULL amount: the amount held), and frees its hold.';

CREATE FUNCTION usage_billing.release_reservation(reservation_id uuid)
RETURNS void
AS 'MODULE_PATHNAME', 'ub_release_reservation'
LANGUAGE C VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.release_reservation(uuid) IS
    'Frees a reservation''s hold without recording usage; releasing twice does nothing.';

REVOKE ALL ON FUNCTION usage_billing.reserve_usage(text, text, numeric, interval, text),
    usage_billing.commit_reservation(uuid, numeric),
    usage_billing.release_reservation(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.reserve_usage(text, text, numeric, interval, text),
    usage_billing.commit_reservation(uuid, numeric),
    usage_billing.release_reservation(uuid) TO usage_billing_writer;

-- check_limit reports the live holds of the key (reserved) and counts them against hard caps
DROP FUNCTION usage_billing.check_limit(text, text, numeric);
CREATE FUNCTION usage_billing.check_limit(
    customer_id text, meter text, requested numeric DEFAULT 1)
RETURNS TABLE (
    allowed boolean,
    current numeric,
    included numeric,
    remaining numeric,
    status text,
    overage_allowed boolean,
    estimated_overage_cost numeric,
    reason text,
    reserved numeric)
AS 'MODULE_PATHNAME', 'ub_check_limit'
LANGUAGE C STABLE;
COMMENT ON FUNCTION usage_billing.check_limit(text, text, numeric) IS
    'Read-only: would recording "requested" succeed, and what would it cost?  Holds (reserved) count against hard caps.';
REVOKE ALL ON FUNCTION usage_billing.check_limit(text, text, numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.check_limit(text, text, numeric)
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

-- ---------------------------------------------------------------------------
-- New-user fixes
-- ---------------------------------------------------------------------------
-- What a new user tripped over in 1.3, each fixed here (the C parts are in insight.c,
-- report.c and summary.c):
--   current_usage   its "status" is the customer's account status, not the usage status:
--                   customer_status and usage_status are new columns; status stays (same value
--                   as customer_status) so that queries and views built on it keep working.
--   export_status   a new column "reason" says why a row is not in sync, e.g. that no Stripe
--                   API key is configured (export_blocker()).
--   export_worker_info()  executable by usage_billing_admin.
--   set_tenant_claim      takes a dotted path into the JWT claims (app_metadata.org_id).
--   usage_billing_service a role for backends that record and read (writer + reader);
--                   Supabase's service_role is made a member when it exists.
--   my_usage        its hint no longer points tenants at set_tenant_claim (an admin function).

-- current_usage: new columns at the end (CREATE OR REPLACE VIEW may only append)
CREATE OR REPLACE VIEW usage_billing.current_usage WITH (security_invoker = true) AS
SELECT c.customer_id, c.plan, m.meter, pb.period_start, pb.period_end,
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
  JOIN usage_billing.plans p ON p.plan = c.plan
 CROSS JOIN LATERAL usage_billing.period_bounds(c.billing_anchor, p.period, now()) pb
 CROSS JOIN usage_billing.meters m
  LEFT JOIN usage_billing.effective_limits l ON l.customer_id = c.customer_id AND l.meter = m.meter
  LEFT JOIN usage_billing.aggregate_totals a
         ON a.customer_id = c.customer_id AND a.meter = m.meter AND a.period_start = pb.period_start
 WHERE a.customer_id IS NOT NULL OR l.meter IS NOT NULL;
COMMENT ON VIEW usage_billing.current_usage IS
    'Current billing period usage per customer and meter, with limit, percent used, usage status (ok, warning, over_limit) and the customer''s account status.';
COMMENT ON COLUMN usage_billing.current_usage.status IS
    'Deprecated name of customer_status (the account status: active, suspended, canceled), kept for compatibility; it is not the usage status (usage_status).';
COMMENT ON COLUMN usage_billing.current_usage.customer_status IS
    'The customer''s account status: active, suspended or canceled.';
COMMENT ON COLUMN usage_billing.current_usage.usage_status IS
    'The usage status increment_usage would report for this total: ok, warning (at or above the soft threshold) or over_limit (above included).';

-- Why the export cannot send at all, or NULL: read by export_status.reason.
CREATE FUNCTION usage_billing.export_blocker()
RETURNS text
AS 'MODULE_PATHNAME', 'ub_export_blocker'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.export_blocker() IS
    'Why the export worker sends nothing (not preloaded, export_interval 0, no Stripe API key), or NULL; never shows the key.';
REVOKE ALL ON FUNCTION usage_billing.export_blocker() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.export_blocker()
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

-- export_status: the 1.3 view with a reason column at the end
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
            ELSE coalesce(b.blocker,
                          CASE WHEN a.total < 0 THEN 'the total is negative: nothing is sent'
                               WHEN coalesce(o.pending_events, 0) > 0 THEN 'sent or being sent, waiting for Stripe''s answer'
                               ELSE 'waiting for the next export cycle' END)
            END AS reason
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
                            WHERE xc.identifier = ob.identifier)) k ON true
 CROSS JOIN LATERAL (
        SELECT CASE WHEN c.stripe_customer_id IS NULL THEN 'no_stripe_customer'
                    WHEN coalesce(o.failed_events, 0) > 0 THEN 'failed'
                    WHEN m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
                         AND coalesce(s.planned, 0) - floor(a.total)
                             > coalesce(x.cancelling, 0) + coalesce(k.cancellable, 0)
                         THEN 'needs_manual_credit'
                    WHEN m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
                         THEN 'cancelling'
                    WHEN coalesce(s.exported, 0) = floor(a.total) THEN 'in_sync'
                    ELSE 'pending' END AS state) st
 CROSS JOIN (SELECT usage_billing.export_blocker() AS blocker) b;
COMMENT ON COLUMN usage_billing.export_status.reason IS
    'Why the row is not in sync (NULL when it is): no Stripe customer id, no Stripe API key configured, worker not running, Stripe''s error, waiting for the next cycle, ...';

-- export_worker_info(): the admin role monitors the worker too
GRANT EXECUTE ON FUNCTION usage_billing.export_worker_info() TO usage_billing_admin;

-- Tenant claims: a dotted path into the JWT claims (app_metadata.org_id); a top-level claim
-- whose name contains dots (https://example.com/customer) still wins when it is present.
CREATE OR REPLACE FUNCTION usage_billing.current_customer_id()
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * The customer of the current request: the tenant claim (default "sub") of the JSON in
 * request.jwt.claims, as PostgREST sets it per transaction; older PostgREST versions set one
 * setting per top-level claim (request.jwt.claim.<name>, objects as JSON text), read as a
 * fallback.  A claim with dots is a path (app_metadata.org_id) unless a top-level claim has
 * that very name.  NULL when there is no request, no such claim, the claim is an object, an
 * array or null, or the claims are not a JSON object: NULL matches no row.
 */
DECLARE
    claim  text;
    path   text[];
    raw    text;
    claims jsonb;
    v      jsonb;
BEGIN
    SELECT s.value INTO claim FROM usage_billing.settings s WHERE s.name = 'tenant_claim';
    claim := coalesce(claim, 'sub');
    path := string_to_array(claim, '.');
    raw := current_setting('request.jwt.claims', true);
    IF raw IS NULL OR raw = '' THEN
        raw := nullif(current_setting('request.jwt.claim.' || claim, true), '');
        IF raw IS NOT NULL OR cardinality(path) < 2 THEN
            RETURN raw;
        END IF;
        -- a path: the first name's setting holds its object as JSON
        raw := current_setting('request.jwt.claim.' || path[1], true);
        IF raw IS NULL OR raw = '' THEN
            RETURN NULL;
        END IF;
        BEGIN
            claims := jsonb_build_object(path[1], raw::jsonb);
        EXCEPTION WHEN invalid_text_representation THEN
            RETURN NULL;
        END;
    ELSE
        BEGIN
            claims := raw::jsonb;
        EXCEPTION WHEN invalid_text_representation THEN
            RETURN NULL;
        END;
    END IF;
    IF jsonb_typeof(claims) IS DISTINCT FROM 'object' THEN
        RETURN NULL;
    END IF;
    IF claims ? claim OR cardinality(path) < 2 THEN
        v := claims -> claim;
    ELSE
        v := claims #> path;
    END IF;
    IF v IS NULL OR jsonb_typeof(v) IN ('object', 'array', 'null') THEN
        RETURN NULL;
    END IF;
    RETURN nullif(v #>> '{}', '');
END
$$;
COMMENT ON FUNCTION usage_billing.current_customer_id() IS
    'The customer_id of the current PostgREST request (JWT claim or dotted claim path named by the tenant_claim setting, default sub), or NULL.';

CREATE OR REPLACE FUNCTION usage_billing.set_tenant_claim(claim text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF claim IS NULL OR claim = '' OR length(claim) > 200 THEN
        RAISE EXCEPTION 'invalid tenant claim'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'The claim name must have between 1 and 200 characters.',
                  HINT = 'Name the JWT claim that holds the customer_id, e.g. sub, customer_id or app_metadata.org_id.';
    END IF;
    IF claim ~ '^\.|\.\.|\.$' THEN
        RAISE EXCEPTION 'invalid tenant claim "%"', claim
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A claim path names one claim per dot-separated part; no part may be empty.',
                  HINT = 'For a nested claim write its path, e.g. app_metadata.org_id.';
    END IF;
    INSERT INTO usage_billing.settings AS s (name, value) VALUES ('tenant_claim', claim)
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value;
END
$$;
COMMENT ON FUNCTION usage_billing.set_tenant_claim(text) IS
    'Names the JWT claim (in request.jwt.claims) that holds a tenant''s customer_id, or its dotted path (app_metadata.org_id); the default is sub.';

-- my_usage: what a tenant can act on, no pointer to admin functions
CREATE OR REPLACE FUNCTION usage_billing.my_usage()
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
    claim text;
BEGIN
    IF me IS NULL THEN
        SELECT s.value INTO claim FROM usage_billing.settings s WHERE s.name = 'tenant_claim';
        RAISE EXCEPTION 'the request names no customer'
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('The JWT of the request has no usable "%s" claim.', coalesce(claim, 'sub')),
                  HINT = 'Call my_usage through PostgREST with a signed JWT that carries your customer id.';
    END IF;
    RETURN QUERY SELECT s.* FROM usage_billing.get_usage_summary(me) s;
END
$$;

-- A role for backends that record and read (Supabase's service_role): the writer's and the
-- reader's rights, nothing of the admin's.
DO $service$
DECLARE
    existing record;
BEGIN
    SELECT rolsuper, rolbypassrls, rolcanlogin INTO existing
      FROM pg_catalog.pg_roles WHERE rolname = 'usage_billing_service';
    IF NOT FOUND THEN
        CREATE ROLE usage_billing_service NOLOGIN;
    ELSIF existing.rolsuper OR existing.rolbypassrls THEN
        RAISE EXCEPTION 'role "%" already exists with SUPERUSER or BYPASSRLS', 'usage_billing_service'
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'usage_billing grants this role access to billing data and relies on row-level security applying to it.',
                  HINT = 'Drop the role or ALTER ROLE usage_billing_service NOSUPERUSER NOBYPASSRLS, then retry.';
    ELSIF existing.rolcanlogin THEN
        RAISE WARNING 'role "%" already exists and can log in', 'usage_billing_service'
            USING DETAIL = 'usage_billing reuses it; the roles it creates itself are NOLOGIN.',
                  HINT = 'Check who can log in as this role and who is a member of it.';
    END IF;
    IF NOT pg_catalog.pg_has_role('usage_billing_service', 'usage_billing_writer', 'MEMBER') THEN
        GRANT usage_billing_writer TO usage_billing_service;
    END IF;
    IF NOT pg_catalog.pg_has_role('usage_billing_service', 'usage_billing_reader', 'MEMBER') THEN
        GRANT usage_billing_reader TO usage_billing_service;
    END IF;
    -- Supabase: the backend's role records and reads
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role')
       AND NOT pg_catalog.pg_has_role('service_role', 'usage_billing_service', 'MEMBER') THEN
        GRANT usage_billing_service TO service_role;
    END IF;
END
$service$;
COMMENT ON ROLE usage_billing_service IS
    'usage_billing: a backend that records and reads (member of usage_billing_writer and usage_billing_reader).';

-- a staff role (or a member of one) sees every customer: it cannot be a tenant role
CREATE OR REPLACE FUNCTION usage_billing.grant_tenant_access(tenant_role name)
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
    IF tenant_role IN ('usage_billing_admin', 'usage_billing_writer', 'usage_billing_reader',
                       'usage_billing_service')
       OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = tenant_role AND (r.rolsuper OR r.rolbypassrls))
       OR EXISTS (SELECT 1 FROM unnest(ARRAY['usage_billing_admin', 'usage_billing_writer',
                                             'usage_billing_reader']) g
                   WHERE pg_has_role(tenant_role, g, 'MEMBER')) THEN
        RAISE EXCEPTION 'role "%" cannot be a tenant role', tenant_role
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Staff roles, their members, superusers and roles with BYPASSRLS see every customer.';
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
