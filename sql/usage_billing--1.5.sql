/* usage_billing--1.5.sql: the objects of version 1.5, for CREATE EXTENSION usage_billing */

\echo Use "CREATE EXTENSION usage_billing" to load this file. \quit

/*
 * A fresh install of version 1.5 in one script: every object once, in its final form.  A
 * database installed at an earlier version reaches the same objects through the update scripts
 * usage_billing--1.0--1.1.sql ... usage_billing--1.4--1.5.sql (test/t/060_upgrade.pl compares
 * the two object by object).  A change to the extension goes into both: a new update script
 * and this file (or the next version's).
 *
 * Sections, in the order their objects depend on each other:
 *   Catalog              meters, plans, limits, customers and their plan history
 *   Recording            the ledger, the aggregates and the functions that record usage
 *   Escrow               slots that hold part of a contended aggregate's total
 *   Reservations         holds against hard caps
 *   Reading              limit checks, summaries, the current period
 *   Pricing and invoices overage, invoice previews, finalized invoices
 *   Alerts               soft limits, limits reached, hard caps that refused
 *   Export               the outbox to Stripe and the cancels of corrections
 *   Insight              history, forecast, plan recommendation, the psql report
 *   Corrections          voids, adjustments and retention
 *   Security             roles, tenants, row-level security, privileges
 *   Version 1.5          what usage_billing--1.4--1.5.sql adds (its sections, copied)
 *
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
    decimals          integer NOT NULL DEFAULT 6 CHECK (decimals BETWEEN 0 AND 20),
    max_amount        numeric NOT NULL DEFAULT 1e12
                      CHECK (max_amount > 0 AND max_amount < 'Infinity'::numeric),
    -- Duration meters: sum meters whose unit is a time unit.  create_meter(meter, 'duration',
    -- unit => 'seconds' | 'minutes' | 'hours') stores aggregation 'sum' (they add up like sum
    -- meters everywhere: limits, pricing, export) and the unit in duration_unit, which
    -- record_duration converts spans of time to.
    duration_unit     text CHECK (duration_unit IN ('seconds', 'minutes', 'hours')),
    CHECK (aggregation <> 'unique_count' OR value_property IS NOT NULL),
    CHECK (duration_unit IS NULL OR aggregation = 'sum')
);
COMMENT ON TABLE usage_billing.meters IS
    'Meters: the kinds of usage apps record, with their aggregation and Stripe event name.';
COMMENT ON COLUMN usage_billing.meters.decimals IS
    'Most fractional digits of an amount (and of totals): more is refused with 22023.';
COMMENT ON COLUMN usage_billing.meters.max_amount IS
    'Largest amount of one event (and largest correction delta): more is refused with 22023.';
COMMENT ON COLUMN usage_billing.meters.duration_unit IS
    'Duration meters: the time unit (seconds, minutes, hours) amounts are in; NULL for other meters.';

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

-- pg_dump keeps the data of every table of the extension (and of its sequences)
SELECT pg_catalog.pg_extension_config_dump('usage_billing.meters', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.plans', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.plan_limits', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.customers', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.customer_limits', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.customer_plans', '');

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
CREATE TRIGGER customer_plans_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON usage_billing.customer_plans
    FOR EACH STATEMENT EXECUTE FUNCTION usage_billing.catalog_changed();

CREATE FUNCTION usage_billing.period_bounds(
    billing_anchor timestamptz, period interval, at timestamptz,
    OUT period_start timestamptz, OUT period_end timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'ub_period_bounds'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.period_bounds(timestamptz, interval, timestamptz) IS
    'The billing period [period_start, period_end) that contains "at" (UTC, month-end clamping).';

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

CREATE FUNCTION usage_billing.create_plan(
    plan text,
    base_price numeric DEFAULT 0,
    currency text DEFAULT 'usd',
    period interval DEFAULT '1 month')
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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

CREATE FUNCTION usage_billing.upsert_customer(
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

CREATE FUNCTION usage_billing.set_customer_limit(
    customer_id text, meter text, included numeric, hard_cap boolean DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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

CREATE FUNCTION usage_billing.plan_at(customer_id text, at timestamptz)
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

-- The limits in force now: those of the plan in force now (plan_at, from the history),
-- with the customer's overrides applied.
CREATE VIEW usage_billing.effective_limits WITH (security_invoker = true) AS
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
COMMENT ON VIEW usage_billing.effective_limits IS
    'The limit in force per customer and meter: the plan''s, with customer overrides applied.';

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
       SET plan = usage_billing.plan_at(apply_plan_change.customer_id, now()), updated_at = now()
     WHERE c.customer_id = apply_plan_change.customer_id;

    plan := new.plan;
    SELECT max(h.effective_from) INTO apply_plan_change.effective_from
      FROM usage_billing.customer_plans h
     WHERE h.customer_id = apply_plan_change.customer_id AND h.effective_from <= from_at;
END
$$;
COMMENT ON FUNCTION usage_billing.apply_plan_change(text, text, text, timestamptz) IS
    'Internal: the work of change_plan.';

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

-- ---------------------------------------------------------------------------
-- Recording
-- ---------------------------------------------------------------------------
-- Every path that records (increment_usage, increment_usage_batch, the corrections) refuses
-- what would corrupt billing, with 22023 and a detail naming the field and the limit:
-- amounts with more decimals than their meter's, above its max_amount, other than 1 on a count
-- meter; occurred_at more than usage_billing.max_future_skew ahead or older than the
-- late-event grace (35 days after the period's end by default); unknown or missing keys of a
-- batch event; a stripe_customer_id Stripe would not take; a hard cap with an overage price; a
-- void without a reason.  Those checks are in C (record_prepare.c, batch.c, corrections.c) and
-- in the catalog functions below.  An idempotency key repeated with different parameters is
-- 23505, not a duplicate.
--
-- Rows recorded by a version before 1.4 that break these rules stay as they were, count as
-- before and are listed by the view usage_billing.input_violations.

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
    -- who recorded an event: the login role (inside the SECURITY DEFINER increment_usage,
    -- current_user would always be the extension owner); text: name is 64 bytes a row
    recorded_by     text NOT NULL DEFAULT session_user,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX usage_events_idempotency_idx
    ON usage_billing.usage_events (customer_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX usage_events_customer_time_idx
    ON usage_billing.usage_events (customer_id, meter, occurred_at);
COMMENT ON TABLE usage_billing.usage_events IS
    'Append-only ledger of every accepted usage event and correction.';

SELECT pg_catalog.pg_extension_config_dump('usage_billing.usage_events', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.usage_events_event_id_seq', '');

-- Every recorded event updates its aggregate row, and the row lock of that update is held to
-- commit.  An update stays on the row's page (a HOT update: no new index entry, no index
-- bloat) only if the page has room for the new version, and the versions that concurrent
-- callers just replaced cannot be pruned yet.  With full pages, a hot row's updates spill to
-- other pages: every one then inserts into the primary key, which fills with dead entries
-- that each later lookup walks through (measured: 19 % of the updates were HOT under batch
-- load with the default fill factor, 98 % with 30).  The table holds one row per customer,
-- meter and period, so the space this costs is small next to the ledger.
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
    slotted      boolean NOT NULL DEFAULT false,    -- see Escrow
    reserved     numeric NOT NULL DEFAULT 0,        -- see Reservations
    PRIMARY KEY (customer_id, meter, period_start)
) WITH (fillfactor = 30);
COMMENT ON TABLE usage_billing.usage_aggregates IS
    'Current aggregate per customer, meter and billing period, kept in step with the ledger.';
COMMENT ON COLUMN usage_billing.usage_aggregates.slotted IS
    'Part of the total is in usage_aggregate_slots; read usage_billing.aggregate_totals.';

SELECT pg_catalog.pg_extension_config_dump('usage_billing.usage_aggregates', '');

CREATE TABLE usage_billing.usage_unique_values (
    customer_id  text NOT NULL,
    meter        text NOT NULL,
    period_start timestamptz NOT NULL,
    value        text NOT NULL,
    PRIMARY KEY (customer_id, meter, period_start, value)
);
COMMENT ON TABLE usage_billing.usage_unique_values IS
    'Distinct values seen by unique_count meters, per customer, meter and period.';

SELECT pg_catalog.pg_extension_config_dump('usage_billing.usage_unique_values', '');

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
LANGUAGE C VOLATILE SECURITY DEFINER;
-- No SET search_path on purpose: it costs a measurable share of the call.  The C code pins
-- the search path of every statement it runs to pg_catalog (an override search path).
COMMENT ON FUNCTION usage_billing.increment_usage(text, text, numeric, text, timestamptz, jsonb) IS
    'Records usage atomically and idempotently; raises PT402 at a hard cap.';

CREATE FUNCTION usage_billing.increment_usage_batch(events jsonb)
RETURNS TABLE (accepted bigint, duplicates bigint)
AS 'MODULE_PATHNAME', 'ub_increment_usage_batch'
LANGUAGE C VOLATILE SECURITY DEFINER;
-- No SET search_path, as for increment_usage: the C code pins it for its statements.
COMMENT ON FUNCTION usage_billing.increment_usage_batch(jsonb) IS
    'Records a JSON array of usage events, all or nothing.';

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

-- ---------------------------------------------------------------------------
-- Escrow
-- ---------------------------------------------------------------------------
-- Without escrow, callers of one (customer, meter, period) commit one at a time: each holds
-- the aggregate row's lock until its commit is flushed.  A key that is contended also keeps
-- its total in escrow slots, one per backend that writes it (escrow.c).  A slot holds part
-- of the total and a budget, a share of what is left before the next limit decision (a soft
-- threshold, the included quantity, the hard cap).  A caller that fits its slot's budget
-- writes only its slot, so callers of one key commit in parallel; a caller that does not,
-- and every writer other than increment_usage, first folds the slots back into the
-- aggregate row under that row's lock, so caps and alerts are decided on the exact total.
-- The total of a key is usage_aggregates.total plus its slots: aggregate_totals below.

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

SELECT pg_catalog.pg_extension_config_dump('usage_billing.usage_aggregate_slots', '');

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

-- ---------------------------------------------------------------------------
-- Reservations
-- ---------------------------------------------------------------------------
-- A hold is a reservation row with status 'held' that has not expired.  Holds count against
-- the hard cap of their key at once: usage_aggregates.reserved is the sum of the key's held
-- amounts, changed only under the aggregate row's lock (reserve, commit, release, and the
-- lazy expiry of holds past expires_at when a decision needs the room).  Readers that must not
-- count expired holds (check_limit) sum the live ones.

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

-- ---------------------------------------------------------------------------
-- Reading
-- ---------------------------------------------------------------------------

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

CREATE VIEW usage_billing.current_usage WITH (security_invoker = true) AS
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
COMMENT ON VIEW usage_billing.current_usage IS
    'Current billing period usage per customer and meter, with limit, percent used, usage status (ok, warning, over_limit) and the customer''s account status.';
COMMENT ON COLUMN usage_billing.current_usage.status IS
    'Deprecated name of customer_status (the account status: active, suspended, canceled), kept for compatibility; it is not the usage status (usage_status).';
COMMENT ON COLUMN usage_billing.current_usage.customer_status IS
    'The customer''s account status: active, suspended or canceled.';
COMMENT ON COLUMN usage_billing.current_usage.usage_status IS
    'The usage status increment_usage would report for this total: ok, warning (at or above the soft threshold) or over_limit (above included).';

-- ---------------------------------------------------------------------------
-- Pricing and invoices
-- ---------------------------------------------------------------------------

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

CREATE FUNCTION usage_billing.invoice_grace()
RETURNS interval
AS 'MODULE_PATHNAME', 'ub_invoice_grace'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.invoice_grace() IS
    'Internal: usage_billing.invoice_grace as an interval (how long after a period''s end it is invoiced).';

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

SELECT pg_catalog.pg_extension_config_dump('usage_billing.invoice_starts', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.invoices', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.invoices_invoice_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.invoice_lines', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.invoiced_totals', '');

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
COMMENT ON FUNCTION usage_billing.finalize_one(text, timestamptz, timestamptz) IS
    'Internal: writes the finalized invoice of one customer and period (finalize_invoices).';

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

-- ---------------------------------------------------------------------------
-- Alerts
-- ---------------------------------------------------------------------------

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
LANGUAGE C VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.flush_alerts() IS
    'Records pending hard_cap_blocked alerts in alert_log and notifies them; returns how many were new.';

CREATE VIEW usage_billing.alerts WITH (security_invoker = true) AS
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
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
-- Export to Stripe
-- ---------------------------------------------------------------------------

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
COMMENT ON FUNCTION usage_billing.export_record(bigint[], text[], integer[], text[], text[], integer[], boolean[], integer[]) IS
    'Internal (export worker): records the outcomes of one batch of HTTP attempts.';

CREATE FUNCTION usage_billing.retry_failed_exports(customer_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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

-- Why the export cannot send at all, or NULL: read by export_status.reason.
CREATE FUNCTION usage_billing.export_blocker()
RETURNS text
AS 'MODULE_PATHNAME', 'ub_export_blocker'
LANGUAGE C STABLE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.export_blocker() IS
    'Why the export worker sends nothing (not preloaded, export_interval 0, no Stripe API key), or NULL; never shows the key.';

-- Export corrections: cancelling meter events

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

SELECT pg_catalog.pg_extension_config_dump('usage_billing.export_cancels', '');
SELECT pg_catalog.pg_extension_config_dump('usage_billing.export_cancels_cancel_id_seq', '');

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
COMMENT ON FUNCTION usage_billing.export_cancel_record(bigint, text, integer, text, text, integer, boolean) IS
    'Internal (export worker): records the outcome of one meter event cancel; true when confirmed now.';

-- export_status: the rule above decides needs_manual_credit and the state 'cancelling';
-- export_blocker() and the worker's counters decide the reason.
CREATE VIEW usage_billing.export_status WITH (security_invoker = true) AS
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
COMMENT ON VIEW usage_billing.export_status IS
    'Per customer, meter and period: database total, what Stripe confirmed (exported), what is pending, failed, being cancelled or needs a manual credit, and why.';
COMMENT ON COLUMN usage_billing.export_status.needs_manual_credit IS
    'Sum/count meters: what Stripe holds above floor(total) that the worker cannot cancel (events older than the cancel window, or cancels Stripe refused): credit it by hand.';
COMMENT ON COLUMN usage_billing.export_status.cancelling IS
    'Value of the meter events whose cancel is decided but not yet confirmed by Stripe.';
COMMENT ON COLUMN usage_billing.export_status.cancelled IS
    'Value of the meter events Stripe confirmed cancelled (after corrections lowered the total).';
COMMENT ON COLUMN usage_billing.export_status.reason IS
    'Why the row is not in sync (NULL when it is): no Stripe customer id, no Stripe API key configured, worker not running, Stripe''s error, waiting for the next cycle, ...';

-- ---------------------------------------------------------------------------
-- Insight
-- ---------------------------------------------------------------------------

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
-- Corrections and retention
-- ---------------------------------------------------------------------------

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
LANGUAGE C VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.void_usage(text, text, text) IS
    'Voids the usage event recorded with this idempotency key (append-only; voiding twice is a no-op).';

CREATE FUNCTION usage_billing.adjust_usage(
    customer_id text, meter text, delta numeric, reason text,
    occurred_at timestamptz DEFAULT now())
RETURNS void
AS 'MODULE_PATHNAME', 'ub_adjust_usage'
LANGUAGE C VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.adjust_usage(text, text, numeric, text, timestamptz) IS
    'Adds delta to the total of a sum or count meter in the period of occurred_at (append-only; never below 0).';

CREATE VIEW usage_billing.usage_corrections WITH (security_invoker = true) AS
SELECT c.event_id, c.kind, c.customer_id, c.meter, c.period_start, c.occurred_at,
       c.amount, c.voided_event_id, o.idempotency_key AS voided_idempotency_key,
       c.reason, c.recorded_by, c.recorded_at
  FROM usage_billing.usage_events c
  LEFT JOIN usage_billing.usage_events o
         ON c.kind = 'void' AND o.event_id = c.voided_event_id AND o.customer_id = c.customer_id
 WHERE c.kind IN ('void', 'adjustment');
COMMENT ON VIEW usage_billing.usage_corrections IS
    'Every void and adjustment of the ledger, with who recorded it, when and why.';

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
-- Security: roles, tenants, row-level security, privileges
-- ---------------------------------------------------------------------------

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

CREATE TABLE usage_billing.settings (
    name  text PRIMARY KEY CHECK (name IN ('tenant_claim')),
    value text NOT NULL CHECK (value <> '' AND length(value) <= 200)
);
COMMENT ON TABLE usage_billing.settings IS
    'Extension settings that must not be changed by a session: tenant_claim (default sub when absent).';

SELECT pg_catalog.pg_extension_config_dump('usage_billing.settings', '');

-- Tenant claims: a dotted path into the JWT claims (app_metadata.org_id); a top-level claim
-- whose name contains dots (https://example.com/customer) still wins when it is present.
CREATE FUNCTION usage_billing.current_customer_id()
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
COMMENT ON FUNCTION usage_billing.my_usage() IS
    'The caller''s usage in the current billing period (as get_usage_summary), for POST /rpc/my_usage.';

-- what a tenant may read: its customer's rows of these (row-level security filters them);
-- plan_at is among the functions because the views that follow the history call it
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
               'usage_billing.usage_aggregate_slots', 'usage_billing.aggregate_totals',
               'usage_billing.usage_unique_values', 'usage_billing.alert_log',
               'usage_billing.effective_limits', 'usage_billing.current_usage',
               'usage_billing.settings', 'usage_billing.reservations',
               'usage_billing.customer_plans', 'usage_billing.plan_history',
               'usage_billing.invoices']) r
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
                 'calculate_overage', 'preview_invoice', 'plan_at']::name[]
$$;
COMMENT ON FUNCTION usage_billing.tenant_functions() IS
    'Internal: the functions a tenant role may execute (SECURITY DEFINER ones are skipped, my_usage aside).';

-- a staff role (or a member of one) sees every customer: it cannot be a tenant role
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

-- Row-level security on every table with customer rows: the staff roles see every row, any
-- other role the rows of the customer its request names.

ALTER TABLE usage_billing.customers ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.customers FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.customers FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.customers IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.customers IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.customer_limits ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.customer_limits FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.customer_limits FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.customer_limits IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.customer_limits IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.customer_plans ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.customer_plans FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.customer_plans FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.customer_plans IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.customer_plans IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.usage_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.usage_events FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.usage_events FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.usage_events IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.usage_events IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.usage_aggregates ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.usage_aggregates FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.usage_aggregates FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.usage_aggregates IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.usage_aggregates IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.usage_unique_values ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.usage_unique_values FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.usage_unique_values FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.usage_unique_values IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.usage_unique_values IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.usage_aggregate_slots ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.usage_aggregate_slots FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.usage_aggregate_slots FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.usage_aggregate_slots IS
    'The three usage_billing roles see every row (they write only through functions).';

ALTER TABLE usage_billing.reservations ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.reservations FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.reservations FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.reservations IS
    'The three usage_billing roles see every row (they write only through functions).';

ALTER TABLE usage_billing.invoice_starts ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.invoice_starts FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.invoice_starts FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.invoice_starts IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.invoice_starts IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.invoices ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.invoices FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.invoices FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.invoices IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.invoices IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.invoiced_totals ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.invoiced_totals FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.invoiced_totals FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.invoiced_totals IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.invoiced_totals IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.alert_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.alert_log FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.alert_log FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.alert_log IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.alert_log IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.export_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.export_state FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.export_state FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.export_state IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.export_state IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

ALTER TABLE usage_billing.export_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.export_outbox FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.export_outbox FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.export_outbox IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.export_outbox IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

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

ALTER TABLE usage_billing.voided_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.voided_events FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.voided_events FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
COMMENT ON POLICY staff_all ON usage_billing.voided_events IS
    'The three usage_billing roles see every row (they write only through functions).';
COMMENT ON POLICY tenant_own_rows ON usage_billing.voided_events IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';

-- Privileges: nothing for PUBLIC; the staff roles read every table and view and write only
-- through the functions granted to them below.  A writing function is SECURITY DEFINER (see
-- its definition); a reading function runs as its caller, so row-level security applies in it.
REVOKE ALL ON SCHEMA usage_billing FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA usage_billing FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA usage_billing FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA usage_billing FROM PUBLIC;
GRANT USAGE ON SCHEMA usage_billing TO usage_billing_admin, usage_billing_writer, usage_billing_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA usage_billing TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

-- usage_billing_admin: the catalog, customers, corrections, retention, alerts and the export
GRANT EXECUTE ON FUNCTION
    usage_billing.create_meter(text, text, text, text, text, text, integer, numeric),
    usage_billing.create_plan(text, numeric, text, interval),
    usage_billing.set_plan_limit(text, text, numeric, boolean, numeric, numeric, numeric, jsonb, text),
    usage_billing.upsert_customer(text, text, timestamptz, text),
    usage_billing.set_customer_limit(text, text, numeric, boolean),
    usage_billing.set_customer_status(text, text),
    usage_billing.change_plan(text, text, text, timestamptz),
    usage_billing.fold_escrow_slots(text),
    usage_billing.finalize_invoices(timestamptz),
    usage_billing.flush_alerts(),
    usage_billing.acknowledge_alert(text, text, timestamptz, text),
    usage_billing.retry_failed_exports(text),
    usage_billing.export_now(),
    usage_billing.export_worker_info(),
    usage_billing.void_usage(text, text, text),
    usage_billing.adjust_usage(text, text, numeric, text, timestamptz),
    usage_billing.drop_ledger_before(timestamptz),
    usage_billing.set_tenant_claim(text)
    TO usage_billing_admin;

-- usage_billing_writer: records usage and holds
GRANT EXECUTE ON FUNCTION
    usage_billing.increment_usage(text, text, numeric, text, timestamptz, jsonb),
    usage_billing.increment_usage_batch(jsonb),
    usage_billing.record_duration(text, text, timestamptz, timestamptz, text),
    usage_billing.reserve_usage(text, text, numeric, interval, text),
    usage_billing.commit_reservation(uuid, numeric),
    usage_billing.release_reservation(uuid)
    TO usage_billing_writer;

-- all three: limit checks, periods, the plan history, the tenant and the export's blocker
GRANT EXECUTE ON FUNCTION
    usage_billing.check_limit(text, text, numeric),
    usage_billing.period_bounds(timestamptz, interval, timestamptz),
    usage_billing.plan_at(text, timestamptz),
    usage_billing.current_customer_id(),
    usage_billing.export_blocker()
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

-- usage_billing_reader (and the admin): summaries, invoices, alerts, insight
GRANT EXECUTE ON FUNCTION
    usage_billing.my_usage(),
    usage_billing.get_usage_summary(text, timestamptz, timestamptz),
    usage_billing.calculate_overage(text, timestamptz),
    usage_billing.preview_invoice(text, timestamptz),
    usage_billing.pending_alerts(),
    usage_billing.usage_history(text, text, timestamptz, timestamptz, interval),
    usage_billing.usage_forecast(text),
    usage_billing.recommend_plan(text, int),
    usage_billing.usage_report(text)
    TO usage_billing_admin, usage_billing_reader;

-- the Supabase / PostgREST tenant role, when it exists already
DO $tenant$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        PERFORM usage_billing.grant_tenant_access('authenticated');
    END IF;
END
$tenant$;

-- ---------------------------------------------------------------------------
-- Version 1.5: scale-out on Citus, Stripe reconciliation and v2 streams
-- ---------------------------------------------------------------------------
-- What usage_billing--1.4--1.5.sql adds, one section per subsystem in the same order: a
-- section added there is copied here, but for the functions it replaces, which are written in
-- their final form in place above.

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
