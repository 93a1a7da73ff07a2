-- Plan history, pricing by segments and finalized invoices (contract 9.4 and 9.5).
-- Customers here live in 2019, so that finalize_invoices, which invoices every customer,
-- reaches no period of the other tests (they bill 2024 and later).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
CREATE FUNCTION pg_temp.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

SELECT usage_billing.create_meter('lc_orders', 'sum');
SELECT usage_billing.create_meter('lc_seats', 'max');
SELECT usage_billing.create_plan('lc_free', 0);
SELECT usage_billing.set_plan_limit('lc_free', 'lc_orders', included => 1000);
SELECT usage_billing.create_plan('lc_pro', 49);
SELECT usage_billing.set_plan_limit('lc_pro', 'lc_orders', included => 1000, overage_price => 0.10);
SELECT usage_billing.set_plan_limit('lc_pro', 'lc_seats', included => 5, overage_price => 8);
SELECT usage_billing.create_plan('lc_team', 99);
SELECT usage_billing.set_plan_limit('lc_team', 'lc_orders',
    tiers => '[{"up_to": 5000, "unit_price": 0}, {"up_to": null, "unit_price": 0.05, "flat_fee": 3}]');
SELECT usage_billing.create_plan('lc_yearly', 490, period => '1 year');

-- 1. free -> pro -> free within January 2019: a positive, exact invoice.
--    free [Jan 1, Jan 11): base 0, 500 orders not billed
--    pro  [Jan 11, Jan 21): base 49 * 10/31 = 15.806.. -> 15.81; 1500 orders: 500 over * 0.10 = 50.00
--    free [Jan 21, Feb 1): base 0, 300 orders not billed
SELECT usage_billing.upsert_customer('lc_a', 'lc_free', '2019-01-01 00:00+00');
SELECT * FROM usage_billing.change_plan('lc_a', 'lc_pro', 'immediate', '2019-01-11 00:00+00');
SELECT * FROM usage_billing.change_plan('lc_a', 'lc_free', 'immediate', '2019-01-21 00:00+00');
SELECT count(*) FROM (VALUES (500, '2019-01-05 00:00+00'::timestamptz), (900, '2019-01-12 00:00+00'),
                             (600, '2019-01-20 23:59:59+00'), (300, '2019-01-25 00:00+00')) e(a, t),
       LATERAL usage_billing.increment_usage('lc_a', 'lc_orders', e.a, 'lc-a-' || e.a, e.t);
SELECT plan, effective_from, effective_to FROM usage_billing.plan_history
 WHERE customer_id = 'lc_a' ORDER BY effective_from;
