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

-- ---------------------------------------------------------------------------
-- Plan history and finalized invoices
-- ---------------------------------------------------------------------------
-- A customer's plan is a history: customer_plans holds one row per plan change, each in force
-- from its effective_from until the next row's.  The first row starts at -infinity (the first
-- plan is in force in every period before the first change).  The plan in force at an instant
-- is computed from the history and that instant, by SQL (plan_at) and by the C paths from
-- their catalog cache alike, so a change scheduled for the end of a period takes effect at the
-- boundary without anything being written then.  customers.plan keeps the plan in force when
-- the customer was last changed (a convenience for psql; the history is authoritative).
--
-- All plans of one customer's history have the plan's period and currency of the first: a
-- period is priced by segments of one length and in one currency (change_plan refuses
-- others with 22023).

CREATE TABLE usage_billing.customer_plans (
    customer_id    text NOT NULL REFERENCES usage_billing.customers ON DELETE CASCADE,
    effective_from timestamptz NOT NULL CHECK (effective_from <> 'infinity'),
    plan           text NOT NULL REFERENCES usage_billing.plans,
    changed_at     timestamptz NOT NULL DEFAULT now(),
    changed_by     text NOT NULL DEFAULT current_user,
    PRIMARY KEY (customer_id, effective_from)
);
COMMENT ON TABLE usage_billing.customer_plans IS
    'Plan history: each row is in force from effective_from until the next row of the customer (the first from -infinity).';
CREATE TRIGGER customer_plans_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_billing.customer_plans
    FOR EACH STATEMENT EXECUTE FUNCTION usage_billing.catalog_changed();

-- existing customers: their plan has been in force from the beginning
INSERT INTO usage_billing.customer_plans (customer_id, effective_from, plan, changed_at, changed_by)
SELECT c.customer_id, '-infinity', c.plan, c.created_at, 'usage_billing 1.4 upgrade'
  FROM usage_billing.customers c;

CREATE FUNCTION usage_billing.plan_at(customer_id text, at timestamptz)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT h.plan FROM usage_billing.customer_plans h
                      WHERE h.customer_id = plan_at.customer_id AND h.effective_from <= plan_at.at
                      ORDER BY h.effective_from DESC LIMIT 1),
                    (SELECT c.plan FROM usage_billing.customers c
                      WHERE c.customer_id = plan_at.customer_id))
$$;
COMMENT ON FUNCTION usage_billing.plan_at(text, timestamptz) IS
    'The plan in force for a customer at an instant, from its plan history.';

CREATE VIEW usage_billing.plan_history WITH (security_invoker = true) AS
SELECT h.customer_id, h.plan, h.effective_from,
       lead(h.effective_from) OVER (PARTITION BY h.customer_id ORDER BY h.effective_from) AS effective_to,
       h.changed_at, h.changed_by
  FROM usage_billing.customer_plans h
UNION ALL
SELECT c.customer_id, c.plan, '-infinity'::timestamptz, NULL, c.created_at, NULL
  FROM usage_billing.customers c
 WHERE NOT EXISTS (SELECT 1 FROM usage_billing.customer_plans h WHERE h.customer_id = c.customer_id);
COMMENT ON VIEW usage_billing.plan_history IS
    'Each plan of a customer and when it is in force: [effective_from, effective_to), effective_to NULL for the last.';

-- The limits in force now follow the history.
CREATE OR REPLACE VIEW usage_billing.effective_limits WITH (security_invoker = true) AS
SELECT c.customer_id, pl.meter,
       CASE WHEN cl.customer_id IS NOT NULL THEN cl.included ELSE pl.included END AS included,
       coalesce(cl.hard_cap, pl.hard_cap) AS hard_cap,
       pl.overage_price, pl.overage_unit, pl.soft_threshold, pl.tiers, pl.tier_mode,
       cl.customer_id IS NOT NULL AS overridden
  FROM usage_billing.customers c
  JOIN usage_billing.plan_limits pl ON pl.plan = usage_billing.plan_at(c.customer_id, now())
  LEFT JOIN usage_billing.customer_limits cl ON cl.customer_id = c.customer_id AND cl.meter = pl.meter
