-- Catalog administration: meters, plans, limits, customers, overrides, status.
-- Every refusal shows its SQLSTATE (psql's LAST_ERROR_SQLSTATE).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set SHOW_CONTEXT never

-- meters
SELECT usage_billing.create_meter('cat_calls', 'sum', 'calls', 'API calls', 'api_calls');
SELECT usage_billing.create_meter('cat_logins');
SELECT usage_billing.create_meter('cat_users', 'unique_count', value_property => 'user_id');
SELECT meter, aggregation, unit, display_name, stripe_event_name, value_property
  FROM usage_billing.meters WHERE meter LIKE 'cat_%' ORDER BY meter;
SELECT usage_billing.create_meter('cat_calls');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_meter('cat_bad', 'avg');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_meter('cat_bad', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_meter('cat_bad', 'unique_count');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_meter('');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_meter(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_meter(repeat('x', 201));
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_meter('cat_bad', stripe_event_name => repeat('e', 101));
\echo :LAST_ERROR_SQLSTATE

-- plans
SELECT usage_billing.create_plan('cat_starter', 29);
SELECT usage_billing.create_plan('cat_yearly', 290, 'EUR', '1 year');
SELECT usage_billing.create_plan('cat_weekly', 0, 'jpy', '7 days');
SELECT plan, base_price, currency, period FROM usage_billing.plans WHERE plan LIKE 'cat_%' ORDER BY plan;
SELECT usage_billing.create_plan('cat_starter');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_plan('cat_bad', -1);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_plan('cat_bad', 'NaN');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_plan('cat_bad', 1, 'dollars');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_plan('cat_bad', 1, 'usd', '0 days');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_plan('cat_bad', 1, 'usd', '-1 month');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_plan('cat_bad', 1, 'usd', '1 month -40 days');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_plan('');
\echo :LAST_ERROR_SQLSTATE

-- limits: insert, then replace
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', included => 1000, overage_price => 0.01);
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', included => 100, hard_cap => true);
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": 10, "unit_price": 0}, {"up_to": null, "unit_price": 0.5, "flat_fee": 2}]', tier_mode => 'volume');
SELECT plan, meter, included, hard_cap, overage_price, overage_unit, soft_threshold, tiers, tier_mode
  FROM usage_billing.plan_limits WHERE plan LIKE 'cat_%' ORDER BY plan, meter;
-- refusals
SELECT usage_billing.set_plan_limit('cat_nope', 'cat_calls', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_nope', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', included => -1);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', included => 'NaN');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', hard_cap => true);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', 10, overage_price => -0.01);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', 10, overage_price => 1, overage_unit => 0);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', 10, overage_unit => -5);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', 10, soft_threshold => -0.5);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_calls', 10, tier_mode => 'stairstep');
\echo :LAST_ERROR_SQLSTATE
-- invalid tiers
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '{"up_to": null}');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": 100, "unit_price": 1}, {"up_to": 50, "unit_price": 1}, {"up_to": null, "unit_price": 1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": 100, "unit_price": 1}, {"up_to": 100, "unit_price": 1}, {"up_to": null, "unit_price": 1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": 100, "unit_price": 1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": null, "unit_price": 1}, {"up_to": 100, "unit_price": 1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": null, "unit_price": -1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": -5, "unit_price": 1}, {"up_to": null, "unit_price": 1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": null, "unit_price": "1"}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"upto": null, "unit_price": 1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[{"up_to": null}]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', tiers => '[5]');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_plan_limit('cat_starter', 'cat_logins', overage_price => 1, tiers => '[{"up_to": null, "unit_price": 1}]');
\echo :LAST_ERROR_SQLSTATE
-- a refused change leaves the previous limit in place
SELECT included, hard_cap, tiers FROM usage_billing.plan_limits
 WHERE plan = 'cat_starter' ORDER BY meter;

-- customers
SELECT usage_billing.upsert_customer('cat_a', 'cat_starter', '2025-01-31 12:00+00', 'cus_A');
SELECT usage_billing.upsert_customer('cat_b', 'cat_starter');
SELECT customer_id, plan, billing_anchor, stripe_customer_id, status FROM usage_billing.customers
 WHERE customer_id = 'cat_a';
SELECT billing_anchor = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS anchored_at_month_start
  FROM usage_billing.customers WHERE customer_id = 'cat_b';
-- NULL anchor and Stripe id mean unchanged; a new plan applies (a plan change keeps the
-- currency and the period: not to the yearly euro plan)
SELECT usage_billing.upsert_customer('cat_a', 'cat_yearly');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.create_plan('cat_plus', 49);
SELECT usage_billing.upsert_customer('cat_a', 'cat_plus');
SELECT customer_id, plan, billing_anchor, stripe_customer_id FROM usage_billing.customers WHERE customer_id = 'cat_a';
SELECT usage_billing.upsert_customer('cat_a', NULL, '2025-02-01 00:00+00', 'cus_A2');
SELECT customer_id, plan, billing_anchor, stripe_customer_id FROM usage_billing.customers WHERE customer_id = 'cat_a';
SELECT usage_billing.upsert_customer('cat_c', 'cat_nope');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.upsert_customer('cat_c', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.upsert_customer('', 'cat_starter');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.upsert_customer('cat_c', 'cat_starter', 'infinity');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.upsert_customer('cat_c', 'cat_starter', stripe_customer_id => '');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM usage_billing.customers WHERE customer_id = 'cat_c';

-- overrides: set, inherit the plan's hard cap, survive a plan change, remove (the
-- downgrades at once, not at the period's end)
SELECT plan FROM usage_billing.change_plan('cat_a', 'cat_starter', 'immediate');
SELECT usage_billing.set_customer_limit('cat_a', 'cat_calls', 500);
SELECT meter, included, hard_cap, overridden FROM usage_billing.effective_limits WHERE customer_id = 'cat_a' ORDER BY meter;
SELECT usage_billing.set_customer_limit('cat_a', 'cat_calls', 500, false);
SELECT usage_billing.set_customer_limit('cat_a', 'cat_users', 3, true);
SELECT usage_billing.upsert_customer('cat_a', 'cat_plus');
SELECT meter, included, hard_cap, overridden FROM usage_billing.effective_limits WHERE customer_id = 'cat_a' ORDER BY meter;
SELECT plan FROM usage_billing.change_plan('cat_a', 'cat_starter', 'immediate');
SELECT usage_billing.set_customer_limit('cat_a', 'cat_calls', NULL);
SELECT meter, included, hard_cap, overridden FROM usage_billing.effective_limits WHERE customer_id = 'cat_a' ORDER BY meter;
SELECT usage_billing.set_customer_limit('cat_nope', 'cat_calls', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_customer_limit('cat_a', 'cat_nope', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_customer_limit('cat_a', 'cat_calls', -1);
\echo :LAST_ERROR_SQLSTATE

-- status
SELECT usage_billing.set_customer_status('cat_a', 'suspended');
SELECT status FROM usage_billing.customers WHERE customer_id = 'cat_a';
SELECT usage_billing.set_customer_status('cat_a', 'active');
SELECT usage_billing.set_customer_status('cat_a', 'paused');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_customer_status('cat_nope', 'active');
\echo :LAST_ERROR_SQLSTATE

-- billing periods: anchor time of day kept, month-end clamping, periods before the anchor
SELECT * FROM usage_billing.period_bounds('2025-01-31 12:00+00', '1 month', '2025-02-28 11:59+00');
SELECT * FROM usage_billing.period_bounds('2025-01-31 12:00+00', '1 month', '2025-02-28 12:00+00');
SELECT * FROM usage_billing.period_bounds('2024-01-31 00:00+00', '1 month', '2024-02-29 00:00+00');
SELECT * FROM usage_billing.period_bounds('2025-01-31 00:00+00', '1 month', '2024-11-30 00:00+00');
SELECT * FROM usage_billing.period_bounds('2025-01-15 00:00+00', '1 year', '2030-06-01 00:00+00');
SELECT * FROM usage_billing.period_bounds('2025-01-01 00:00+00', '7 days', '2024-12-31 23:59:59+00');
-- the session's time zone plays no part
SET timezone = 'America/New_York';
SELECT period_start AT TIME ZONE 'UTC' AS start_utc, period_end AT TIME ZONE 'UTC' AS end_utc
  FROM usage_billing.period_bounds('2025-03-01 00:00+00', '1 day', '2025-03-09 12:00+00');
SET timezone = 'UTC';
SELECT * FROM usage_billing.period_bounds('2025-01-01', '1 month', 'infinity');
\echo :LAST_ERROR_SQLSTATE

-- views for psql
SELECT usage_billing.upsert_customer('cat_v', 'cat_starter');
SELECT total FROM usage_billing.increment_usage('cat_v', 'cat_calls', 85);
SELECT customer_id, plan, meter, total, included, hard_cap, usage_percent, status
  FROM usage_billing.current_usage WHERE customer_id = 'cat_v' ORDER BY meter;
-- every public function, table and view has a comment
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'usage_billing' AND c.relkind IN ('r', 'v') AND obj_description(c.oid, 'pg_class') IS NULL;
SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'usage_billing' AND obj_description(p.oid, 'pg_proc') IS NULL;
-- and pins its search_path; check_limit, increment_usage and increment_usage_batch pin it in
-- C instead: a function SET costs a fifth
-- of a cached check_limit, so its C code sets the search_path around the SQL it runs
SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'usage_billing' AND NOT coalesce(p.proconfig::text LIKE '%search_path%', false)
 ORDER BY 1;