SELECT * FROM usage_billing.preview_invoice('lc_a', '2019-01-15');
SELECT * FROM usage_billing.calculate_overage('lc_a', '2019-01-15');
-- the summary's cost is the segments' (pro's 50), its limit the plan in force at the period's end
SELECT meter, total, included, overage_cost
  FROM usage_billing.get_usage_summary('lc_a', '2019-01-01 00:00+00', '2019-02-01 00:00+00');
-- the prorated base, exactly
SELECT 49 * extract(epoch FROM interval '10 days') / extract(epoch FROM interval '31 days') AS exact_pro_base;
-- February is all free again: one segment, nothing billed
SELECT line, amount, segment_start FROM usage_billing.preview_invoice('lc_a', '2019-02-15');

-- 2. upgrade and downgrade timing: auto upgrades at once, downgrades at the period's end
SELECT usage_billing.upsert_customer('lc_b', 'lc_pro', '2019-01-01 00:00+00');
SELECT * FROM usage_billing.change_plan('lc_b', 'lc_free', 'auto', '2019-02-10 12:00+00');
SELECT * FROM usage_billing.change_plan('lc_b', 'lc_team', 'auto', '2019-03-15 00:00+00');
SELECT * FROM usage_billing.change_plan('lc_b', 'lc_pro', 'period_end', '2019-03-20 00:00+00');
SELECT plan, effective_from, effective_to FROM usage_billing.plan_history
 WHERE customer_id = 'lc_b' ORDER BY effective_from;
SELECT usage_billing.plan_at('lc_b', t) AS plan, t
  FROM unnest('{2019-02-28 23:59:59.999999+00, 2019-03-01 00:00+00, 2019-03-14 23:59:59+00, 2019-03-15 00:00+00, 2019-04-01 00:00+00}'::timestamptz[]) t;
-- a new change supersedes the changes from its instant on; changing to the plan in force
-- cancels a scheduled change
SELECT * FROM usage_billing.change_plan('lc_b', 'lc_team', 'auto', '2019-03-25 00:00+00');
SELECT plan, effective_from, effective_to FROM usage_billing.plan_history
 WHERE customer_id = 'lc_b' ORDER BY effective_from;
-- March: free [Mar 1, Mar 15), team [Mar 15, Apr 1)
SELECT line, meter, quantity, amount, segment_start FROM usage_billing.preview_invoice('lc_b', '2019-03-10');

-- 3. a change exactly at a period boundary does not split a period
SELECT usage_billing.upsert_customer('lc_c', 'lc_free', '2019-01-01 00:00+00');
SELECT * FROM usage_billing.change_plan('lc_c', 'lc_pro', 'immediate', '2019-02-01 00:00+00');
SELECT line, amount, segment_start FROM usage_billing.preview_invoice('lc_c', '2019-01-15');
SELECT line, amount, segment_start FROM usage_billing.preview_invoice('lc_c', '2019-02-15');
-- period_end at a boundary instant: the period containing it is the new one (ends Apr 1)
SELECT * FROM usage_billing.change_plan('lc_c', 'lc_free', 'period_end', '2019-03-01 00:00+00');

-- 4. anchor at a month's end: [Jan 31, Feb 28) has 28 days; a change on Feb 14 halves it
SELECT usage_billing.upsert_customer('lc_d', 'lc_free', '2019-01-31 00:00+00');
SELECT * FROM usage_billing.change_plan('lc_d', 'lc_pro', 'immediate', '2019-02-14 00:00+00');
SELECT line, amount, segment_start FROM usage_billing.preview_invoice('lc_d', '2019-02-01');
-- pro from Feb 14 to Feb 28 is half of 49; the next period [Feb 28, Mar 31) is pro whole
SELECT line, amount, segment_start FROM usage_billing.preview_invoice('lc_d', '2019-03-01');
-- a downgrade at the period's end lands on the clamped boundary
SELECT * FROM usage_billing.change_plan('lc_d', 'lc_free', 'auto', '2019-03-05 00:00+00');

-- 5. usage is priced by the segment it occurred in, under that segment's plan, once:
--    a max meter keeps each segment's own maximum
SELECT usage_billing.upsert_customer('lc_e', 'lc_pro', '2019-01-01 00:00+00');
SELECT count(*) FROM (VALUES (9, '2019-01-03 00:00+00'::timestamptz, 's1'), (7, '2019-01-20 00:00+00', 's2'),
                             (2000, '2019-01-04 00:00+00', 'o1'), (6000, '2019-01-25 00:00+00', 'o2')) e(a, t, k),
       LATERAL usage_billing.increment_usage('lc_e', CASE WHEN k LIKE 's%' THEN 'lc_seats' ELSE 'lc_orders' END,
                                             e.a, 'lc-e-' || k, e.t);
SELECT * FROM usage_billing.change_plan('lc_e', 'lc_team', 'immediate', '2019-01-16 00:00+00');
SELECT line, meter, quantity, unit_price, amount, segment_start FROM usage_billing.preview_invoice('lc_e', '2019-01-15');
SELECT meter, total, overage_cost, segment_start FROM usage_billing.calculate_overage('lc_e', '2019-01-15');

-- 6. bad changes: 22023 and P0002, nothing written
SELECT pg_temp.error_of($$SELECT usage_billing.change_plan('lc_a', 'lc_yearly')$$);
SELECT pg_temp.error_of($$SELECT usage_billing.change_plan('lc_a', 'lc_pro', 'tomorrow')$$);
SELECT pg_temp.error_of($$SELECT usage_billing.change_plan('lc_a', 'lc_pro', 'immediate', 'infinity')$$);
SELECT pg_temp.error_of($$SELECT usage_billing.change_plan('lc_nobody', 'lc_pro')$$);
SELECT pg_temp.error_of($$SELECT usage_billing.change_plan('lc_a', 'lc_nothing')$$);
SELECT count(*) FROM usage_billing.customer_plans WHERE customer_id = 'lc_a';

-- 7. finalized invoices.  Invoices start with the period of a customer's creation (now): these
--    customers are a backfill of 2019, invoiced from their anchors.
SELECT count(*) FROM usage_billing.invoice_starts WHERE customer_id LIKE 'lc\_%' AND invoices_from > now() - interval '1 day';
-- so nothing is due yet, whatever "before" says: only periods that have ended are invoiced
SELECT usage_billing.finalize_invoices('9999-01-01');
UPDATE usage_billing.invoice_starts s SET invoices_from = c.billing_anchor
  FROM usage_billing.customers c WHERE c.customer_id = s.customer_id AND c.customer_id LIKE 'lc\_%';
-- the grace: nothing before Feb 1 01:00 for January
SHOW usage_billing.invoice_grace;
SELECT usage_billing.finalize_invoices('2019-02-01 00:59:59+00');
SELECT usage_billing.finalize_invoices('2019-02-01 01:00+00');
-- twice: still one invoice per customer and period
SELECT usage_billing.finalize_invoices('2019-02-01 01:00+00');
SELECT invoice_number, customer_id, period_start, period_end, currency, total, status
  FROM usage_billing.invoices WHERE customer_id LIKE 'lc\_%' ORDER BY customer_id, invoice_number;
SELECT l.line_no, l.line, l.meter, l.segment_start, l.quantity, l.unit_price, l.amount
  FROM usage_billing.invoice_lines l JOIN usage_billing.invoices i USING (invoice_id)
 WHERE i.customer_id = 'lc_a' ORDER BY l.line_no;
-- the finalized invoice equals the preview it came from
SELECT (SELECT array_agg(p::text) FROM usage_billing.preview_invoice('lc_e', '2019-01-15') p) =
       (SELECT array_agg(row(l.line, l.meter, l.quantity, l.unit_price, l.amount, l.segment_start)::text ORDER BY l.line_no)
          FROM usage_billing.invoice_lines l JOIN usage_billing.invoices i USING (invoice_id)
         WHERE i.customer_id = 'lc_e' AND i.period_start = '2019-01-01') AS same_lines;

-- a late event for an invoiced period is refused (22023), even with any grace
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.increment_usage('lc_a', 'lc_orders', 5, 'lc-a-late', '2019-01-30 00:00+00')$$);
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "lc_a", "meter": "lc_orders", "amount": 5, "occurred_at": "2019-01-30T00:00:00Z"}]')$$);
-- a period that is not invoiced still takes it (February 2019)
SELECT total, period_start FROM usage_billing.increment_usage('lc_a', 'lc_orders', 5, 'lc-a-feb', '2019-02-03 00:00+00');
-- by setting, it lands in the current period instead
SET usage_billing.late_event_action = 'current_period';
SELECT r.period_start = b.period_start AS in_current_period
  FROM usage_billing.increment_usage('lc_a', 'lc_orders', 5, 'lc-a-late2', '2019-01-30 00:00+00') r,
       usage_billing.period_bounds('2019-01-01 00:00+00', '1 month', now()) b;
