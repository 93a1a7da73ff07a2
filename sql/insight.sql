-- insight: usage_history, usage_forecast, recommend_plan, usage_report
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
\set VERBOSITY default

SELECT usage_billing.create_meter('in_calls', 'sum', 'calls');
SELECT usage_billing.create_meter('in_logins', 'count');
SELECT usage_billing.create_meter('in_peak', 'max', 'GB');
SELECT usage_billing.create_meter('in_seats', 'last', 'seats');
SELECT usage_billing.create_meter('in_users', 'unique_count', value_property => 'user_id');
SELECT usage_billing.create_plan('in_starter', 29);
SELECT usage_billing.set_plan_limit('in_starter', 'in_calls', included => 10000, overage_price => 0.002);
SELECT usage_billing.set_plan_limit('in_starter', 'in_peak', included => 10, overage_price => 0.0015);
SELECT usage_billing.create_plan('in_professional', 99);
SELECT usage_billing.set_plan_limit('in_professional', 'in_calls', included => 100000, overage_price => 0.001);
SELECT usage_billing.create_plan('in_enterprise', 499);
SELECT usage_billing.set_plan_limit('in_enterprise', 'in_calls', included => 1000000, overage_price => 0.0005);
SELECT usage_billing.create_plan('in_volume', 0);
SELECT usage_billing.set_plan_limit('in_volume', 'in_calls',
    tiers => '[{"up_to": 50000, "unit_price": 0.003, "flat_fee": 7}, {"up_to": null, "unit_price": 0.0025}]',
    tier_mode => 'volume');
SELECT usage_billing.create_plan('in_euro', 1, 'eur');
SELECT usage_billing.upsert_customer('in_hist', 'in_starter', '2025-01-01 00:00+00');

-- ---------------------------------------------------------------------------
-- usage_history
-- ---------------------------------------------------------------------------
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_calls', 10, 'ih-1', '2025-01-01 00:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_calls', 5, 'ih-2', '2025-01-01 23:59:59.999999');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_calls', 7, 'ih-3', '2025-01-03 12:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_calls', 100, 'ih-4', '2025-01-03 13:00');
SELECT usage_billing.void_usage('in_hist', 'ih-4', 'test traffic');
SELECT usage_billing.adjust_usage('in_hist', 'in_calls', -2, 'refund', '2025-01-03 14:00');
-- every bucket present, zeros included; voids left out, adjustments counted; until is exclusive
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2025-01-01', '2025-01-05');
-- the last bucket is cut at until
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2025-01-01', '2025-01-03 13:00', '1 day');
-- hours, starting off the hour: buckets are aligned on the hour (UTC), the first one contains since
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2025-01-03 11:30', '2025-01-03 15:00', '1 hour');
-- months start on the 1st (UTC): since Dec 31 gives the buckets of December to March
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2024-12-31', '2025-04-01', '1 month');
-- empty range
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2025-01-05', '2025-01-01');

-- count, max, last and unique_count per bucket
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_logins', 1, 'il-1', '2025-01-01 01:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_logins', 1, 'il-2', '2025-01-01 02:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_logins', 1, 'il-3', '2025-01-02 02:00');
SELECT usage_billing.void_usage('in_hist', 'il-2', 'bot');
SELECT usage_billing.adjust_usage('in_hist', 'in_logins', 3, 'import', '2025-01-02 03:00');
SELECT * FROM usage_billing.usage_history('in_hist', 'in_logins', '2025-01-01', '2025-01-04');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_peak', 4, 'ip-1', '2025-01-01 01:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_peak', 9, 'ip-2', '2025-01-01 02:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_peak', 2, 'ip-3', '2025-01-01 03:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_peak', 6, 'ip-4', '2025-01-02 03:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_peak', 8, 'ip-5', '2025-01-02 04:00');
SELECT usage_billing.void_usage('in_hist', 'ip-5', 'glitch');
SELECT * FROM usage_billing.usage_history('in_hist', 'in_peak', '2025-01-01', '2025-01-04');
-- last: the latest occurred_at of the bucket, not the latest recorded
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_seats', 3, 'is-1', '2025-01-01 05:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_seats', 4, 'is-2', '2025-01-01 01:00');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_seats', 6, 'is-3', '2025-01-02 01:00');
SELECT * FROM usage_billing.usage_history('in_hist', 'in_seats', '2025-01-01', '2025-01-04');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_users', 1, 'iu-1', '2025-01-01 01:00', '{"user_id": "a"}');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_users', 1, 'iu-2', '2025-01-01 02:00', '{"user_id": "b"}');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_users', 1, 'iu-3', '2025-01-01 03:00', '{"user_id": "a"}');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_users', 1, 'iu-4', '2025-01-02 03:00', '{"user_id": "a"}');
SELECT total FROM usage_billing.increment_usage('in_hist', 'in_users', 1, 'iu-5', '2025-01-02 04:00', '{"user_id": 7}');
SELECT * FROM usage_billing.usage_history('in_hist', 'in_users', '2025-01-01', '2025-01-04');
-- the buckets of a whole period add up to the aggregate
SELECT h.usage AS history, a.total AS aggregate
  FROM usage_billing.usage_history('in_hist', 'in_calls', '2025-01-01', '2025-02-01', '1 month') h
  JOIN usage_billing.usage_aggregates a
    ON a.customer_id = 'in_hist' AND a.meter = 'in_calls' AND a.period_start = h.bucket_start;
