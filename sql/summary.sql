-- get_usage_summary: billing periods (month-end anchor), the current period, ranges from the ledger
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;

-- the SQLSTATE and message of a statement's error
CREATE FUNCTION pg_temp.error_of(text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE $1;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

SELECT usage_billing.create_meter('su_api');                        -- sum
SELECT usage_billing.create_meter('su_storage', 'last');            -- no limit in the plan
SELECT usage_billing.create_meter('su_seats', 'max');
SELECT usage_billing.create_meter('su_users', 'unique_count', value_property => 'user_id');
SELECT usage_billing.create_meter('su_free');                       -- a limit, never used
SELECT usage_billing.create_meter('su_tiered');                     -- tiers, unlimited, never used
SELECT usage_billing.create_meter('su_jobs', 'count');              -- only in the second plan

SELECT usage_billing.create_plan('su_plan', base_price => 20);
SELECT usage_billing.set_plan_limit('su_plan', 'su_api', included => 1000, overage_price => 0.002);
SELECT usage_billing.set_plan_limit('su_plan', 'su_seats', included => 10);
SELECT usage_billing.set_plan_limit('su_plan', 'su_users', included => 3);
SELECT usage_billing.set_plan_limit('su_plan', 'su_free', included => 0);
SELECT usage_billing.set_plan_limit('su_plan', 'su_tiered',
    tiers => '[{"up_to": 10, "unit_price": 1, "flat_fee": 3}, {"up_to": null, "unit_price": 0}]',
    tier_mode => 'volume');

-- anchored on Jan 31: periods [Jan 31, Feb 28), [Feb 28, Mar 31), [Mar 31, Apr 30)
SELECT usage_billing.upsert_customer('su_acme', 'su_plan', billing_anchor => '2025-01-31 00:00:00+00');

CREATE TEMP TABLE su_events (meter text, amount numeric, at timestamptz, props jsonb);
INSERT INTO su_events VALUES
    ('su_api', 300, '2025-02-01 10:00:00+00', NULL),
    ('su_api', 200, '2025-02-20 12:00:00+00', NULL),
    ('su_api', 900, '2025-02-28 00:00:00+00', NULL),          -- first instant of the second period
    ('su_api', 350, '2025-03-15 08:30:00+00', NULL),
    ('su_storage', 40, '2025-02-05 00:00:00+00', NULL),
    ('su_storage', 42, '2025-02-25 00:00:00+00', NULL),
    ('su_storage', 45, '2025-03-10 00:00:00+00', NULL),
    ('su_storage', 50, '2025-03-30 23:59:59.999999+00', NULL), -- last instant of the second period
    ('su_seats', 4, '2025-02-02 00:00:00+00', NULL),
    ('su_seats', 7, '2025-02-10 00:00:00+00', NULL),
    ('su_seats', 5, '2025-02-27 00:00:00+00', NULL),
    ('su_seats', 10, '2025-03-01 08:00:00+00', NULL),
    ('su_users', 1, '2025-02-03 00:00:00+00', '{"user_id": "u1"}'),
    ('su_users', 1, '2025-02-12 00:00:00+00', '{"user_id": "u2"}'),
    ('su_users', 1, '2025-02-26 00:00:00+00', '{"user_id": "u1"}'),
    ('su_users', 1, '2025-03-02 00:00:00+00', '{"user_id": "u1"}'),
    ('su_users', 1, '2025-03-20 00:00:00+00', '{"user_id": "u3"}');
-- late events land in their own period (the default accepts any past period)
SELECT count(*) AS recorded
  FROM su_events e,
       LATERAL usage_billing.increment_usage('su_acme', e.meter, e.amount,
                                             occurred_at => e.at, properties => e.props) r;

-- exactly one billing period: totals from the aggregates, limit columns filled
-- (su_api: 1250 of 1000, 250 over at 0.002; su_users 2 of 3 = 66.67 %; su_free included 0: no percent;
--  su_tiered: volume tier 1 at total 0 still charges its flat fee)
SELECT * FROM usage_billing.get_usage_summary('su_acme', '2025-02-28 00:00:00+00', '2025-03-31 00:00:00+00');
SELECT * FROM usage_billing.get_usage_summary('su_acme', '2025-01-31 00:00:00+00', '2025-02-28 00:00:00+00');
-- only period_start: the billing period containing it; only period_end: the period ending there
SELECT meter, total, event_count, included, usage_percent
  FROM usage_billing.get_usage_summary('su_acme', '2025-03-05 12:00:00+00');
SELECT meter, total, event_count, included, usage_percent
  FROM usage_billing.get_usage_summary('su_acme', period_end => '2025-03-31 00:00:00+00');
-- the same period written in another time zone is the same instant pair
SELECT meter, total, included
  FROM usage_billing.get_usage_summary('su_acme', '2025-02-28 01:00:00+01', '2025-03-31 02:00:00+02')
 WHERE meter = 'su_api';
-- a period with no usage: only the meters with a limit, at 0
SELECT * FROM usage_billing.get_usage_summary('su_acme', '2025-03-31 00:00:00+00', '2025-04-30 00:00:00+00');

-- before the anchor too: Jan 15 lies in [Dec 31, Jan 31), a billing period, so limits are filled;
-- the same start with another end is a plain range
SELECT meter, total, included, usage_percent
  FROM usage_billing.get_usage_summary('su_acme', '2025-01-15 00:00:00+00') WHERE meter = 'su_api';
SELECT meter, total, included, usage_percent
  FROM usage_billing.get_usage_summary('su_acme', '2024-12-31 00:00:00+00', '2025-01-31 00:00:00+00')
 WHERE meter = 'su_api';
SELECT meter, total, included, usage_percent
  FROM usage_billing.get_usage_summary('su_acme', '2024-12-31 00:00:00+00', '2025-01-30 00:00:00+00')
 WHERE meter = 'su_api';

-- any other range: totals recomputed from the ledger with each meter's aggregation, no limit columns
-- two whole periods: sum 1750, last = the latest reading (50), max 10, 3 distinct users
SELECT * FROM usage_billing.get_usage_summary('su_acme', '2025-01-31 00:00:00+00', '2025-03-31 00:00:00+00');
-- part of two periods, [Feb 10, Mar 1): 200 + 900; last 42; max(7, 5); users u2, u1
SELECT * FROM usage_billing.get_usage_summary('su_acme', '2025-02-10 00:00:00+00', '2025-03-01 00:00:00+00');
-- one instant inside a period, [Feb 28, Feb 28 00:00:00.000001): only the 900 at the boundary
SELECT meter, total, event_count
  FROM usage_billing.get_usage_summary('su_acme', '2025-02-28 00:00:00+00', '2025-02-28 00:00:00.000001+00')
 WHERE total <> 0;

-- a per-customer override fills included; on a meter without a plan limit it adds a row's limit (not billed)
SELECT usage_billing.set_customer_limit('su_acme', 'su_api', 2000);
SELECT usage_billing.set_customer_limit('su_acme', 'su_storage', 100);
SELECT meter, total, included, usage_percent, overage_quantity, overage_cost
  FROM usage_billing.get_usage_summary('su_acme', '2025-03-01 00:00:00+00')
 WHERE meter IN ('su_api', 'su_storage');
SELECT usage_billing.set_customer_limit('su_acme', 'su_api', NULL);
SELECT usage_billing.set_customer_limit('su_acme', 'su_storage', NULL);
SELECT meter, total, included, usage_percent, overage_quantity, overage_cost
  FROM usage_billing.get_usage_summary('su_acme', '2025-03-01 00:00:00+00')
 WHERE meter IN ('su_api', 'su_storage');

-- a plan change now does not reach back: March 2025 keeps su_plan's limits and costs (the new
-- plan's meter su_jobs is listed, without a limit of March's plan)
SELECT usage_billing.create_plan('su_plan2', base_price => 50);
SELECT usage_billing.set_plan_limit('su_plan2', 'su_api', included => 5000, overage_price => 0.001);
SELECT usage_billing.set_plan_limit('su_plan2', 'su_jobs', included => 100, overage_price => 1);
SELECT usage_billing.upsert_customer('su_acme', 'su_plan2');
SELECT meter, total, event_count, included, usage_percent, overage_quantity, overage_cost
  FROM usage_billing.get_usage_summary('su_acme', '2025-03-01 00:00:00+00');
