-- corrections: void_usage and adjust_usage, append-only, aggregates follow at once
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
\set VERBOSITY default

SELECT usage_billing.create_meter('co_calls', 'sum', 'calls');
SELECT usage_billing.create_meter('co_logins', 'count');
SELECT usage_billing.create_meter('co_peak', 'max', 'GB');
SELECT usage_billing.create_meter('co_seats', 'last', 'seats');
SELECT usage_billing.create_meter('co_users', 'unique_count', value_property => 'user_id');
SELECT usage_billing.create_plan('co_plan', 10);
SELECT usage_billing.set_plan_limit('co_plan', 'co_calls', included => 100, overage_price => 0.5);
SELECT usage_billing.upsert_customer('co_a', 'co_plan', '2025-01-01 00:00+00');
SELECT usage_billing.upsert_customer('co_b', 'co_plan', '2025-01-01 00:00+00');

CREATE FUNCTION pg_temp.co_agg(c text)
RETURNS TABLE (meter text, period_start timestamptz, total numeric, event_count bigint,
               first_usage timestamptz, last_usage timestamptz)
LANGUAGE sql AS $$
  SELECT meter, period_start, total, event_count, first_usage, last_usage
    FROM usage_billing.usage_aggregates WHERE customer_id = c ORDER BY meter, period_start
$$;

-- sum: void one event of three
SELECT total FROM usage_billing.increment_usage('co_a', 'co_calls', 40, 'co-1', '2025-01-05');
SELECT total FROM usage_billing.increment_usage('co_a', 'co_calls', 70, 'co-2', '2025-01-06');
SELECT total FROM usage_billing.increment_usage('co_a', 'co_calls', 5, 'co-3', '2025-01-07');
SELECT usage_billing.void_usage('co_a', 'co-3', 'test traffic');
SELECT * FROM pg_temp.co_agg('co_a');
-- the latest event voided: last_usage goes back to the latest live one
SELECT usage_billing.void_usage('co_a', 'co-2', 'double counted');
SELECT * FROM pg_temp.co_agg('co_a');
-- voiding twice is a no-op
SELECT usage_billing.void_usage('co_a', 'co-2', 'again');
SELECT * FROM pg_temp.co_agg('co_a');
-- the ledger keeps the originals and the corrections, with who and why
SELECT kind, occurred_at, amount, idempotency_key, reason, recorded_by = current_user AS by_me,
       voided_event_id IS NOT NULL AS names_original
  FROM usage_billing.usage_events WHERE customer_id = 'co_a' ORDER BY event_id;
SELECT kind, meter, amount, voided_idempotency_key, reason
  FROM usage_billing.usage_corrections WHERE customer_id = 'co_a' ORDER BY event_id;
-- a voided key stays used: recording it again is a duplicate
SELECT total, duplicate FROM usage_billing.increment_usage('co_a', 'co_calls', 70, 'co-2', '2025-01-06');

-- adjustments: up and down, never below 0
SELECT usage_billing.adjust_usage('co_a', 'co_calls', 15, 'missed batch', '2025-01-20');
SELECT usage_billing.adjust_usage('co_a', 'co_calls', -50, 'refund', '2025-01-21');
SELECT * FROM pg_temp.co_agg('co_a');
SELECT usage_billing.adjust_usage('co_a', 'co_calls', -5.01, 'too much', '2025-01-21');
SELECT usage_billing.adjust_usage('co_a', 'co_calls', -5, 'exactly to zero', '2025-01-21');
SELECT total, event_count FROM usage_billing.usage_aggregates WHERE customer_id = 'co_a' AND meter = 'co_calls';
-- a void that would take the total below 0 (after a negative adjustment)
SELECT usage_billing.void_usage('co_a', 'co-1', 'would be negative');
SELECT count(*) AS voids FROM usage_billing.usage_events WHERE customer_id = 'co_a' AND kind = 'void';
-- an adjustment in a period without usage creates its aggregate; event_count stays 0
SELECT usage_billing.adjust_usage('co_a', 'co_calls', 3, 'credit note', '2025-02-10');
SELECT * FROM pg_temp.co_agg('co_a');
-- a negative adjustment of an empty period is refused and leaves nothing behind
SELECT usage_billing.adjust_usage('co_a', 'co_calls', -1, 'nothing there', '2025-03-10');
SELECT count(*) FROM usage_billing.usage_aggregates WHERE customer_id = 'co_a' AND period_start = '2025-03-01';
-- corrections of closed periods are accepted whatever the late-event window says
SET usage_billing.late_event_grace = 0;
SELECT usage_billing.adjust_usage('co_a', 'co_calls', 1, 'late fix', '2025-01-31 23:59');
SELECT total FROM usage_billing.increment_usage('co_a', 'co_calls', 1, occurred_at => '2025-01-31 23:59');
RESET usage_billing.late_event_grace;
SELECT total FROM usage_billing.usage_aggregates
 WHERE customer_id = 'co_a' AND meter = 'co_calls' AND period_start = '2025-01-01';