UNION ALL
SELECT cl.customer_id, cl.meter, cl.included, coalesce(cl.hard_cap, false),
       NULL, 1, 0.8, NULL, 'graduated', true
  FROM usage_billing.customer_limits cl
  JOIN usage_billing.customers c ON c.customer_id = cl.customer_id
 WHERE NOT EXISTS (SELECT 1 FROM usage_billing.plan_limits pl
                    WHERE pl.plan = usage_billing.plan_at(c.customer_id, now()) AND pl.meter = cl.meter);

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
  JOIN usage_billing.plans p ON p.plan = usage_billing.plan_at(c.customer_id, now())
 CROSS JOIN LATERAL usage_billing.period_bounds(c.billing_anchor, p.period, now()) pb
 CROSS JOIN usage_billing.meters m
  LEFT JOIN usage_billing.effective_limits l ON l.customer_id = c.customer_id AND l.meter = m.meter
  LEFT JOIN usage_billing.aggregate_totals a
         ON a.customer_id = c.customer_id AND a.meter = m.meter AND a.period_start = pb.period_start
 WHERE a.customer_id IS NOT NULL OR l.meter IS NOT NULL;

-- the work of change_plan, whose argument "plan" is also a result column (PL/pgSQL takes one)
CREATE FUNCTION usage_billing.apply_plan_change(
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
       SET plan = usage_billing.plan_at(c.customer_id, now()), updated_at = now()
     WHERE c.customer_id = apply_plan_change.customer_id;

    plan := new.plan;
    SELECT max(h.effective_from) INTO apply_plan_change.effective_from
      FROM usage_billing.customer_plans h
     WHERE h.customer_id = apply_plan_change.customer_id AND h.effective_from <= from_at;
END
$$;
COMMENT ON FUNCTION usage_billing.apply_plan_change(text, text, text, timestamptz) IS
    'Internal: the work of change_plan.';
REVOKE ALL ON FUNCTION usage_billing.apply_plan_change(text, text, text, timestamptz) FROM PUBLIC;

CREATE FUNCTION usage_billing.change_plan(
    customer_id text,
    plan text,
    effective text DEFAULT 'auto',
    at timestamptz DEFAULT now())
RETURNS TABLE (plan text, effective_from timestamptz)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.plan, c.effective_from FROM usage_billing.apply_plan_change($1, $2, $3, $4) c
$$;
COMMENT ON FUNCTION usage_billing.change_plan(text, text, text, timestamptz) IS
    'Changes a customer''s plan at "at": immediate, period_end (the end of the period containing "at") or auto (a lower base price at the period''s end, else now); returns the plan and when it takes effect.';
REVOKE ALL ON FUNCTION usage_billing.change_plan(text, text, text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.change_plan(text, text, text, timestamptz) TO usage_billing_admin;

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

    IF EXISTS (SELECT 1 FROM usage_billing.customers c WHERE c.customer_id = upsert_customer.customer_id) THEN
        IF billing_anchor IS NOT NULL
           AND billing_anchor IS DISTINCT FROM (SELECT c.billing_anchor FROM usage_billing.customers c
                                                 WHERE c.customer_id = upsert_customer.customer_id)
           AND EXISTS (SELECT 1 FROM usage_billing.invoices i WHERE i.customer_id = upsert_customer.customer_id) THEN
            RAISE EXCEPTION 'billing anchor of customer "%" cannot change', customer_id
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'The customer has finalized invoices; moving the anchor would move their periods.';
        END IF;
        UPDATE usage_billing.customers c
           SET billing_anchor = coalesce(upsert_customer.billing_anchor, c.billing_anchor),
               stripe_customer_id = coalesce(upsert_customer.stripe_customer_id, c.stripe_customer_id),
               updated_at = now()
         WHERE c.customer_id = upsert_customer.customer_id;
        -- a new plan is a plan change with history
        IF plan IS NOT NULL THEN
            PERFORM usage_billing.change_plan(customer_id, plan, 'auto', now());
        END IF;
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
    ON CONFLICT ON CONSTRAINT customers_pkey DO NOTHING;
    IF NOT FOUND THEN
        -- created concurrently: this call is a change of it
        PERFORM usage_billing.upsert_customer(customer_id, plan, billing_anchor, stripe_customer_id);
        RETURN;
    END IF;
    INSERT INTO usage_billing.customer_plans (customer_id, effective_from, plan)
    VALUES (customer_id, '-infinity', plan);
    -- invoices start with the period of the creation: the periods of a backdated anchor before
    -- it are a backfill, invoiced only when invoice_starts says so
    INSERT INTO usage_billing.invoice_starts (customer_id, invoices_from)
    VALUES (customer_id, now());
END
$$;
COMMENT ON FUNCTION usage_billing.upsert_customer(text, text, timestamptz, text) IS
    'Creates a customer, or changes its plan (change_plan(..., ''auto'')), billing anchor or Stripe id (NULL = unchanged; a Stripe id has 1 to 100 characters, no white space).';

-- Finalized invoices: one per customer and ended billing period, numbered per customer, never
-- changed after finalize_invoices() wrote it (only its status may move on, e.g. to 'paid').
-- invoice_lines keep, besides what an invoice shows, what a later correction is priced
-- with: the usage total of each usage line and a snapshot of its pricing (the effective limit
-- of that segment), so that a void or an adjustment of an invoiced period becomes a credit or
-- debit line on the next invoice, priced as the original line was.
CREATE TABLE usage_billing.invoice_starts (
    customer_id   text PRIMARY KEY REFERENCES usage_billing.customers ON DELETE CASCADE,
    invoices_from timestamptz NOT NULL
);
COMMENT ON TABLE usage_billing.invoice_starts IS
    'The instant whose billing period is a customer''s first invoiced one (its creation; the upgrade to 1.4 for customers created before); set it earlier to invoice a backfill.';
INSERT INTO usage_billing.invoice_starts (customer_id, invoices_from)
SELECT c.customer_id, now() FROM usage_billing.customers c;

CREATE TABLE usage_billing.invoices (
    invoice_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    invoice_number integer NOT NULL CHECK (invoice_number > 0),
    customer_id    text NOT NULL REFERENCES usage_billing.customers,
    period_start   timestamptz NOT NULL,
    period_end     timestamptz NOT NULL CHECK (period_end > period_start),
    currency       text NOT NULL,
    total          numeric NOT NULL,
    status         text NOT NULL DEFAULT 'finalized' CHECK (status IN ('finalized', 'paid', 'void', 'uncollectible')),
    finalized_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (customer_id, period_start),
    UNIQUE (customer_id, invoice_number)
);
COMMENT ON TABLE usage_billing.invoices IS
    'Finalized invoices: one per customer and ended billing period, numbered 1, 2, ... per customer; immutable but for status.';

CREATE TABLE usage_billing.invoice_lines (
    invoice_id       bigint NOT NULL REFERENCES usage_billing.invoices DEFERRABLE INITIALLY DEFERRED,
    line_no          integer NOT NULL,
    line             text NOT NULL CHECK (line IN ('base', 'usage', 'credit', 'debit', 'total')),
    meter            text,
    segment_start    timestamptz,
    quantity         numeric,
    unit_price       numeric,
    amount           numeric NOT NULL,
    for_period_start timestamptz,    -- the billing period the line bills (credit, debit: an earlier one)
    usage_total      numeric,        -- usage, credit, debit: the segment's usage total priced
    pricing          jsonb,          -- usage: the effective limit it was priced with
    PRIMARY KEY (invoice_id, line_no)
);
COMMENT ON TABLE usage_billing.invoice_lines IS
    'Lines of finalized invoices: per segment a base line and usage lines, credit/debit lines for corrections of earlier invoiced periods, a total line.';

-- what each invoiced period's aggregates were when last invoiced: finalize_invoices compares
-- them with the aggregates to find the periods a correction (or a late event) changed since
CREATE TABLE usage_billing.invoiced_totals (
    customer_id  text NOT NULL,
    meter        text NOT NULL,
    period_start timestamptz NOT NULL,
    total        numeric NOT NULL,
    PRIMARY KEY (customer_id, period_start, meter)
);
COMMENT ON TABLE usage_billing.invoiced_totals IS
    'Internal: the aggregates of each invoiced period as last billed (finalization and corrections since).';

CREATE FUNCTION usage_billing.invoice_immutable()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'invoices' THEN
        IF (NEW.invoice_id, NEW.invoice_number, NEW.customer_id, NEW.period_start, NEW.period_end,
            NEW.currency, NEW.total, NEW.finalized_at)
           IS NOT DISTINCT FROM
           (OLD.invoice_id, OLD.invoice_number, OLD.customer_id, OLD.period_start, OLD.period_end,
            OLD.currency, OLD.total, OLD.finalized_at) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'finalized invoices cannot be changed'
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = format('%s on usage_billing.%s was refused; only an invoice''s status may change.',
                              TG_OP, TG_TABLE_NAME),
              HINT = 'Correct usage with void_usage() or adjust_usage(): the next invoice carries the credit or debit.';
END
$$;
COMMENT ON FUNCTION usage_billing.invoice_immutable() IS
    'Internal trigger: finalized invoices and their lines are never updated or deleted (an invoice''s status aside).';
CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON usage_billing.invoices
    FOR EACH ROW EXECUTE FUNCTION usage_billing.invoice_immutable();
CREATE TRIGGER invoice_lines_immutable BEFORE UPDATE OR DELETE ON usage_billing.invoice_lines
    FOR EACH ROW EXECUTE FUNCTION usage_billing.invoice_immutable();

DO $lifecycle$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['customer_plans', 'invoice_starts', 'invoices', 'invoiced_totals']
    LOOP
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
    FOREACH t IN ARRAY ARRAY['customer_plans', 'invoice_starts', 'invoices', 'invoice_lines',
                             'invoiced_totals']
    LOOP
        EXECUTE format('REVOKE ALL ON usage_billing.%I FROM PUBLIC', t);
        EXECUTE format('GRANT SELECT ON usage_billing.%I TO usage_billing_admin,'
                       ' usage_billing_writer, usage_billing_reader', t);
        PERFORM pg_catalog.pg_extension_config_dump('usage_billing.' || t, '');
    END LOOP;
    PERFORM pg_catalog.pg_extension_config_dump(
        pg_catalog.pg_get_serial_sequence('usage_billing.invoices', 'invoice_id'), '');
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC',
                   pg_catalog.pg_get_serial_sequence('usage_billing.invoices', 'invoice_id'));
END
$lifecycle$;
REVOKE ALL ON usage_billing.plan_history FROM PUBLIC;
GRANT SELECT ON usage_billing.plan_history TO usage_billing_admin, usage_billing_writer, usage_billing_reader;
REVOKE ALL ON FUNCTION usage_billing.plan_at(text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.plan_at(text, timestamptz)
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;
REVOKE ALL ON FUNCTION usage_billing.invoice_immutable() FROM PUBLIC;

CREATE FUNCTION usage_billing.invoice_grace()
RETURNS interval
AS 'MODULE_PATHNAME', 'ub_invoice_grace'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.invoice_grace() IS
    'Internal: usage_billing.invoice_grace as an interval (how long after a period''s end it is invoiced).';

CREATE FUNCTION usage_billing.price_usage(pricing jsonb, total numeric)
RETURNS numeric
AS 'MODULE_PATHNAME', 'ub_price_usage'
LANGUAGE C IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.price_usage(jsonb, numeric) IS
    'Internal: the exact usage cost of a total under the pricing snapshot of an invoice line.';

CREATE FUNCTION usage_billing.round_money(amount numeric, currency text)
RETURNS numeric
AS 'MODULE_PATHNAME', 'ub_round_money_sql'
LANGUAGE C IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.round_money(numeric, text) IS
    'Internal: an amount rounded to the currency''s minor unit, half away from zero, as invoice lines are.';

-- One invoice: the period's own lines, then credit and debit lines for the earlier invoiced
-- periods whose aggregates moved since they were last billed, then the total.
CREATE FUNCTION usage_billing.finalize_one(cid text, ps timestamptz, pe timestamptz)
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
            (invoice_id, line_no, line, meter, segment_start, quantity, unit_price, amount,
             for_period_start, usage_total, pricing)
        VALUES (iid, n, r.line, r.meter, r.segment_start, r.quantity, r.unit_price, r.amount,
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
                ON o.invoice_id = oi.invoice_id AND o.line = 'usage' AND o.meter = p.meter
               AND o.segment_start = p.segment_start
             CROSS JOIN LATERAL (
                   SELECT sum(l.amount) AS billed,
                          (array_agg(l.usage_total ORDER BY l.invoice_id DESC, l.line_no DESC))[1] AS last_total
                     FROM usage_billing.invoices li
                     JOIN usage_billing.invoice_lines l ON l.invoice_id = li.invoice_id
                    WHERE li.customer_id = cid AND l.for_period_start = k AND l.meter = p.meter
                      AND l.segment_start = p.segment_start
                      AND l.line IN ('usage', 'credit', 'debit')) b
             WHERE p.line = 'usage'
             ORDER BY p.segment_start, p.meter
        LOOP
            CONTINUE WHEN r.delta = 0;
            n := n + 1;
            INSERT INTO usage_billing.invoice_lines
                (invoice_id, line_no, line, meter, segment_start, quantity, unit_price, amount,
                 for_period_start, usage_total, pricing)
            VALUES (iid, n, CASE WHEN r.delta < 0 THEN 'credit' ELSE 'debit' END, r.meter,
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
    INSERT INTO usage_billing.invoice_lines (invoice_id, line_no, line, amount, for_period_start)
    VALUES (iid, n, 'total', tot, ps);
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
COMMENT ON FUNCTION usage_billing.finalize_one(text, timestamptz, timestamptz) IS
    'Internal: writes the finalized invoice of one customer and period (finalize_invoices).';
REVOKE ALL ON FUNCTION usage_billing.finalize_one(text, timestamptz, timestamptz) FROM PUBLIC;

CREATE FUNCTION usage_billing.finalize_invoices(before timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff timestamptz;
    created bigint := 0;
    c record;
    ps timestamptz;
    pe timestamptz;
BEGIN
    IF $1 IS NULL OR NOT isfinite($1) THEN
        RAISE EXCEPTION 'invalid finalization time'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "before" was %s; it must be a finite timestamp.',
                                  coalesce($1::text, 'NULL'));
    END IF;
    -- only periods that have ended (a "before" in the future invoices nothing more)
    cutoff := least($1, now()) - usage_billing.invoice_grace();
    -- one finalizer at a time (the worker, a manual call): one invoice per period, numbers in order
    PERFORM pg_advisory_xact_lock(hashtext('usage_billing.finalize_invoices'));
    FOR c IN
        SELECT cu.customer_id, cu.billing_anchor, p.period,
               coalesce(li.last_end, s.invoices_from, cu.created_at) AS next_from
          FROM usage_billing.customers cu
          JOIN usage_billing.plans p ON p.plan = cu.plan
          LEFT JOIN usage_billing.invoice_starts s ON s.customer_id = cu.customer_id
          LEFT JOIN LATERAL (SELECT max(i.period_end) AS last_end
                               FROM usage_billing.invoices i
                              WHERE i.customer_id = cu.customer_id) li ON true
         WHERE cu.status <> 'canceled'
         ORDER BY cu.customer_id
    LOOP
        SELECT b.period_start, b.period_end INTO ps, pe
          FROM usage_billing.period_bounds(c.billing_anchor, c.period, c.next_from) b;
        WHILE pe <= cutoff LOOP
            PERFORM usage_billing.finalize_one(c.customer_id, ps, pe);
            created := created + 1;
            ps := pe;
            SELECT b.period_end INTO pe
              FROM usage_billing.period_bounds(c.billing_anchor, c.period, ps) b;
        END LOOP;
    END LOOP;
    RETURN created;
END
$$;
COMMENT ON FUNCTION usage_billing.finalize_invoices(timestamptz) IS
    'Finalizes one invoice per customer and billing period that ended before "before" - usage_billing.invoice_grace and has none yet; returns how many were created (NOTIFY usage_billing_invoices for each).';
REVOKE ALL ON FUNCTION usage_billing.finalize_invoices(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.finalize_invoices(timestamptz) TO usage_billing_admin;
DO $lifecycle_fns$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['usage_billing.invoice_grace()', 'usage_billing.price_usage(jsonb, numeric)',
                             'usage_billing.round_money(numeric, text)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$lifecycle_fns$;

-- tenants read their plan history and invoices (row-level security filters them) and need
-- plan_at for the views that follow the history
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
               'usage_billing.settings', 'usage_billing.reservations',
               'usage_billing.customer_plans', 'usage_billing.plan_history',
               'usage_billing.invoices']) r
     WHERE to_regclass(r) IS NOT NULL
$$;

CREATE OR REPLACE FUNCTION usage_billing.tenant_functions()
RETURNS name[]
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- not check_limit: its customer and limit lookups go through the backend-local catalog
    -- cache (catalog_cache.c), which every role of a backend shares, so row-level security
    -- cannot filter them
    SELECT ARRAY['my_usage', 'current_customer_id', 'period_bounds', 'get_usage_summary',
                 'calculate_overage', 'preview_invoice', 'plan_at']::name[]
$$;

-- A period with plan changes is priced by segments: preview_invoice and calculate_overage
-- have a row per segment, with its segment_start (the last column, so that callers reading
-- the columns of 1.3 by position keep working).
DROP FUNCTION usage_billing.calculate_overage(text, timestamptz);
CREATE FUNCTION usage_billing.calculate_overage(
    customer_id text, period_start timestamptz DEFAULT NULL)
RETURNS TABLE (
    meter text,
    total numeric,
    included numeric,
    overage_quantity numeric,
    overage_cost numeric,
    currency text,
    segment_start timestamptz)
AS 'MODULE_PATHNAME', 'ub_calculate_overage'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.calculate_overage(text, timestamptz) IS
    'Overage quantity and exact cost of every billed meter in a billing period, per plan segment.';

DROP FUNCTION usage_billing.preview_invoice(text, timestamptz);
CREATE FUNCTION usage_billing.preview_invoice(
    customer_id text, period_start timestamptz DEFAULT NULL)
RETURNS TABLE (
    line text,
    meter text,
    quantity numeric,
    unit_price numeric,
    amount numeric,
    segment_start timestamptz)
AS 'MODULE_PATHNAME', 'ub_preview_invoice'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.preview_invoice(text, timestamptz) IS
    'Invoice lines of a billing period (per plan segment a prorated base line and a usage line per billed meter, then the total), rounded to the currency''s minor unit; a finalized period''s finalized lines.';

DO $reads$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['usage_billing.calculate_overage(text, timestamptz)',
                             'usage_billing.preview_invoice(text, timestamptz)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO usage_billing_admin, usage_billing_reader', f);
    END LOOP;
END
$reads$;

CREATE FUNCTION usage_billing.price_period(customer_id text, period_start timestamptz)
RETURNS TABLE (
    line text,
    meter text,
    segment_start timestamptz,
    quantity numeric,
    unit_price numeric,
    amount numeric,
    usage_total numeric,
    pricing jsonb)
AS 'MODULE_PATHNAME', 'ub_price_period_sql'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.price_period(text, timestamptz) IS
    'Internal: the base and usage lines of a billing period priced now, with each usage line''s total and pricing (for finalize_invoices).';
REVOKE ALL ON FUNCTION usage_billing.price_period(text, timestamptz) FROM PUBLIC;

-- roles given tenant access before this version read the new relations and functions too
DO $lifecycle_tenants$
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
        PERFORM usage_billing.grant_tenant_access(r);
    END LOOP;
END
$lifecycle_tenants$;
