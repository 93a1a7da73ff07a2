-- test/demo.sql: the worked example of the quick start (run by test/setup_and_demo.sh).
--
-- A "pro" plan at $199 a month with five billed meters, one customer billed from
-- 2025-01-01, and January 2025's usage: 1,250 orders, 980 invoices, 45 GB of storage,
-- 50,000 API calls and 120 AI jobs.  Expected invoice for January: $478.50.
-- Every event carries an idempotency key, so running this file twice records nothing new.

\set ON_ERROR_STOP 1
\pset footer off
SET timezone = 'UTC';

CREATE EXTENSION IF NOT EXISTS usage_billing;

\echo
\echo '--- catalog: meters, the pro plan and its prices, one customer'
\o /dev/null
SELECT usage_billing.create_meter('orders',     'sum',  'orders',  'Orders',      stripe_event_name => 'orders')
 WHERE NOT EXISTS (SELECT FROM usage_billing.meters WHERE meter = 'orders');
SELECT usage_billing.create_meter('invoices',   'sum',  'invoices', 'Invoices',   stripe_event_name => 'invoices')
 WHERE NOT EXISTS (SELECT FROM usage_billing.meters WHERE meter = 'invoices');
SELECT usage_billing.create_meter('storage_gb', 'last', 'GB',      'Storage',     stripe_event_name => 'storage_gb')
 WHERE NOT EXISTS (SELECT FROM usage_billing.meters WHERE meter = 'storage_gb');
SELECT usage_billing.create_meter('api_calls',  'sum',  'calls',   'API calls',   stripe_event_name => 'api_calls')
 WHERE NOT EXISTS (SELECT FROM usage_billing.meters WHERE meter = 'api_calls');
SELECT usage_billing.create_meter('ai_jobs',    'sum',  'jobs',    'AI jobs',     stripe_event_name => 'ai_jobs')
 WHERE NOT EXISTS (SELECT FROM usage_billing.meters WHERE meter = 'ai_jobs');

SELECT usage_billing.create_plan('pro', base_price => 199, currency => 'usd', period => '1 month')
 WHERE NOT EXISTS (SELECT FROM usage_billing.plans WHERE plan = 'pro');

SELECT usage_billing.set_plan_limit('pro', 'orders',     included => 0, overage_price => 0.10);
SELECT usage_billing.set_plan_limit('pro', 'invoices',   included => 0, overage_price => 0.05);
SELECT usage_billing.set_plan_limit('pro', 'storage_gb', included => 0, overage_price => 1.00);
SELECT usage_billing.set_plan_limit('pro', 'api_calls',  included => 0, overage_price => 0.01, overage_unit => 1000);
SELECT usage_billing.set_plan_limit('pro', 'ai_jobs',    included => 0, overage_price => 0.50);

SELECT usage_billing.upsert_customer('acme', 'pro',
                                     billing_anchor => '2025-01-01 00:00:00+00',
                                     stripe_customer_id => 'cus_demo_acme');
\o

SELECT plan, meter, included, overage_price, overage_unit
  FROM usage_billing.plan_limits WHERE plan = 'pro' ORDER BY meter;

\echo
\echo '--- recording January 2025 (increment_usage with occurred_at in the past)'
-- January 2025 is long past the default late-event grace (35 days after a period's end):
-- the demo backfills it, which a superuser allows for the session.
SET usage_billing.late_event_grace = -1;
-- orders: 25 business days x 50 orders
SELECT count(*) AS orders_calls, max(u.total) AS orders_total
  FROM generate_series(1, 25) AS g
 CROSS JOIN LATERAL usage_billing.increment_usage('acme', 'orders', amount => 50,
        idempotency_key => 'demo-orders-' || g,
        occurred_at => timestamptz '2025-01-02 09:00+00' + (g - 1) * interval '1 day') AS u;
-- invoices: 20 days x 49
SELECT count(*) AS invoices_calls, max(u.total) AS invoices_total
  FROM generate_series(1, 20) AS g
 CROSS JOIN LATERAL usage_billing.increment_usage('acme', 'invoices', amount => 49,
        idempotency_key => 'demo-invoices-' || g,
        occurred_at => timestamptz '2025-01-05 17:00+00' + (g - 1) * interval '1 day') AS u;
-- storage: one reading a day, growing; "last" keeps the latest reading (45 GB on Jan 31)
SELECT count(*) AS storage_calls, (array_agg(u.total ORDER BY g DESC))[1] AS storage_total
  FROM generate_series(1, 31) AS g
 CROSS JOIN LATERAL usage_billing.increment_usage('acme', 'storage_gb', amount => 14 + g,
        idempotency_key => 'demo-storage-' || g,
        occurred_at => timestamptz '2025-01-01 23:00+00' + (g - 1) * interval '1 day') AS u;
-- API calls: 50 hourly batches of 1,000, sent as one increment_usage_batch call
SELECT accepted, duplicates
  FROM usage_billing.increment_usage_batch((
        SELECT jsonb_agg(jsonb_build_object(
                   'customer_id', 'acme', 'meter', 'api_calls', 'amount', 1000,
                   'idempotency_key', 'demo-api-' || g,
                   'occurred_at', timestamptz '2025-01-10 00:00+00' + g * interval '1 hour'))
          FROM generate_series(1, 50) AS g));
-- AI jobs: 120 single events (amount defaults to 1)
SELECT count(*) AS ai_job_calls, max(u.total) AS ai_jobs_total
  FROM generate_series(1, 120) AS g
 CROSS JOIN LATERAL usage_billing.increment_usage('acme', 'ai_jobs',
        idempotency_key => 'demo-ai-' || g,
        occurred_at => timestamptz '2025-01-15 00:00+00' + g * interval '1 hour') AS u;

\echo
\echo '--- a retry with a key already used records nothing (duplicate = true)'
SELECT total, duplicate, period_start, period_end
  FROM usage_billing.increment_usage('acme', 'orders', amount => 50,
        idempotency_key => 'demo-orders-1', occurred_at => '2025-01-02 09:00+00');

\echo
\echo '--- get_usage_summary for January 2025'
SELECT meter, total, event_count, included, usage_percent, overage_quantity, overage_cost
  FROM usage_billing.get_usage_summary('acme', '2025-01-01 00:00+00', '2025-02-01 00:00+00');

\echo
\echo '--- preview_invoice for January 2025 (expected total: 478.50)'
SELECT line, meter, quantity, unit_price, amount
  FROM usage_billing.preview_invoice('acme', '2025-01-15 00:00+00');

\echo
\echo '--- the current billing period: a little usage now, then the summary and a limit check'
\echo '    (the pro plan includes 0 of everything: all usage is billed as overage, so status is over_limit)'
SELECT total, status, period_start, period_end
  FROM usage_billing.increment_usage('acme', 'api_calls', amount => 1500,
        idempotency_key => 'demo-now-api-' || to_char(now(), 'YYYY-MM'));
SELECT total, status
  FROM usage_billing.increment_usage('acme', 'orders', amount => 3,
        idempotency_key => 'demo-now-orders-' || to_char(now(), 'YYYY-MM'));
SELECT meter, total, event_count, included, overage_quantity, overage_cost
  FROM usage_billing.get_usage_summary('acme');
SELECT allowed, current, included, remaining, status, overage_allowed, estimated_overage_cost, reason
  FROM usage_billing.check_limit('acme', 'ai_jobs', 10);
