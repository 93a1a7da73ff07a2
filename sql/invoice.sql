-- calculate_overage and preview_invoice: the worked example, periods, overrides, plan changes
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;

-- sets the aggregate of a customer's meter in the billing period containing "at"
CREATE FUNCTION pg_temp.set_total(text, text, timestamptz, numeric) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO usage_billing.usage_aggregates AS a
           (customer_id, meter, period_start, period_end, total, event_count)
    SELECT $1, $2, b.period_start, b.period_end, $4, 1
      FROM usage_billing.customers cu
      JOIN usage_billing.plans p ON p.plan = cu.plan
     CROSS JOIN LATERAL usage_billing.period_bounds(cu.billing_anchor, p.period, $3) b
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

-- The seeds' worked example: $199 base, $0.10/order, $0.05/invoice, $1.00/GB (last value),
-- $0.01 per 1,000 API calls, $0.50/AI job, nothing included.
SELECT usage_billing.create_meter('orders', 'sum', 'orders');
SELECT usage_billing.create_meter('invoices', 'sum', 'invoices');
SELECT usage_billing.create_meter('storage_gb', 'last', 'GB');
SELECT usage_billing.create_meter('api_calls', 'sum', 'calls');
SELECT usage_billing.create_meter('ai_jobs', 'sum', 'jobs');
SELECT usage_billing.create_meter('inv_logins', 'count');          -- limited, never billed

SELECT usage_billing.create_plan('inv_growth', base_price => 199);
SELECT usage_billing.set_plan_limit('inv_growth', 'orders', included => 0, overage_price => 0.10);
SELECT usage_billing.set_plan_limit('inv_growth', 'invoices', included => 0, overage_price => 0.05);
SELECT usage_billing.set_plan_limit('inv_growth', 'storage_gb', included => 0, overage_price => 1.00);
SELECT usage_billing.set_plan_limit('inv_growth', 'api_calls', included => 0, overage_price => 0.01,
                                    overage_unit => 1000);
SELECT usage_billing.set_plan_limit('inv_growth', 'ai_jobs', included => 0, overage_price => 0.50);
SELECT usage_billing.set_plan_limit('inv_growth', 'inv_logins', included => 1000);

SELECT usage_billing.upsert_customer('inv_acme', 'inv_growth', billing_anchor => '2025-01-01 00:00:00+00');

SELECT pg_temp.set_total('inv_acme', 'orders', '2025-01-10', 1250);
SELECT pg_temp.set_total('inv_acme', 'invoices', '2025-01-10', 980);
SELECT pg_temp.set_total('inv_acme', 'storage_gb', '2025-01-10', 45);
SELECT pg_temp.set_total('inv_acme', 'api_calls', '2025-01-10', 50000);
SELECT pg_temp.set_total('inv_acme', 'ai_jobs', '2025-01-10', 120);
SELECT pg_temp.set_total('inv_acme', 'inv_logins', '2025-01-10', 4000);

-- 199.00 + 60.00 + 0.50 + 49.00 + 125.00 + 45.00 = 478.50
SELECT * FROM usage_billing.preview_invoice('inv_acme', '2025-01-15');
SELECT amount AS january_total FROM usage_billing.preview_invoice('inv_acme', '2025-01-15')
 WHERE line = 'total';
-- exact costs, one row per billed meter (inv_logins has no price: not billed)
SELECT * FROM usage_billing.calculate_overage('inv_acme', '2025-01-15');

-- any instant of the period selects it: its first and last microsecond
SELECT amount FROM usage_billing.preview_invoice('inv_acme', '2025-01-01 00:00:00+00') WHERE line = 'total';
SELECT amount FROM usage_billing.preview_invoice('inv_acme', '2025-01-31 23:59:59.999999+00') WHERE line = 'total';
-- February has no usage: every billed meter still has a line, at 0.00
SELECT * FROM usage_billing.preview_invoice('inv_acme', '2025-02-01 00:00:00+00');
SELECT * FROM usage_billing.calculate_overage('inv_acme', '2025-02-14');
-- a time zone in the argument is just another way to write the instant
SELECT amount FROM usage_billing.preview_invoice('inv_acme', '2025-02-01 00:30:00+01') WHERE line = 'total';

