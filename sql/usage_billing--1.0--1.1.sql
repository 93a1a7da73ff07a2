/* usage_billing--1.0--1.1.sql: roles, row-level security, insight and corrections */

\echo Use "ALTER EXTENSION usage_billing UPDATE TO '1.1'" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Insight and corrections
-- ---------------------------------------------------------------------------
-- (insight section: owned by insight)

-- One row per voided usage event: makes voiding twice a no-op and lets readers
-- skip voided events by primary key, without an index on the hot path's ledger.
CREATE TABLE usage_billing.voided_events (
    event_id    bigint PRIMARY KEY,     -- the original usage_events.event_id
    customer_id text NOT NULL,
    voided_at   timestamptz NOT NULL DEFAULT now()
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
