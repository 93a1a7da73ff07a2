-- check_limit: projection, statuses, hard caps, overrides, plan changes, bad input
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;

-- sets the current-period aggregate of a customer's meter (what increment_usage keeps)
CREATE FUNCTION pg_temp.set_current(text, text, numeric) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO usage_billing.usage_aggregates AS a
           (customer_id, meter, period_start, period_end, total, event_count)
    SELECT $1, $2, b.period_start, b.period_end, $3, 1
      FROM usage_billing.customers cu
      JOIN usage_billing.plans p ON p.plan = cu.plan
     CROSS JOIN LATERAL usage_billing.period_bounds(cu.billing_anchor, p.period, now()) b
     WHERE cu.customer_id = $1
    ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET total = EXCLUDED.total
$$;

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

SELECT usage_billing.create_meter('cl_api');                       -- sum
SELECT usage_billing.create_meter('cl_jobs', 'count');
SELECT usage_billing.create_meter('cl_nosoft');
SELECT usage_billing.create_meter('cl_zero');
SELECT usage_billing.create_meter('cl_capped');
SELECT usage_billing.create_meter('cl_peak', 'max');
SELECT usage_billing.create_meter('cl_seats', 'last');
SELECT usage_billing.create_meter('cl_users', 'unique_count', value_property => 'user_id');
SELECT usage_billing.create_meter('cl_tiered');
SELECT usage_billing.create_meter('cl_free');                      -- no limit row: unlimited

SELECT usage_billing.create_plan('cl_basic', 10);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_api', included => 100, overage_price => 0.5);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_jobs', included => 20, overage_price => 2);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_nosoft', included => 100, soft_threshold => NULL);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_zero', included => 0);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_capped', included => 10, hard_cap => true);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_peak', included => 10, hard_cap => true);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_seats', included => 10, hard_cap => true);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_users', included => 3, hard_cap => true);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_tiered',
    tiers => '[{"up_to": 100, "unit_price": 0}, {"up_to": null, "unit_price": 0.25, "flat_fee": 1}]');

SELECT usage_billing.create_plan('cl_pro', 50);
SELECT usage_billing.set_plan_limit('cl_pro', 'cl_capped', included => 1000, hard_cap => true);

SELECT usage_billing.upsert_customer('cl_acme', 'cl_basic');       -- anchor: start of this month
SELECT usage_billing.upsert_customer('cl_other', 'cl_basic');