-- until defaults to now(), bucket to a day
SELECT count(*) = 3 AS three_days
  FROM usage_billing.usage_history('in_hist', 'in_calls', now() - interval '2 days 1 hour');
-- errors
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2025-01-01', '2025-01-02', '0 days');
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2025-01-01', '2025-01-02', '-1 hour');
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2025-01-01', '2025-01-02', NULL);
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', NULL, '2025-01-02');
SELECT * FROM usage_billing.usage_history('in_hist', 'in_calls', '2000-01-01', '2025-01-02', '1 minute');
SELECT * FROM usage_billing.usage_history('nobody', 'in_calls', '2025-01-01', '2025-01-02');
SELECT * FROM usage_billing.usage_history('in_hist', 'no_meter', '2025-01-01', '2025-01-02');

-- ---------------------------------------------------------------------------
-- usage_forecast: the current period (relative to now()), checked against the formula
-- ---------------------------------------------------------------------------
SELECT usage_billing.upsert_customer('in_fc', 'in_starter');
CREATE TEMP TABLE in_p AS
  SELECT b.period_start, b.period_end,
         (usage_billing.period_bounds(c.billing_anchor, '1 month', b.period_start - interval '1 microsecond')).period_start AS previous_start
    FROM usage_billing.customers c,
         LATERAL usage_billing.period_bounds(c.billing_anchor, '1 month', now()) b
   WHERE c.customer_id = 'in_fc';
SELECT count(*) FROM usage_billing.increment_usage('in_fc', 'in_calls', 6000, occurred_at => now());
SELECT count(*) FROM usage_billing.increment_usage('in_fc', 'in_calls', 20000,
    occurred_at => (SELECT previous_start + interval '1 day' FROM in_p));
SELECT count(*) FROM usage_billing.increment_usage('in_fc', 'in_peak', 12, occurred_at => now());
SELECT count(*) FROM usage_billing.increment_usage('in_fc', 'in_logins', 1, occurred_at => now());
SELECT count(*) FROM usage_billing.increment_usage('in_fc', 'in_seats', 5,
    occurred_at => (SELECT previous_start + interval '1 day' FROM in_p));
-- one row per meter with usage (this period or the last) or a limit
SELECT meter, current, last_period FROM usage_billing.usage_forecast('in_fc');
-- projected = current * period length / elapsed for sum and count, rounded to the meter's
-- decimals (6 here); the trend and cost follow it
SELECT f.meter,
       abs(f.projected - f.current * extract(epoch FROM p.period_end - p.period_start)
                                   / extract(epoch FROM now() - p.period_start)) <= 0.0000005
         AND min_scale(f.projected) <= 6 AS projected_ok,
       f.projected >= f.current AS not_below_current,
       coalesce(abs(f.trend_percent - 100 * (f.projected - f.last_period) / nullif(f.last_period, 0)) < 1e-9,
                f.trend_percent IS NULL AND f.last_period = 0) AS trend_ok,
       f.projected_cost IS NOT DISTINCT FROM
         CASE f.meter WHEN 'in_calls' THEN 0.002 * greatest(f.projected - 10000, 0) END AS cost_ok
  FROM usage_billing.usage_forecast('in_fc') f, in_p p
 WHERE f.meter IN ('in_calls', 'in_logins')
 ORDER BY f.meter;