-- included quantities reduce the overage
SELECT usage_billing.set_plan_limit('inv_growth', 'orders', included => 1000, overage_price => 0.10);
SELECT meter, total, included, overage_quantity, overage_cost
  FROM usage_billing.calculate_overage('inv_acme', '2025-01-15') WHERE meter = 'orders';
-- a per-customer override replaces included; removing it restores the plan's
SELECT usage_billing.set_customer_limit('inv_acme', 'orders', 1200);
SELECT line, meter, quantity, unit_price, amount
  FROM usage_billing.preview_invoice('inv_acme', '2025-01-15') WHERE meter = 'orders' OR line = 'total';
SELECT usage_billing.set_customer_limit('inv_acme', 'orders', 5000);
SELECT line, meter, quantity, unit_price, amount
  FROM usage_billing.preview_invoice('inv_acme', '2025-01-15') WHERE meter = 'orders' OR line = 'total';
SELECT usage_billing.set_customer_limit('inv_acme', 'orders', NULL);
SELECT line, meter, quantity, unit_price, amount
  FROM usage_billing.preview_invoice('inv_acme', '2025-01-15') WHERE meter = 'orders' OR line = 'total';
SELECT usage_billing.set_plan_limit('inv_growth', 'orders', included => 0, overage_price => 0.10);

-- a plan change now does not reprice a past period: January stays on its plan (growth); the
-- current period is priced by segments, the new plan's from now
SELECT usage_billing.create_plan('inv_scale', base_price => 499);
SELECT usage_billing.set_plan_limit('inv_scale', 'orders', included => 10000, overage_price => 0.05);
SELECT usage_billing.set_plan_limit('inv_scale', 'api_calls', included => 1000000, overage_price => 0.01,
                                    overage_unit => 1000);
SELECT usage_billing.upsert_customer('inv_acme', 'inv_scale');
SELECT * FROM usage_billing.preview_invoice('inv_acme', '2025-01-15');
SELECT * FROM usage_billing.calculate_overage('inv_acme', '2025-01-15');
SELECT usage_billing.upsert_customer('inv_acme', 'inv_growth');
SELECT amount FROM usage_billing.preview_invoice('inv_acme', '2025-01-15') WHERE line = 'total';

-- a plan without billed meters: only the base and total lines, no overage rows
SELECT usage_billing.create_plan('inv_flat', base_price => 29.99, currency => 'eur');
SELECT usage_billing.set_plan_limit('inv_flat', 'orders', included => 100);
SELECT usage_billing.upsert_customer('inv_flat_co', 'inv_flat', billing_anchor => '2025-01-01 00:00:00+00');
SELECT pg_temp.set_total('inv_flat_co', 'orders', '2025-01-10', 250);
SELECT * FROM usage_billing.preview_invoice('inv_flat_co', '2025-01-15');
SELECT count(*) FROM usage_billing.calculate_overage('inv_flat_co', '2025-01-15');

-- the current period by default
SELECT usage_billing.upsert_customer('inv_now', 'inv_growth');
SELECT pg_temp.set_total('inv_now', 'ai_jobs', now(), 3);
SELECT line, meter, amount FROM usage_billing.preview_invoice('inv_now');
SELECT meter, total, overage_cost FROM usage_billing.calculate_overage('inv_now') WHERE total > 0;