SELECT usage_billing.upsert_customer('su_acme', 'su_plan');

-- the current billing period by default
SELECT usage_billing.upsert_customer('su_now', 'su_plan');
SELECT total FROM usage_billing.increment_usage('su_now', 'su_api', 850);
SELECT total FROM usage_billing.increment_usage('su_now', 'su_api', 150);
SELECT total FROM usage_billing.increment_usage('su_now', 'su_seats', 11);
SELECT meter, total, event_count, included, usage_percent, overage_quantity, overage_cost,
       first_usage <= last_usage AS ordered, last_usage <= now() AS not_in_future
  FROM usage_billing.get_usage_summary('su_now');
-- the current period, given explicitly, is the same period
SELECT s.meter, s.total, s.included
  FROM usage_billing.customers c,
       LATERAL usage_billing.period_bounds(c.billing_anchor, '1 month', now()) b,
       LATERAL usage_billing.get_usage_summary(c.customer_id, b.period_start, b.period_end) s
 WHERE c.customer_id = 'su_now' AND s.total > 0;

-- corrections in the ledger: a voided event does not count, an adjustment adds its delta
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount, kind, voided_event_id, reason)
SELECT customer_id, meter, period_start, occurred_at, -amount, 'void', event_id, 'duplicate upload'
  FROM usage_billing.usage_events
 WHERE customer_id = 'su_acme' AND meter = 'su_api' AND amount = 200;
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount, kind, voided_event_id, reason)
VALUES ('su_acme', 'su_api', '2025-01-31 00:00:00+00', '2025-02-21 00:00:00+00', 25, 'adjustment', NULL, 'credit'),
       ('su_acme', 'su_seats', '2025-01-31 00:00:00+00', '2025-02-21 00:00:00+00', 99, 'void', NULL, 'stray');
