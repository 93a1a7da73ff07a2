/* usage_billing--1.0.sql: schema, views and function declarations of version 1.0 */

\echo Use "CREATE EXTENSION usage_billing" to load this file. \quit

/*
 * Vocabulary
 *   meter      a named kind of usage ('api_calls') with an aggregation
 *   plan       a price list: base fee per period plus one limit row per meter
 *   period     a customer's billing period: [billing_anchor + k*period, billing_anchor + (k+1)*period)
 *              computed in UTC with month-end clamping
 *   ledger     usage_events: every accepted event and correction, append-only
 *   aggregate  usage_aggregates: the per (customer, meter, period) total kept current by
 *              increment_usage in the same transaction, so reads never scan the ledger
 */

-- ---------------------------------------------------------------------------
-- Catalog
-- ---------------------------------------------------------------------------

CREATE TABLE usage_billing.meters (
    meter             text PRIMARY KEY
                      CHECK (meter <> '' AND length(meter) <= 200),
    aggregation       text NOT NULL DEFAULT 'sum'
                      CHECK (aggregation IN ('count', 'sum', 'max', 'last', 'unique_count')),
    unit              text,
    display_name      text,
    stripe_event_name text CHECK (stripe_event_name <> '' AND length(stripe_event_name) <= 100),
    value_property    text CHECK (value_property <> ''),
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (aggregation <> 'unique_count' OR value_property IS NOT NULL)
);
COMMENT ON TABLE usage_billing.meters IS
    'Meters: the kinds of usage apps record, with their aggregation and Stripe event name.';

CREATE TABLE usage_billing.plans (
    plan        text PRIMARY KEY CHECK (plan <> '' AND length(plan) <= 200),
    base_price  numeric NOT NULL DEFAULT 0 CHECK (base_price >= 0),
    currency    text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
    period      interval NOT NULL DEFAULT '1 month',
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE usage_billing.plans IS
    'Plans: base price per billing period, currency and period length.';

CREATE TABLE usage_billing.plan_limits (
    plan            text NOT NULL REFERENCES usage_billing.plans ON DELETE CASCADE,
    meter           text NOT NULL REFERENCES usage_billing.meters ON DELETE CASCADE,
    included        numeric CHECK (included >= 0),
    hard_cap        boolean NOT NULL DEFAULT false,
    overage_price   numeric CHECK (overage_price >= 0),
    overage_unit    numeric NOT NULL DEFAULT 1 CHECK (overage_unit > 0),
    soft_threshold  numeric DEFAULT 0.8 CHECK (soft_threshold >= 0),
    tiers           jsonb,
    tier_mode       text NOT NULL DEFAULT 'graduated' CHECK (tier_mode IN ('graduated', 'volume')),
    PRIMARY KEY (plan, meter),
    CHECK (NOT hard_cap OR included IS NOT NULL),
    CHECK (tiers IS NULL OR overage_price IS NULL)
);
COMMENT ON TABLE usage_billing.plan_limits IS
    'Per plan and meter: included quantity, hard cap, soft threshold and overage pricing.';

CREATE TABLE usage_billing.customers (
    customer_id        text PRIMARY KEY CHECK (customer_id <> '' AND length(customer_id) <= 200),
    plan               text NOT NULL REFERENCES usage_billing.plans,
    billing_anchor     timestamptz NOT NULL,
    stripe_customer_id text CHECK (stripe_customer_id <> ''),
    status             text NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'suspended', 'canceled')),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE usage_billing.customers IS
    'Customers: plan, billing anchor, Stripe customer id and status.';

CREATE TABLE usage_billing.customer_limits (
    customer_id text NOT NULL REFERENCES usage_billing.customers ON DELETE CASCADE,
    meter       text NOT NULL REFERENCES usage_billing.meters ON DELETE CASCADE,
    included    numeric NOT NULL CHECK (included >= 0),
    hard_cap    boolean,
    PRIMARY KEY (customer_id, meter)
);
COMMENT ON TABLE usage_billing.customer_limits IS
    'Per-customer overrides of a plan limit; hard_cap NULL inherits the plan''s.';

-- Every backend caches what the hot path reads from these tables; a change
-- invalidates the caches of all backends when it commits.
CREATE FUNCTION usage_billing.catalog_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'ub_catalog_changed'
LANGUAGE C
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.catalog_changed() IS
    'Internal trigger: drops the per-backend catalog caches when catalog tables change.';

CREATE TRIGGER meters_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_billing.meters
    FOR EACH STATEMENT EXECUTE FUNCTION usage_billing.catalog_changed();
CREATE TRIGGER plans_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_billing.plans
    FOR EACH STATEMENT EXECUTE FUNCTION usage_billing.catalog_changed();
CREATE TRIGGER plan_limits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_billing.plan_limits
    FOR EACH STATEMENT EXECUTE FUNCTION usage_billing.catalog_changed();