-- month-end anchor: Jan 31 -> Feb 28 -> Mar 31; each instant picks its own period
SELECT usage_billing.upsert_customer('inv_monthend', 'inv_growth', billing_anchor => '2025-01-31 00:00:00+00');
SELECT pg_temp.set_total('inv_monthend', 'orders', '2025-02-10', 10);   -- [Jan 31, Feb 28)
SELECT pg_temp.set_total('inv_monthend', 'orders', '2025-03-01', 20);   -- [Feb 28, Mar 31)
SELECT pg_temp.set_total('inv_monthend', 'orders', '2025-03-31', 40);   -- [Mar 31, Apr 30)
SELECT period_start, total FROM usage_billing.usage_aggregates WHERE customer_id = 'inv_monthend' ORDER BY 1;
SELECT at, o.total, o.overage_cost
  FROM (VALUES ('2025-01-31 00:00:00+00'::timestamptz), ('2025-02-27 23:59:59+00'),
               ('2025-02-28 00:00:00+00'), ('2025-03-30 23:59:59+00'), ('2025-03-31 00:00:00+00'),
               ('2025-01-30 23:59:59+00')) v(at),
       LATERAL usage_billing.calculate_overage('inv_monthend', v.at) o
 WHERE o.meter = 'orders';

-- the worked example again, recorded event by event through increment_usage: several readings of
-- the last-value storage meter (one arriving late), a retried idempotency key
SELECT usage_billing.upsert_customer('inv_real', 'inv_growth', billing_anchor => '2025-01-01 00:00:00+00');
SELECT count(*) AS recorded, count(*) FILTER (WHERE r.duplicate) AS duplicates
  FROM (VALUES ('orders', 1000, 'o-1', '2025-01-03 09:00:00+00'::timestamptz),
               ('orders', 250, 'o-2', '2025-01-28 17:00:00+00'),
               ('orders', 250, 'o-2', '2025-01-28 17:00:00+00'),          -- a retry: not counted twice
               ('invoices', 500, 'i-1', '2025-01-10 00:00:00+00'),
               ('invoices', 480, 'i-2', '2025-01-31 23:59:59+00'),
               ('storage_gb', 30, 's-1', '2025-01-05 00:00:00+00'),
               ('storage_gb', 52, 's-2', '2025-01-20 00:00:00+00'),
               ('storage_gb', 45, 's-3', '2025-01-31 12:00:00+00'),
               ('storage_gb', 60, 's-4', '2025-01-10 00:00:00+00'),        -- late, older: not the last
               ('api_calls', 20000, 'a-1', '2025-01-15 00:00:00+00'),
               ('api_calls', 30000, 'a-2', '2025-01-16 00:00:00+00'),
               ('ai_jobs', 100, 'j-1', '2025-01-02 00:00:00+00'),
               ('ai_jobs', 20, 'j-2', '2025-01-30 00:00:00+00'),
               ('ai_jobs', 7, 'j-3', '2025-02-01 00:00:00+00')) e(meter, amount, key, at),
       LATERAL usage_billing.increment_usage('inv_real', e.meter, e.amount, e.key, e.at) r;
SELECT * FROM usage_billing.preview_invoice('inv_real', '2025-01-15');
SELECT line, meter, amount FROM usage_billing.preview_invoice('inv_real', '2025-02-15') WHERE amount <> 0;
-- the same January from the ledger (a range one microsecond short of the period) agrees
SELECT s.meter, s.total, s.event_count, o.total AS billed_total
  FROM usage_billing.get_usage_summary('inv_real', '2025-01-01 00:00:00+00', '2025-01-31 23:59:59.999999+00') s
  JOIN usage_billing.calculate_overage('inv_real', '2025-01-15') o USING (meter)
 ORDER BY s.meter;

-- unknown customer: P0002, for both (message and hint once in full)
SELECT * FROM usage_billing.preview_invoice('inv_nobody', '2025-01-15');
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.preview_invoice('inv_nobody', '2025-01-15')$$);
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.calculate_overage('inv_nobody')$$);
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.calculate_overage(NULL)$$);

-- named arguments as PostgREST sends them
SELECT line, amount FROM usage_billing.preview_invoice(customer_id => 'inv_acme', period_start => '2025-01-15')
 WHERE line <> 'usage';