-- count: a void removes one event, an adjustment adds whole events only
SELECT total FROM usage_billing.increment_usage('co_b', 'co_logins', 1, 'co-l1', '2025-01-05');
SELECT total FROM usage_billing.increment_usage('co_b', 'co_logins', 1, 'co-l2', '2025-01-05');
SELECT total FROM usage_billing.increment_usage('co_b', 'co_logins', 1, 'co-l3', '2025-01-05');
SELECT usage_billing.void_usage('co_b', 'co-l2', 'bot');
SELECT usage_billing.adjust_usage('co_b', 'co_logins', 4, 'import', '2025-01-06');
SELECT usage_billing.adjust_usage('co_b', 'co_logins', 0.5, 'half a login', '2025-01-06');
-- max: a void recomputes the period's maximum from the live events
SELECT total FROM usage_billing.increment_usage('co_b', 'co_peak', 7, 'co-p1', '2025-01-05');
SELECT total FROM usage_billing.increment_usage('co_b', 'co_peak', 12, 'co-p2', '2025-01-06');
SELECT total FROM usage_billing.increment_usage('co_b', 'co_peak', 9, 'co-p3', '2025-01-07');
SELECT usage_billing.void_usage('co_b', 'co-p2', 'sensor glitch');
-- last: voiding the latest value falls back to the one before
SELECT total FROM usage_billing.increment_usage('co_b', 'co_seats', 3, 'co-s1', '2025-01-05');
SELECT total FROM usage_billing.increment_usage('co_b', 'co_seats', 8, 'co-s2', '2025-01-09');
SELECT total FROM usage_billing.increment_usage('co_b', 'co_seats', 5, 'co-s3', '2025-01-07');
SELECT usage_billing.void_usage('co_b', 'co-s2', 'wrong seat count');
-- unique_count: a value stays while another live event has it
SELECT total FROM usage_billing.increment_usage('co_b', 'co_users', 1, 'co-u1', '2025-01-05', '{"user_id": "u1"}');
SELECT total FROM usage_billing.increment_usage('co_b', 'co_users', 1, 'co-u2', '2025-01-06', '{"user_id": "u1"}');
SELECT total FROM usage_billing.increment_usage('co_b', 'co_users', 1, 'co-u3', '2025-01-07', '{"user_id": 42}');
SELECT usage_billing.void_usage('co_b', 'co-u1', 'duplicate login');
SELECT total FROM usage_billing.usage_aggregates WHERE customer_id = 'co_b' AND meter = 'co_users';
SELECT usage_billing.void_usage('co_b', 'co-u2', 'duplicate login');
SELECT usage_billing.void_usage('co_b', 'co-u3', 'test user');
SELECT * FROM pg_temp.co_agg('co_b');
SELECT value FROM usage_billing.usage_unique_values WHERE customer_id = 'co_b';
-- a voided value counts again when it comes back
SELECT total FROM usage_billing.increment_usage('co_b', 'co_users', 1, 'co-u4', '2025-01-08', '{"user_id": "u1"}');
-- every live max/last event voided: the total is 0
SELECT usage_billing.void_usage('co_b', 'co-p1', 'x');
SELECT usage_billing.void_usage('co_b', 'co-p3', 'x');
SELECT total, event_count, first_usage, last_usage
  FROM usage_billing.usage_aggregates WHERE customer_id = 'co_b' AND meter = 'co_peak';