CREATE TRIGGER customers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_billing.customers
    FOR EACH STATEMENT EXECUTE FUNCTION usage_billing.catalog_changed();
CREATE TRIGGER customer_limits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_billing.customer_limits
    FOR EACH STATEMENT EXECUTE FUNCTION usage_billing.catalog_changed();

-- ---------------------------------------------------------------------------
-- Ledger and aggregates
-- ---------------------------------------------------------------------------

CREATE TABLE usage_billing.usage_events (
    event_id        bigint GENERATED ALWAYS AS IDENTITY,
    customer_id     text NOT NULL,
    meter           text NOT NULL,
    period_start    timestamptz NOT NULL,
    occurred_at     timestamptz NOT NULL,
    amount          numeric NOT NULL,
    idempotency_key text,
    properties      jsonb,
    -- 'usage', 'adjustment' or 'void'; written by C code only.  No CHECK
    -- constraint: the executor re-parses CHECK expressions on every insert
    -- through SPI, which cost 12 % of increment_usage.
    kind            text NOT NULL DEFAULT 'usage',
    voided_event_id bigint,
    reason          text,
    recorded_by     text NOT NULL DEFAULT current_user,  -- text: name is 64 bytes a row
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX usage_events_idempotency_idx
    ON usage_billing.usage_events (customer_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX usage_events_customer_time_idx
    ON usage_billing.usage_events (customer_id, meter, occurred_at);
COMMENT ON TABLE usage_billing.usage_events IS
    'Append-only ledger of every accepted usage event and correction.';

CREATE TABLE usage_billing.usage_aggregates (
    customer_id  text NOT NULL,
    meter        text NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    total        numeric NOT NULL DEFAULT 0,
    previous_total numeric,     -- total before the latest event: threshold crossings
    event_count  bigint NOT NULL DEFAULT 0,
    first_usage  timestamptz,
    last_usage   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, meter, period_start)
);
COMMENT ON TABLE usage_billing.usage_aggregates IS
    'Current aggregate per customer, meter and billing period, kept in step with the ledger.';

CREATE TABLE usage_billing.usage_unique_values (
    customer_id  text NOT NULL,
    meter        text NOT NULL,
    period_start timestamptz NOT NULL,
    value        text NOT NULL,
    PRIMARY KEY (customer_id, meter, period_start, value)
);
COMMENT ON TABLE usage_billing.usage_unique_values IS
    'Distinct values seen by unique_count meters, per customer, meter and period.';

-- ---------------------------------------------------------------------------
-- C functions: periods
-- ---------------------------------------------------------------------------

CREATE FUNCTION usage_billing.period_bounds(
    billing_anchor timestamptz, period interval, at timestamptz,
    OUT period_start timestamptz, OUT period_end timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'ub_period_bounds'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.period_bounds(timestamptz, interval, timestamptz) IS
    'The billing period [period_start, period_end) that contains "at" (UTC, month-end clamping).';

-- ---------------------------------------------------------------------------
-- Catalog administration (small helpers, PL/pgSQL)
-- ---------------------------------------------------------------------------

CREATE FUNCTION usage_billing.check_name(what text, value text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL OR value = '' THEN
        RAISE EXCEPTION '% must not be empty', what
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The %s given was %s.', what,
                                  CASE WHEN value IS NULL THEN 'NULL' ELSE 'an empty string' END);
    END IF;
    IF length(value) > 200 THEN
        RAISE EXCEPTION '% is too long', what
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The %s has %s characters; at most 200 are allowed.', what, length(value));
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.check_name(text, text) IS
    'Internal: raises 22023 for an empty, NULL or over-long name.';

CREATE FUNCTION usage_billing.create_meter(
    meter text,
    aggregation text DEFAULT 'sum',
    unit text DEFAULT NULL,
    display_name text DEFAULT NULL,
    stripe_event_name text DEFAULT NULL,
    value_property text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_billing.check_name('meter name', meter);
    IF aggregation IS NULL OR aggregation NOT IN ('count', 'sum', 'max', 'last', 'unique_count') THEN
        RAISE EXCEPTION 'invalid aggregation "%"', aggregation
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use one of count, sum, max, last or unique_count.';
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
    IF EXISTS (SELECT 1 FROM usage_billing.meters m WHERE m.meter = create_meter.meter) THEN
        RAISE EXCEPTION 'meter "%" already exists', meter
            USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO usage_billing.meters (meter, aggregation, unit, display_name, stripe_event_name, value_property)
    VALUES (meter, aggregation, unit, display_name, stripe_event_name, value_property);
END
$$;
COMMENT ON FUNCTION usage_billing.create_meter(text, text, text, text, text, text) IS
    'Creates a meter; aggregation is count, sum, max, last or unique_count.';

CREATE FUNCTION usage_billing.create_plan(
    plan text,
    base_price numeric DEFAULT 0,
    currency text DEFAULT 'usd',
    period interval DEFAULT '1 month')
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_billing.check_name('plan name', plan);
    IF base_price IS NULL OR base_price < 0 OR base_price = 'NaN'::numeric THEN
        RAISE EXCEPTION 'invalid base price for plan "%"', plan
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The base price must be zero or positive, not %s.', coalesce(base_price::text, 'NULL'));
    END IF;
    IF currency IS NULL OR lower(currency) !~ '^[a-z]{3}$' THEN
        RAISE EXCEPTION 'invalid currency "%"', currency
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use a three-letter ISO 4217 code such as usd or eur.';
    END IF;
    IF period IS NULL OR period <= interval '0' THEN
        RAISE EXCEPTION 'invalid billing period for plan "%"', plan
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The period must be positive, not %s.', coalesce(period::text, 'NULL'));
    END IF;
    -- rejects periods that mix signs ('1 month -40 days'), which have no well-defined sequence
    PERFORM usage_billing.period_bounds(now(), period, now());
    IF EXISTS (SELECT 1 FROM usage_billing.plans p WHERE p.plan = create_plan.plan) THEN
        RAISE EXCEPTION 'plan "%" already exists', plan
            USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO usage_billing.plans (plan, base_price, currency, period)
    VALUES (plan, base_price, lower(currency), period);
END
$$;
COMMENT ON FUNCTION usage_billing.create_plan(text, numeric, text, interval) IS
    'Creates a plan with a base price per billing period.';

CREATE FUNCTION usage_billing.validate_tiers(tiers jsonb)
RETURNS void
AS 'MODULE_PATHNAME', 'ub_validate_tiers'
LANGUAGE C IMMUTABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.validate_tiers(jsonb) IS
    'Raises 22023 unless tiers is a valid tier list (sorted, last open-ended, no negatives).';

CREATE FUNCTION usage_billing.set_plan_limit(
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
LANGUAGE plpgsql VOLATILE
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
    'Inserts or replaces the limit and pricing of a meter in a plan.';

CREATE FUNCTION usage_billing.upsert_customer(
    customer_id text,
    plan text,
    billing_anchor timestamptz DEFAULT NULL,
    stripe_customer_id text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM usage_billing.check_name('customer id', customer_id);
    IF billing_anchor IN ('infinity'::timestamptz, '-infinity'::timestamptz) THEN
        RAISE EXCEPTION 'invalid billing anchor for customer "%"', customer_id
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'The billing anchor must be a finite timestamp.';
    END IF;
    IF stripe_customer_id = '' THEN
        RAISE EXCEPTION 'Stripe customer id must not be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
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
    'Creates a customer, or changes its plan, billing anchor or Stripe id (NULL = unchanged).';

CREATE FUNCTION usage_billing.set_customer_limit(
    customer_id text, meter text, included numeric, hard_cap boolean DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM usage_billing.customers c WHERE c.customer_id = set_customer_limit.customer_id) THEN
        RAISE EXCEPTION 'customer "%" does not exist', customer_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM usage_billing.meters m WHERE m.meter = set_customer_limit.meter) THEN
        RAISE EXCEPTION 'meter "%" does not exist', meter
            USING ERRCODE = 'no_data_found';
    END IF;
    IF included IS NULL THEN
        DELETE FROM usage_billing.customer_limits l
         WHERE l.customer_id = set_customer_limit.customer_id AND l.meter = set_customer_limit.meter;
        RETURN;
    END IF;
    IF included < 0 OR included = 'NaN'::numeric OR included = 'Infinity'::numeric THEN
        RAISE EXCEPTION 'invalid included quantity for meter "%"', meter
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The included quantity must be a finite number of zero or more, not %s.', included);
    END IF;
    INSERT INTO usage_billing.customer_limits AS l (customer_id, meter, included, hard_cap)
    VALUES (customer_id, meter, included, hard_cap)
    ON CONFLICT ON CONSTRAINT customer_limits_pkey DO UPDATE
        SET included = EXCLUDED.included, hard_cap = EXCLUDED.hard_cap;
END
$$;
COMMENT ON FUNCTION usage_billing.set_customer_limit(text, text, numeric, boolean) IS
    'Overrides one plan limit for one customer; included NULL removes the override.';

CREATE FUNCTION usage_billing.set_customer_status(customer_id text, status text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF status IS NULL OR status NOT IN ('active', 'suspended', 'canceled') THEN
        RAISE EXCEPTION 'invalid customer status "%"', status
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use active, suspended or canceled.';
    END IF;
    UPDATE usage_billing.customers c
       SET status = set_customer_status.status, updated_at = now()
     WHERE c.customer_id = set_customer_status.customer_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'customer "%" does not exist', customer_id
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.set_customer_status(text, text) IS
    'Sets a customer''s status: active, suspended or canceled (usage of non-active customers raises PT403).';

-- ---------------------------------------------------------------------------
-- Hot path and reading (C)
-- ---------------------------------------------------------------------------

CREATE FUNCTION usage_billing.increment_usage(
    customer_id text,
    meter text,
    amount numeric DEFAULT 1,
    idempotency_key text DEFAULT NULL,
    occurred_at timestamptz DEFAULT now(),
    properties jsonb DEFAULT NULL)
RETURNS TABLE (
    total numeric,
    included numeric,
    remaining numeric,
    status text,
    duplicate boolean,
    period_start timestamptz,
    period_end timestamptz)
AS 'MODULE_PATHNAME', 'ub_increment_usage'
LANGUAGE C VOLATILE;
-- No SET search_path on purpose: it costs a measurable share of the call.  The C code pins
-- the search path of every statement it runs to pg_catalog (an override search path).
COMMENT ON FUNCTION usage_billing.increment_usage(text, text, numeric, text, timestamptz, jsonb) IS
    'Records usage atomically and idempotently; raises PT402 at a hard cap.';

CREATE FUNCTION usage_billing.increment_usage_batch(events jsonb)
RETURNS TABLE (accepted bigint, duplicates bigint)
AS 'MODULE_PATHNAME', 'ub_increment_usage_batch'
LANGUAGE C VOLATILE;
-- No SET search_path, as for increment_usage: the C code pins it for its statements.
COMMENT ON FUNCTION usage_billing.increment_usage_batch(jsonb) IS
    'Records a JSON array of usage events, all or nothing.';

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
    reason text)
AS 'MODULE_PATHNAME', 'ub_check_limit'
LANGUAGE C STABLE;
-- No SET search_path here on purpose: a function SET costs a fifth of a cached check_limit.
-- The C code runs SQL only on a cache miss and sets the search_path around it itself.
COMMENT ON FUNCTION usage_billing.check_limit(text, text, numeric) IS
    'Read-only: would recording "requested" succeed, and what would it cost?';

CREATE FUNCTION usage_billing.get_usage_summary(
    customer_id text, period_start timestamptz DEFAULT NULL, period_end timestamptz DEFAULT NULL)
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
AS 'MODULE_PATHNAME', 'ub_get_usage_summary'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.get_usage_summary(text, timestamptz, timestamptz) IS
    'Usage per meter for the current billing period, a given period, or any range.';

CREATE FUNCTION usage_billing.calculate_overage(
    customer_id text, period_start timestamptz DEFAULT NULL)
RETURNS TABLE (
    meter text,
    total numeric,
    included numeric,
    overage_quantity numeric,
    overage_cost numeric,
    currency text)
AS 'MODULE_PATHNAME', 'ub_calculate_overage'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.calculate_overage(text, timestamptz) IS
    'Overage quantity and exact cost of every billed meter in a billing period.';

CREATE FUNCTION usage_billing.preview_invoice(
    customer_id text, period_start timestamptz DEFAULT NULL)
RETURNS TABLE (
    line text,
    meter text,
    quantity numeric,
    unit_price numeric,
    amount numeric)
AS 'MODULE_PATHNAME', 'ub_preview_invoice'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.preview_invoice(text, timestamptz) IS
    'Invoice lines (base, usage per billed meter, total) of a billing period, rounded to the currency''s minor unit.';

-- ---------------------------------------------------------------------------
-- Views for psql
-- ---------------------------------------------------------------------------

CREATE VIEW usage_billing.effective_limits AS
SELECT c.customer_id, pl.meter,
       CASE WHEN cl.customer_id IS NOT NULL THEN cl.included ELSE pl.included END AS included,
       coalesce(cl.hard_cap, pl.hard_cap) AS hard_cap,
       pl.overage_price, pl.overage_unit, pl.soft_threshold, pl.tiers, pl.tier_mode,
       cl.customer_id IS NOT NULL AS overridden
  FROM usage_billing.customers c
  JOIN usage_billing.plan_limits pl ON pl.plan = c.plan
  LEFT JOIN usage_billing.customer_limits cl ON cl.customer_id = c.customer_id AND cl.meter = pl.meter
UNION ALL
SELECT cl.customer_id, cl.meter, cl.included, coalesce(cl.hard_cap, false),
       NULL, 1, 0.8, NULL, 'graduated', true
  FROM usage_billing.customer_limits cl
  JOIN usage_billing.customers c ON c.customer_id = cl.customer_id
 WHERE NOT EXISTS (SELECT 1 FROM usage_billing.plan_limits pl WHERE pl.plan = c.plan AND pl.meter = cl.meter);
COMMENT ON VIEW usage_billing.effective_limits IS
    'The limit in force per customer and meter: the plan''s, with customer overrides applied.';

CREATE VIEW usage_billing.current_usage AS
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
  LEFT JOIN usage_billing.usage_aggregates a
         ON a.customer_id = c.customer_id AND a.meter = m.meter AND a.period_start = pb.period_start
 WHERE a.customer_id IS NOT NULL OR l.meter IS NOT NULL;
COMMENT ON VIEW usage_billing.current_usage IS
    'Current billing period usage per customer and meter, with limit and percent used.';

-- ---------------------------------------------------------------------------
-- Alerts (read by the hot path, so part of 1.0)
-- ---------------------------------------------------------------------------
-- (alerts section: owned by alerts)

/*
 * alert_log holds the alerts recorded by transactions; usage_billing.alerts
 * adds the hard_cap_blocked alerts still waiting in shared memory (see
 * src/alerts.c), so a refusal is visible at once, before anything flushes it.
 */
CREATE TABLE usage_billing.alert_log (
    customer_id     text NOT NULL,
    meter           text NOT NULL,
    period_start    timestamptz NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('soft_limit', 'limit_reached', 'hard_cap_blocked')),
    value           numeric,
    included        numeric,
    created_at      timestamptz NOT NULL DEFAULT now(),
    acknowledged_at timestamptz,
    PRIMARY KEY (customer_id, meter, period_start, kind)
);
CREATE INDEX alert_log_unacknowledged_idx
    ON usage_billing.alert_log (created_at) WHERE acknowledged_at IS NULL;
COMMENT ON TABLE usage_billing.alert_log IS
    'Recorded alerts, one per customer, meter, period and kind; read them through usage_billing.alerts.';
SELECT pg_catalog.pg_extension_config_dump('usage_billing.alert_log', '');

CREATE FUNCTION usage_billing.pending_alerts(
    OUT customer_id text, OUT meter text, OUT period_start timestamptz, OUT kind text,
    OUT value numeric, OUT included numeric, OUT created_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'ub_pending_alerts'
LANGUAGE C VOLATILE STRICT
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.pending_alerts() IS
    'Internal: hard_cap_blocked alerts of this database not yet flushed into alert_log.';

CREATE FUNCTION usage_billing.flush_alerts()
RETURNS integer
AS 'MODULE_PATHNAME', 'ub_flush_alerts'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.flush_alerts() IS
    'Records pending hard_cap_blocked alerts in alert_log and notifies them; returns how many were new.';

CREATE VIEW usage_billing.alerts AS
SELECT l.customer_id, l.meter, l.period_start, l.kind, l.value, l.included,
       l.created_at, l.acknowledged_at
  FROM usage_billing.alert_log l
UNION ALL
SELECT p.customer_id, p.meter, p.period_start, p.kind, p.value, p.included,
       p.created_at, NULL::timestamptz
  FROM usage_billing.pending_alerts() p
 WHERE NOT EXISTS (SELECT 1 FROM usage_billing.alert_log l
                    WHERE l.customer_id = p.customer_id AND l.meter = p.meter
                      AND l.period_start = p.period_start AND l.kind = p.kind);
COMMENT ON VIEW usage_billing.alerts IS
    'Alerts per customer, meter, billing period and kind: soft_limit, limit_reached, hard_cap_blocked.';

CREATE FUNCTION usage_billing.acknowledge_alert(
    customer_id text, meter text, period_start timestamptz, kind text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- a hard_cap_blocked alert may still be waiting in shared memory
    PERFORM usage_billing.flush_alerts();
    UPDATE usage_billing.alert_log l
       SET acknowledged_at = coalesce(l.acknowledged_at, now())
     WHERE l.customer_id = acknowledge_alert.customer_id
       AND l.meter = acknowledge_alert.meter
       AND l.period_start = acknowledge_alert.period_start
       AND l.kind = acknowledge_alert.kind;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'alert does not exist'
            USING ERRCODE = 'no_data_found',
                  DETAIL = format('There is no %s alert for customer "%s", meter "%s" and the period starting %s.',
                                  coalesce(kind, 'NULL'), customer_id, meter, period_start),
                  HINT = 'List alerts with SELECT * FROM usage_billing.alerts.';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.acknowledge_alert(text, text, timestamptz, text) IS
    'Marks an alert as acknowledged (the first acknowledgement time is kept); unknown alert: P0002.';

-- ---------------------------------------------------------------------------
-- Export to Stripe (worker state)
-- ---------------------------------------------------------------------------
-- (export section: owned by the export worker)


/*
 * Vocabulary of the export
 *   target       what Stripe must hold for one (customer, meter, period): floor(total).  Stripe
 *                takes whole numbers only; the fraction is carried (it is sent once the total
 *                crosses the next whole number), so Stripe holds exactly floor(total).
 *   additive     sum and count meters: Stripe adds events up (meter formula sum), so we send
 *                deltas.  max, last and unique_count meters send the current whole value to a
 *                Stripe meter with formula last.
 *   outbox row   one meter event we have decided to send, written and committed before any
 *                HTTP request: value, deterministic identifier, Idempotency-Key, timestamp.
 *                A resend after any failure sends the same row again, and Stripe drops the
 *                duplicate identifier.
 *   planned      the level Stripe will hold once every non-discarded outbox row is delivered.
 *   exported     the level Stripe has confirmed (HTTP 200).
 *
 * Operations
 *   - export_status shows, per customer, meter and period: total, exported, pending,
 *     failed (Stripe refused for good, with its message), needs_manual_credit (a lowered
 *     sum/count total: nothing negative is ever sent) and the last attempt.
 *   - After fixing a customer's Stripe id or a meter: retry_failed_exports().
 *   - export_prune() deletes old sent rows; identifiers never repeat (export_state.last_seq).
 *   - Periods older than Stripe's 35-day window are not sent (failed, with the reason).
 *   - Usage recorded with an event time up to 4 minutes ahead is planned; later ones wait.
 *   - The key: postgresql.conf or usage_billing.stripe_api_key_file, never ALTER ROLE /
 *     DATABASE SET (refused); the server log masks key-shaped strings.
 */

CREATE TABLE usage_billing.export_state (
    customer_id      text NOT NULL,
    meter            text NOT NULL,
    period_start     timestamptz NOT NULL,
    planned          numeric NOT NULL DEFAULT 0,
    exported         numeric NOT NULL DEFAULT 0,
    exported_seq     integer NOT NULL DEFAULT 0,
    last_seq         integer NOT NULL DEFAULT 0,
    last_ts          bigint,
    attempts         bigint NOT NULL DEFAULT 0,
    last_attempt_at  timestamptz,
    last_http_status integer,
    last_request_id  text,
    last_error       text,
    PRIMARY KEY (customer_id, meter, period_start)
);
COMMENT ON TABLE usage_billing.export_state IS
    'Export bookkeeping per customer, meter and period: planned and Stripe-confirmed whole-number levels, last attempt.';

CREATE SEQUENCE usage_billing.export_outbox_id_seq;
CREATE TABLE usage_billing.export_outbox (
    outbox_id          bigint PRIMARY KEY DEFAULT nextval('usage_billing.export_outbox_id_seq'),
    customer_id        text NOT NULL,
    meter              text NOT NULL,
    period_start       timestamptz NOT NULL,
    seq                integer NOT NULL,
    stripe_customer_id text NOT NULL,
    event_name         text NOT NULL,
    value              numeric NOT NULL CHECK (value >= 0 AND value = trunc(value)),
    additive           boolean NOT NULL,
    identifier         text NOT NULL UNIQUE CHECK (length(identifier) <= 100),
    idempotency_key    text NOT NULL CHECK (length(idempotency_key) <= 255),
    event_ts           bigint NOT NULL,
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'sent', 'failed', 'discarded')),
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    last_attempt_at    timestamptz,
    last_http_status   integer,
    last_request_id    text,
    last_error         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    sent_at            timestamptz,
    UNIQUE (customer_id, meter, period_start, seq)
);
CREATE INDEX export_outbox_open_idx
    ON usage_billing.export_outbox (customer_id, meter, period_start, seq)
    WHERE status IN ('pending', 'failed');
COMMENT ON TABLE usage_billing.export_outbox IS
    'Meter events decided before sending (value, identifier, Idempotency-Key, timestamp); resent unchanged until Stripe confirms.';

CREATE TABLE usage_billing.export_attempts (
    outbox_id    bigint NOT NULL REFERENCES usage_billing.export_outbox ON DELETE CASCADE,
    attempt      integer NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL CHECK (outcome IN ('sent', 'retry', 'failed')),
    http_status  integer,
    request_id   text,
    error        text,
    duration_ms  integer,
    PRIMARY KEY (outbox_id, attempt)
);
COMMENT ON TABLE usage_billing.export_attempts IS
    'One row per HTTP attempt of an outbox row: HTTP status (0 = no answer), Stripe Request-Id, error message.';

CREATE TABLE usage_billing.export_epoch (
    epoch text NOT NULL CHECK (epoch ~ '^[0-9a-f]{8}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX export_epoch_one_row ON usage_billing.export_epoch ((true));
COMMENT ON TABLE usage_billing.export_epoch IS
    'A random tag per installation (made by the first export_plan()), part of every identifier: a dropped and re-created extension never reuses one; dump/restore keeps it.';

-- dump/restore must keep what was exported (else everything is sent again)
SELECT pg_catalog.pg_extension_config_dump('usage_billing.export_epoch', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.export_state', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.export_outbox', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.export_outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.export_attempts', '');

CREATE FUNCTION usage_billing.export_identifier(customer_id text, meter text, period_start timestamptz, seq integer)
RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN 'ub-' || (SELECT e.epoch FROM usage_billing.export_epoch e) || '-'
       || left(md5(customer_id || chr(31) || meter || chr(31)
                   || extract(epoch FROM period_start)::bigint::text), 24) || '-' || seq::text;
COMMENT ON FUNCTION usage_billing.export_identifier(text, text, timestamptz, integer) IS
    'The deterministic Stripe identifier of the seq-th meter event of a customer, meter and period (with the installation''s epoch).';

CREATE FUNCTION usage_billing.export_plan(max_rows integer DEFAULT 10000)
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
          FROM usage_billing.usage_aggregates a
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

CREATE FUNCTION usage_billing.export_record(
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
BEGIN
    WITH r AS (
        SELECT * FROM unnest(outbox_ids, outcomes, http_statuses, request_ids, errors,
                             retry_in_ms, rotate_keys, durations_ms)
               AS r(outbox_id, outcome, http_status, request_id, error, retry_ms, rotate, duration_ms)
    ), upd AS (
        UPDATE usage_billing.export_outbox o
           SET attempts = o.attempts + 1,
               status = CASE r.outcome WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed' ELSE 'pending' END,
               next_attempt_at = clock_timestamp() + make_interval(secs => coalesce(r.retry_ms, 0) / 1000.0),
               last_attempt_at = clock_timestamp(),
               last_http_status = r.http_status,
               last_request_id = r.request_id,
               last_error = r.error,
               sent_at = CASE WHEN r.outcome = 'sent' THEN clock_timestamp() END,
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
            (outbox_id, attempt, attempted_at, outcome, http_status, request_id, error, duration_ms)
        SELECT outbox_id, attempts, last_attempt_at, outcome, http_status, request_id, error, duration_ms
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
COMMENT ON FUNCTION usage_billing.export_record(bigint[], text[], integer[], text[], text[], integer[], boolean[], integer[]) IS
    'Internal (export worker): records the outcomes of one batch of HTTP attempts.';

CREATE FUNCTION usage_billing.retry_failed_exports(customer_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Discards failed outbox rows (Stripe refused them, so it holds nothing of them) and lowers
 * "planned" accordingly: the next cycle plans them again with a fresh identifier and the
 * current Stripe customer id and event name.  For after fixing a customer id or a meter.
 */
DECLARE
    n bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7245170349586201);
    WITH d AS (
        UPDATE usage_billing.export_outbox o
           SET status = 'discarded'
         WHERE o.status = 'failed'
           AND (retry_failed_exports.customer_id IS NULL OR o.customer_id = retry_failed_exports.customer_id)
        RETURNING o.customer_id, o.meter, o.period_start, o.value, o.additive
    ), agg AS (
        SELECT d.customer_id, d.meter, d.period_start, sum(d.value) AS value, bool_and(d.additive) AS additive,
               count(*) AS n
          FROM d GROUP BY 1, 2, 3
    ), upd AS (
        UPDATE usage_billing.export_state s
           SET planned = CASE WHEN agg.additive THEN s.planned - agg.value ELSE s.exported END
          FROM agg
         WHERE s.customer_id = agg.customer_id AND s.meter = agg.meter AND s.period_start = agg.period_start
        RETURNING agg.n
    )
    SELECT coalesce(sum(upd.n), 0) INTO n FROM upd;
    RETURN n;
END
$$;
COMMENT ON FUNCTION usage_billing.retry_failed_exports(text) IS
    'Discards failed exports (all, or one customer''s) so that the worker plans and sends them again.';

CREATE FUNCTION usage_billing.export_now()
RETURNS void
AS 'MODULE_PATHNAME', 'ub_export_now'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.export_now() IS
    'Wakes the export worker so that it runs an export cycle at once.';
REVOKE ALL ON FUNCTION usage_billing.export_now() FROM PUBLIC;
REVOKE ALL ON FUNCTION usage_billing.export_plan(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION usage_billing.export_record(bigint[], text[], integer[], text[], text[], integer[], boolean[], integer[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION usage_billing.retry_failed_exports(text) FROM PUBLIC;

CREATE FUNCTION usage_billing.export_worker_info(
    OUT preloaded boolean, OUT pid integer, OUT cycles bigint,
    OUT events_sent bigint, OUT events_failed bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'ub_export_worker_info'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.export_worker_info() IS
    'The export worker''s pid (NULL when not running) and its counters since server start.';

CREATE FUNCTION usage_billing.export_prune(older_than interval DEFAULT '35 days')
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Deletes sent and discarded outbox rows (and their attempts) older than older_than.
 * Safe at any age: what Stripe holds is kept in export_state, and identifiers come
 * from export_state.last_seq, so they never repeat.
 */
DECLARE
    n bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must be a positive interval'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM usage_billing.export_outbox o
     WHERE o.status IN ('sent', 'discarded')
       AND coalesce(o.sent_at, o.last_attempt_at, o.created_at) < now() - older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION usage_billing.export_prune(interval) IS
    'Deletes sent and discarded export rows older than the given age; returns how many.';
REVOKE ALL ON FUNCTION usage_billing.export_prune(interval) FROM PUBLIC;

-- usage_billing.export_status is defined at the end of the export section, after export_cancels.

-- ---------------------------------------------------------------------------
-- Export corrections: cancelling meter events (block owned by export_cancel.c)
-- ---------------------------------------------------------------------------
/*
 * The rule.  For sum and count meters Stripe holds the sum of the deltas sent.  When a
 * correction (void_usage, adjust_usage) lowers a period's total below what Stripe holds
 * (planned > floor(total)), the worker cancels the most recent meter events of that customer,
 * meter and period that Stripe received less than usage_billing.export_cancel_window ago
 * (default 23 h: Stripe cancels only within 24 h), newest first, until what Stripe holds is
 * <= floor(total); the planner then sends the (positive) difference as a new event.  What
 * cannot be cancelled (older events, or a cancel Stripe refused) shows in export_status as
 * needs_manual_credit, with the amount.  Formula-last meters need no cancel: the planner sends
 * the new, lower current value.
 *
 * Vocabulary
 *   cancel       one row of export_cancels: the intent to cancel one sent meter event (by its
 *                identifier), written and committed before the HTTP request, with a
 *                deterministic Idempotency-Key; resent unchanged until Stripe answers.
 *   cancelled    Stripe confirmed the cancel: the event's value is removed from planned and
 *                exported, once (only a pending row can become cancelled).
 *   refused      Stripe refused the cancel for good (e.g. the event is older than 24 h): its
 *                value stays in Stripe and becomes part of needs_manual_credit.
 *   cancellable  a sent event of a sum/count meter, not yet cancelled or refused, whose outbox
 *                row was created within the cancel window (created_at is before Stripe
 *                received it, also when an earlier attempt's answer was lost).
 */

CREATE TABLE usage_billing.export_cancels (
    cancel_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id      text NOT NULL,
    meter            text NOT NULL,
    period_start     timestamptz NOT NULL,
    outbox_id        bigint NOT NULL,
    identifier       text NOT NULL UNIQUE,
    event_name       text NOT NULL,
    value            numeric NOT NULL CHECK (value >= 0),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) <= 255),
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'cancelled', 'refused')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_http_status integer,
    last_request_id  text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    done_at          timestamptz
);
CREATE INDEX export_cancels_key_idx
    ON usage_billing.export_cancels (customer_id, meter, period_start);
COMMENT ON TABLE usage_billing.export_cancels IS
    'Meter events to cancel in Stripe (meter_event_adjustments), decided before sending; pending, cancelled or refused.';

CREATE FUNCTION usage_billing.export_cancel_plan(cancel_window interval, max_rows integer DEFAULT 1000)
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
          JOIN usage_billing.usage_aggregates a
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

CREATE FUNCTION usage_billing.export_cancel_record(
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
               next_attempt_at = clock_timestamp()
                                 + make_interval(secs => coalesce(retry_in_ms, 0) / 1000.0),
               last_attempt_at = clock_timestamp(),
               last_http_status = export_cancel_record.http_status,
               last_request_id = export_cancel_record.request_id,
               last_error = export_cancel_record.error,
               done_at = CASE WHEN export_cancel_record.outcome <> 'retry' THEN clock_timestamp() END,
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
               last_attempt_at = clock_timestamp(),
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
COMMENT ON FUNCTION usage_billing.export_cancel_record(bigint, text, integer, text, text, integer, boolean) IS
    'Internal (export worker): records the outcome of one meter event cancel; true when confirmed now.';
REVOKE ALL ON FUNCTION usage_billing.export_cancel_plan(interval, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION usage_billing.export_cancel_record(bigint, text, integer, text, text, integer, boolean) FROM PUBLIC;

-- export_status: the rule above decides needs_manual_credit and the state 'cancelling'
CREATE VIEW usage_billing.export_status AS
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
  FROM usage_billing.usage_aggregates a
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
COMMENT ON VIEW usage_billing.export_status IS
    'Per customer, meter and period: database total, what Stripe confirmed (exported), what is pending, failed, being cancelled or needs a manual credit, and why.';
COMMENT ON COLUMN usage_billing.export_status.needs_manual_credit IS
    'Sum/count meters: what Stripe holds above floor(total) that the worker cannot cancel (events older than the cancel window, or cancels Stripe refused): credit it by hand.';
COMMENT ON COLUMN usage_billing.export_status.cancelling IS
    'Value of the meter events whose cancel is decided but not yet confirmed by Stripe.';
COMMENT ON COLUMN usage_billing.export_status.cancelled IS
    'Value of the meter events Stripe confirmed cancelled (after corrections lowered the total).';