-- nothing recorded yet: current 0; status by projection 0 + requested at 79/80/100/101 of 100
SELECT r.requested, c.*
  FROM (VALUES (79), (80), (100), (101), (0)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_api', r.requested) c;

-- the default requested is 1
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_api');

-- with current usage: projection is current + requested; remaining is what is left now
SELECT pg_temp.set_current('cl_acme', 'cl_api', 50);
SELECT r.requested, c.*
  FROM (VALUES (29), (30), (50), (51), (150.5)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_api', r.requested) c;

-- current past included: remaining floors at 0, status over_limit, still allowed (billed)
SELECT pg_temp.set_current('cl_acme', 'cl_api', 120);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_api', 0);

-- count: a number of events
SELECT pg_temp.set_current('cl_acme', 'cl_jobs', 15);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_jobs', 6);

-- soft_threshold NULL never warns
SELECT r.requested, c.status, c.allowed
  FROM (VALUES (79), (80), (100), (101)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_nosoft', r.requested) c;

-- included 0: total 0 is ok, anything more is over the limit (not billed: no cost)
SELECT r.requested, c.*
  FROM (VALUES (0), (1)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_zero', r.requested) c;

-- hard cap exactly at the boundary: 7 + 3 = 10 allowed, 7 + 4 refused
SELECT pg_temp.set_current('cl_acme', 'cl_capped', 7);
SELECT r.requested, c.*
  FROM (VALUES (3), (4)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_capped', r.requested) c;

-- max: greatest(current, requested)
SELECT pg_temp.set_current('cl_acme', 'cl_peak', 8);
SELECT r.requested, c.*
  FROM (VALUES (5), (10), (11), (-3)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_peak', r.requested) c;

-- last: the projection is the requested value itself, even below a current over the cap
SELECT pg_temp.set_current('cl_acme', 'cl_seats', 12);
SELECT r.requested, c.*
  FROM (VALUES (9), (10), (11)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_seats', r.requested) c;

-- unique_count: current + 1 whatever requested is
SELECT pg_temp.set_current('cl_acme', 'cl_users', 2);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_users', 5);
SELECT pg_temp.set_current('cl_acme', 'cl_users', 3);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_users', 1);

-- tiers without included: billed, unlimited; the estimate prices the projected total
SELECT pg_temp.set_current('cl_acme', 'cl_tiered', 90);
SELECT r.requested, c.*
  FROM (VALUES (10), (11), (50)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_tiered', r.requested) c;

-- a meter without a limit row: unlimited, not billed
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_free', 1000000);

-- invalid requested: allowed = false with a reason, no error
SELECT r.requested, c.*
  FROM (VALUES (NULL::numeric), ('NaN'), ('Infinity'), ('-Infinity'), (-1)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_api', r.requested) c;

-- unknown customer or meter: allowed = false with a reason, no error
SELECT * FROM usage_billing.check_limit('cl_nobody', 'cl_api', 1);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_nometer', 1);
SELECT * FROM usage_billing.check_limit(NULL, 'cl_api', 1);
SELECT * FROM usage_billing.check_limit('cl_acme', NULL, 1);

-- per-customer override: raises included (and can add a hard cap); removing it restores the plan's
SELECT usage_billing.set_customer_limit('cl_acme', 'cl_api', 200);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_api', 40);
SELECT usage_billing.set_customer_limit('cl_acme', 'cl_api', 150, hard_cap => true);
SELECT r.requested, c.*
  FROM (VALUES (30), (31)) r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_api', r.requested) c;
SELECT usage_billing.set_customer_limit('cl_acme', 'cl_api', NULL);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_api', 40);
-- the override is the customer's own: the other customer keeps the plan's limit
SELECT usage_billing.set_customer_limit('cl_acme', 'cl_capped', 100);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_capped', 50);
SELECT * FROM usage_billing.check_limit('cl_other', 'cl_capped', 50);
SELECT usage_billing.set_customer_limit('cl_acme', 'cl_capped', NULL);

-- plan change: the upgrade applies at once, usage already recorded stays
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_capped', 500);
SELECT usage_billing.upsert_customer('cl_acme', 'cl_pro');
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_capped', 500);
-- a meter the new plan has no limit for is unlimited now
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_api', 1000);
-- back to basic at once (upsert_customer would wait for the period's end: a downgrade)
SELECT plan FROM usage_billing.change_plan('cl_acme', 'cl_basic', 'immediate');

-- non-active customers are refused, the rest of the row is still filled
SELECT usage_billing.set_customer_status('cl_acme', 'suspended');
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_capped', 1);
SELECT usage_billing.set_customer_status('cl_acme', 'canceled');
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_capped', 1);
SELECT * FROM usage_billing.check_limit('cl_acme', 'cl_nometer', 1);
SELECT usage_billing.set_customer_status('cl_acme', 'active');
SELECT allowed, reason FROM usage_billing.check_limit('cl_acme', 'cl_capped', 1);

-- usage of another period does not count toward the current one
INSERT INTO usage_billing.usage_aggregates (customer_id, meter, period_start, period_end, total)
SELECT 'cl_other', 'cl_capped', b.period_start - interval '1 month', b.period_start, 10
  FROM usage_billing.customers cu,
       LATERAL usage_billing.period_bounds(cu.billing_anchor, '1 month', now()) b
 WHERE cu.customer_id = 'cl_other';
SELECT allowed, current, remaining FROM usage_billing.check_limit('cl_other', 'cl_capped', 10);

-- read-only: it runs in a read-only transaction and creates no aggregate row
SELECT count(*) AS aggregates_before FROM usage_billing.usage_aggregates WHERE customer_id = 'cl_other';
BEGIN READ ONLY;
SELECT allowed, current FROM usage_billing.check_limit('cl_other', 'cl_api', 5);
COMMIT;
SELECT count(*) AS aggregates_after FROM usage_billing.usage_aggregates WHERE customer_id = 'cl_other';
SELECT provolatile FROM pg_proc WHERE oid = 'usage_billing.check_limit(text, text, numeric)'::regprocedure;

-- named arguments as PostgREST sends them
SELECT allowed, status FROM usage_billing.check_limit(customer_id => 'cl_acme', meter => 'cl_api', requested => 2);

-- check_limit agrees with increment_usage, which moves current
SELECT usage_billing.upsert_customer('cl_live', 'cl_basic');
SELECT allowed, current, remaining, status FROM usage_billing.check_limit('cl_live', 'cl_capped', 10);
SELECT total, remaining, status FROM usage_billing.increment_usage('cl_live', 'cl_capped', 6);
SELECT allowed, current, remaining, status, reason FROM usage_billing.check_limit('cl_live', 'cl_capped', 5);
SELECT allowed, current, remaining, status, reason FROM usage_billing.check_limit('cl_live', 'cl_capped', 4);
SELECT total, remaining, status FROM usage_billing.increment_usage('cl_live', 'cl_capped', 4);
SELECT allowed, current, remaining, status, reason FROM usage_billing.check_limit('cl_live', 'cl_capped', 1);
SELECT pg_temp.error_of($$SELECT usage_billing.increment_usage('cl_live', 'cl_capped', 1)$$);
SELECT allowed, current, reason FROM usage_billing.check_limit('cl_live', 'cl_capped', 0);
-- max: a smaller reading never raises the aggregate
SELECT total FROM usage_billing.increment_usage('cl_live', 'cl_peak', 9);
SELECT allowed, current, status, reason FROM usage_billing.check_limit('cl_live', 'cl_peak', 3);
SELECT allowed, current, status, reason FROM usage_billing.check_limit('cl_live', 'cl_peak', 10.5);
SELECT pg_temp.error_of($$SELECT usage_billing.increment_usage('cl_live', 'cl_peak', 10.5)$$);
SELECT pg_temp.error_of($$SELECT usage_billing.increment_usage('cl_live', 'cl_peak', 3)$$);
-- unique_count: current counts distinct values
SELECT total FROM usage_billing.increment_usage('cl_live', 'cl_users', properties => '{"user_id": "u1"}');
SELECT total FROM usage_billing.increment_usage('cl_live', 'cl_users', properties => '{"user_id": "u2"}');
SELECT total FROM usage_billing.increment_usage('cl_live', 'cl_users', properties => '{"user_id": "u1"}');
SELECT allowed, current, remaining, status FROM usage_billing.check_limit('cl_live', 'cl_users');

-- the backend's cache of limits follows the session's own changes, and forgets rolled-back ones
SELECT included FROM usage_billing.check_limit('cl_live', 'cl_capped');
BEGIN;
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_capped', included => 50, hard_cap => true);
SELECT included, allowed FROM usage_billing.check_limit('cl_live', 'cl_capped', 30);
ROLLBACK;
SELECT included, allowed FROM usage_billing.check_limit('cl_live', 'cl_capped', 30);
BEGIN;
SAVEPOINT s;
SELECT usage_billing.set_customer_limit('cl_live', 'cl_capped', 70);
SELECT included FROM usage_billing.check_limit('cl_live', 'cl_capped');
ROLLBACK TO SAVEPOINT s;
SELECT included FROM usage_billing.check_limit('cl_live', 'cl_capped');
COMMIT;
-- plain DML on the catalog tables counts too
UPDATE usage_billing.plan_limits SET included = 12 WHERE plan = 'cl_basic' AND meter = 'cl_capped';
SELECT included, remaining FROM usage_billing.check_limit('cl_live', 'cl_capped');
UPDATE usage_billing.customers SET status = 'suspended' WHERE customer_id = 'cl_live';
SELECT allowed, reason FROM usage_billing.check_limit('cl_live', 'cl_capped');
UPDATE usage_billing.customers SET status = 'active' WHERE customer_id = 'cl_live';
SELECT allowed, reason FROM usage_billing.check_limit('cl_live', 'cl_capped');
-- the caller's search_path does not matter, also for a lookup that misses the cache
SET search_path = public;
SELECT allowed, current, included FROM usage_billing.check_limit('cl_other', 'cl_jobs', 3);
RESET search_path;

-- called in the select list (no expected row type from FROM) it answers the same
SELECT usage_billing.check_limit('cl_live', 'cl_capped', 1);
SELECT (usage_billing.check_limit('cl_live', 'cl_capped', 5)).reason;

-- requested follows increment_usage's input rules: the meter's decimals and max_amount; a
-- count meter's requested is a whole number of events
SELECT usage_billing.create_meter('cl_whole', 'sum', decimals => 0, max_amount => 100);
SELECT usage_billing.set_plan_limit('cl_basic', 'cl_whole', included => 1000);
SELECT r.requested, c.allowed, c.reason
  FROM (VALUES (1.0), (1.5), (100), (101)) AS r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_whole', r.requested) c;
SELECT r.requested, c.allowed, c.reason
  FROM (VALUES (5), (2.5)) AS r(requested),
       LATERAL usage_billing.check_limit('cl_acme', 'cl_jobs', r.requested) c;