-- 900 + 25; event_count counts usage events only; a void pointing nowhere changes nothing
SELECT meter, total, event_count, first_usage, last_usage
  FROM usage_billing.get_usage_summary('su_acme', '2025-02-10 00:00:00+00', '2025-03-01 00:00:00+00')
 WHERE meter IN ('su_api', 'su_seats');

-- period queries read only the aggregates: with the ledger gone (retention) they still answer,
-- while ranges, which read the ledger, do not
DELETE FROM usage_billing.usage_events WHERE customer_id = 'su_acme';
SELECT meter, total, event_count
  FROM usage_billing.get_usage_summary('su_acme', '2025-02-28 00:00:00+00', '2025-03-31 00:00:00+00')
 WHERE total > 0;
SELECT meter, total, event_count
  FROM usage_billing.get_usage_summary('su_acme', '2025-02-28 00:00:00+00', '2025-03-30 00:00:00+00')
 WHERE total > 0;

-- errors: unknown customer P0002; empty or reversed range, NULL customer 22023
SELECT * FROM usage_billing.get_usage_summary('su_nobody');
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.get_usage_summary('su_nobody', '2025-01-01', '2025-02-01')$$);
SELECT * FROM usage_billing.get_usage_summary('su_acme', '2025-03-01 00:00:00+00', '2025-02-01 00:00:00+00');
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.get_usage_summary('su_acme', '2025-03-01', '2025-03-01')$$);
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.get_usage_summary(NULL)$$);

-- named arguments as PostgREST sends them
SELECT meter, total FROM usage_billing.get_usage_summary(customer_id => 'su_acme',
    period_start => '2025-02-28 00:00:00+00', period_end => '2025-03-31 00:00:00+00')
 WHERE meter = 'su_api';