-- max and last are not extrapolated; a meter with no usage this period projects 0 (-100 %)
SELECT meter, current, projected, last_period, trend_percent, projected_cost
  FROM usage_billing.usage_forecast('in_fc') WHERE meter IN ('in_peak', 'in_seats') ORDER BY meter;
SELECT * FROM usage_billing.usage_forecast('nobody');

-- ---------------------------------------------------------------------------
-- recommend_plan: the last complete periods priced on every plan of the currency
-- ---------------------------------------------------------------------------
SELECT usage_billing.upsert_customer('in_rec', 'in_starter');
SELECT usage_billing.set_customer_limit('in_rec', 'in_calls', 1000000);
-- 60,000 calls in each of the last three complete months, 333 GB-peaks over on Starter,
-- plus usage this period and four periods ago that must not count
SELECT count(*) FROM in_p, generate_series(1, 3) k,
       LATERAL usage_billing.increment_usage('in_rec', 'in_calls', 60000,
           occurred_at => in_p.period_start - k * interval '1 month' + interval '2 days');
SELECT count(*) FROM in_p, generate_series(1, 3) k,
       LATERAL usage_billing.increment_usage('in_rec', 'in_peak', 343,
           occurred_at => in_p.period_start - k * interval '1 month' + interval '2 days');
SELECT count(*) FROM in_p, LATERAL usage_billing.increment_usage('in_rec', 'in_calls', 999999,
           occurred_at => in_p.period_start - interval '4 months' + interval '2 days');
SELECT count(*) FROM usage_billing.increment_usage('in_rec', 'in_calls', 999999);
-- Starter: 3 * (29 + 50,000 * 0.002 + round(333 * 0.0015 = 0.4995)) = 3 * 129.50 = 388.50
-- Professional: 3 * 99 = 297; volume: 3 * (60,000 * 0.0025) = 450; Enterprise: 3 * 499;
-- the override of 1,000,000 included calls is ignored, the eur plan left out
-- (plans of other test files share the database: only in_ plans are shown)
SELECT plan, cost, current FROM usage_billing.recommend_plan('in_rec') WITH ORDINALITY
 WHERE plan LIKE 'in\_%' ORDER BY ordinality;
-- four periods add the one with 999,999 calls
SELECT plan, cost, current FROM usage_billing.recommend_plan('in_rec', 4) WITH ORDINALITY
 WHERE plan LIKE 'in\_%' ORDER BY ordinality;
-- no usage at all: the base prices, and the volume plan's flat fee at 0 (7 per period)
SELECT plan, cost, current FROM usage_billing.recommend_plan('in_hist', 2) WITH ORDINALITY
 WHERE plan LIKE 'in\_%' ORDER BY ordinality;
SELECT * FROM usage_billing.recommend_plan('in_rec', 0);
SELECT * FROM usage_billing.recommend_plan('in_rec', NULL);
SELECT * FROM usage_billing.recommend_plan('nobody');

-- ---------------------------------------------------------------------------
-- usage_report
-- ---------------------------------------------------------------------------
SELECT regexp_replace(line, '\d{4}-\d\d-\d\d \d\d:\d\d UTC', '<date>', 'g') AS line
  FROM usage_billing.usage_report('in_fc');
-- the period's end is the real one
SELECT bool_and(line LIKE '%' || to_char(p.period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC%') AS ends_ok
  FROM usage_billing.usage_report('in_fc'), in_p p;
SELECT usage_billing.upsert_customer('in_rep', 'in_starter');
SELECT count(*) FROM usage_billing.increment_usage('in_rep', 'in_calls', 6200);
SELECT count(*) FROM usage_billing.increment_usage('in_rep', 'in_peak', 15);
SELECT count(*) FROM usage_billing.increment_usage('in_rep', 'in_users', 1, properties => '{"user_id": 1}');
SELECT regexp_replace(line, '\d{4}-\d\d-\d\d \d\d:\d\d UTC', '<date>', 'g') AS line
  FROM usage_billing.usage_report('in_rep');
SELECT * FROM usage_billing.usage_report('nobody');