-- errors
SELECT usage_billing.void_usage('co_a', 'no-such-key', 'x');
SELECT usage_billing.void_usage('co_b', 'co-1', 'another customer''s key');
SELECT usage_billing.void_usage('nobody', 'co-1', 'x');
SELECT usage_billing.void_usage('co_a', NULL, 'x');
SELECT usage_billing.adjust_usage('co_b', 'co_peak', 1, 'max meters cannot be adjusted');
SELECT usage_billing.adjust_usage('co_b', 'co_users', 1, 'nor unique_count');
SELECT usage_billing.adjust_usage('co_b', 'co_seats', 1, 'nor last');
SELECT usage_billing.adjust_usage('co_b', 'no_such_meter', 1, 'x');
SELECT usage_billing.adjust_usage('nobody', 'co_calls', 1, 'x');
SELECT usage_billing.adjust_usage('co_b', 'co_calls', NULL, 'x');
SELECT usage_billing.adjust_usage('co_b', 'co_calls', 'NaN', 'x');
SELECT usage_billing.adjust_usage('co_b', 'co_calls', 1, 'x', NULL);

-- corrections raise no alerts, and a crossing already alerted is not alerted again
SELECT usage_billing.adjust_usage('co_b', 'co_calls', 95, 'import', '2025-01-10');
SELECT count(*) AS alerts FROM usage_billing.alerts WHERE customer_id = 'co_b';
SELECT total, status FROM usage_billing.increment_usage('co_b', 'co_calls', 10, 'co-c1', '2025-01-11');
SELECT kind, value FROM usage_billing.alerts WHERE customer_id = 'co_b' ORDER BY kind;
SELECT usage_billing.void_usage('co_b', 'co-c1', 'undo');
SELECT total, status FROM usage_billing.increment_usage('co_b', 'co_calls', 10, 'co-c2', '2025-01-11');
SELECT kind, value FROM usage_billing.alerts WHERE customer_id = 'co_b' ORDER BY kind;
-- event_count counts live usage events only
SELECT meter, total, event_count FROM usage_billing.usage_aggregates
 WHERE customer_id = 'co_b' AND meter = 'co_calls';

-- limits, summaries and invoices follow at once
SELECT usage_billing.upsert_customer('co_inv', 'co_plan', '2025-01-01 00:00+00');
SELECT total FROM usage_billing.increment_usage('co_inv', 'co_calls', 150, 'co-i1', '2025-01-05');
SELECT total FROM usage_billing.increment_usage('co_inv', 'co_calls', 30, 'co-i2', '2025-01-06');
SELECT line, quantity, amount FROM usage_billing.preview_invoice('co_inv', '2025-01-01');
SELECT usage_billing.void_usage('co_inv', 'co-i2', 'duplicate upload');
SELECT line, quantity, amount FROM usage_billing.preview_invoice('co_inv', '2025-01-01');
SELECT meter, total, overage_quantity, overage_cost FROM usage_billing.calculate_overage('co_inv', '2025-01-01');
SELECT usage_billing.adjust_usage('co_inv', 'co_calls', -60, 'sla credit', '2025-01-20');
SELECT line, quantity, amount FROM usage_billing.preview_invoice('co_inv', '2025-01-01');
-- the period's summary (aggregates) and a range that reads the ledger agree
SELECT meter, total, event_count, overage_cost
  FROM usage_billing.get_usage_summary('co_inv', '2025-01-01', '2025-02-01');
SELECT meter, total, event_count
  FROM usage_billing.get_usage_summary('co_inv', '2025-01-01', '2025-01-31');
-- a hard cap frees up when usage is voided
SELECT usage_billing.create_plan('co_capped', 0);
SELECT usage_billing.set_plan_limit('co_capped', 'co_calls', included => 10, hard_cap => true);
SELECT usage_billing.upsert_customer('co_cap', 'co_capped');
SELECT total FROM usage_billing.increment_usage('co_cap', 'co_calls', 8, 'co-k1');
SELECT total FROM usage_billing.increment_usage('co_cap', 'co_calls', 2, 'co-k2');
SELECT allowed, current, remaining, reason FROM usage_billing.check_limit('co_cap', 'co_calls', 5);
SELECT usage_billing.void_usage('co_cap', 'co-k1', 'test data');
SELECT allowed, current, remaining, reason FROM usage_billing.check_limit('co_cap', 'co_calls', 5);
SELECT total, remaining, status FROM usage_billing.increment_usage('co_cap', 'co_calls', 5);
-- an adjustment may take a capped total past the cap: it is an administrator's act
SELECT usage_billing.adjust_usage('co_cap', 'co_calls', 6, 'contractual minimum');
SELECT allowed, current, remaining, status, reason FROM usage_billing.check_limit('co_cap', 'co_calls', 1);