RESET usage_billing.late_event_action;
-- a plan change into an invoiced period is refused
SELECT pg_temp.error_of($$SELECT usage_billing.change_plan('lc_a', 'lc_pro', 'immediate', '2019-01-25 00:00+00')$$);

-- a void and an adjustment of January after finalization: the finalized invoice is unchanged,
-- the next invoice carries a credit (pro's segment: 1500 -> 900 orders, 50.00 -> 0.00) and a
-- debit (lc_e's team tiers: 6000 -> 8000 orders)
SELECT usage_billing.void_usage('lc_a', 'lc-a-600', 'duplicate order import');
SELECT usage_billing.adjust_usage('lc_e', 'lc_orders', 2000, 'missed orders', '2019-01-28 00:00+00');
SELECT line, meter, amount FROM usage_billing.preview_invoice('lc_a', '2019-01-15');
SELECT usage_billing.finalize_invoices('2019-03-01 01:00+00');
SELECT i.customer_id, i.invoice_number, i.period_start, l.line, l.meter, l.segment_start, l.quantity, l.amount,
       l.for_period_start
  FROM usage_billing.invoice_lines l JOIN usage_billing.invoices i USING (invoice_id)
 WHERE i.customer_id IN ('lc_a', 'lc_e') AND i.period_start = '2019-02-01' ORDER BY 1, l.line_no;
-- corrected once: the next finalization carries nothing more
SELECT usage_billing.finalize_invoices('2019-04-01 01:00+00');
SELECT count(*) AS correction_lines FROM usage_billing.invoice_lines l JOIN usage_billing.invoices i USING (invoice_id)
 WHERE i.customer_id IN ('lc_a', 'lc_e') AND l.line IN ('credit', 'debit');
SELECT customer_id, invoice_number, period_start, total FROM usage_billing.invoices
 WHERE customer_id IN ('lc_a', 'lc_e') ORDER BY 1, 2;

-- finalized invoices do not change
UPDATE usage_billing.invoices SET total = 0 WHERE customer_id = 'lc_a';
DELETE FROM usage_billing.invoice_lines WHERE amount = 0;
UPDATE usage_billing.invoices SET status = 'paid' WHERE customer_id = 'lc_a' AND invoice_number = 1;
SELECT status FROM usage_billing.invoices WHERE customer_id = 'lc_a' AND invoice_number = 1;
-- the anchor of an invoiced customer stays
SELECT pg_temp.error_of($$SELECT usage_billing.upsert_customer('lc_a', NULL, '2019-01-15 00:00+00')$$);
SELECT pg_temp.error_of($$SELECT usage_billing.finalize_invoices(NULL)$$);

-- 8. the plan in force is computed at the call: a change that takes effect a moment from now
--    applies then, with nothing written at that moment, in a backend whose cache holds the
--    customer already
SELECT usage_billing.create_meter('lc_calls', 'sum');
SELECT usage_billing.create_plan('lc_capped', 0);
SELECT usage_billing.set_plan_limit('lc_capped', 'lc_calls', included => 10, hard_cap => true);
SELECT usage_billing.create_plan('lc_roomy', 0);
SELECT usage_billing.set_plan_limit('lc_roomy', 'lc_calls', included => 1000, hard_cap => true);
SELECT usage_billing.upsert_customer('lc_now', 'lc_capped');
SELECT allowed, included FROM usage_billing.check_limit('lc_now', 'lc_calls', 50);
SELECT plan FROM usage_billing.change_plan('lc_now', 'lc_roomy', 'immediate', now() + interval '1 second');
SELECT allowed, included FROM usage_billing.check_limit('lc_now', 'lc_calls', 50);
SELECT pg_temp.error_of($$SELECT * FROM usage_billing.increment_usage('lc_now', 'lc_calls', 50)$$);
SELECT pg_sleep(1.2);
SELECT allowed, included FROM usage_billing.check_limit('lc_now', 'lc_calls', 50);
SELECT total, included FROM usage_billing.increment_usage('lc_now', 'lc_calls', 50);
