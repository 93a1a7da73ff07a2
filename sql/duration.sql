-- Duration meters and record_duration: spans converted exactly to the meter's unit, split at
-- billing period boundaries; strict input and exact idempotency apply.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

SELECT usage_billing.create_meter('du_secs', 'duration', unit => 'seconds');
SELECT usage_billing.create_meter('du_mins', 'duration', unit => 'minutes');
SELECT usage_billing.create_meter('du_hours', 'duration', unit => 'hours', max_amount => 24);
SELECT usage_billing.create_meter('du_bad', 'duration');
SELECT usage_billing.create_meter('du_bad', 'duration', unit => 'days');
SELECT usage_billing.create_meter('du_plain', 'sum', unit => 'hours');
SELECT meter, aggregation, unit, duration_unit FROM usage_billing.meters WHERE meter LIKE 'du\_%' ORDER BY meter;
SELECT usage_billing.create_plan('du_plan', 0);
SELECT usage_billing.set_plan_limit('du_plan', 'du_hours', included => 5, overage_price => 2);
SELECT usage_billing.upsert_customer('du_a', 'du_plan', '2025-01-01 00:00+00');

-- increment_usage takes amounts in the meter's unit
SELECT total FROM usage_billing.increment_usage('du_a', 'du_hours', 2.5, occurred_at => '2025-01-10');
-- spans: 90 minutes, in hours, minutes and seconds; fractions of a second stay exact
SELECT total, status FROM usage_billing.record_duration('du_a', 'du_hours', '2025-01-10 08:00', '2025-01-10 09:30');
SELECT total FROM usage_billing.record_duration('du_a', 'du_mins', '2025-01-10 08:00', '2025-01-10 09:30');
SELECT total FROM usage_billing.record_duration('du_a', 'du_secs', '2025-01-10 08:00', '2025-01-10 08:00:01.25');
-- one second in minutes: 1/60, rounded to the meter's 6 decimals
SELECT total FROM usage_billing.record_duration('du_a', 'du_mins', '2025-01-11 00:00:00', '2025-01-11 00:00:01');
-- an empty span records 0
SELECT total FROM usage_billing.record_duration('du_a', 'du_secs', '2025-01-12', '2025-01-12');

-- a span across the end of January: each period gets its part; the result is February's
SELECT total, period_start, period_end
  FROM usage_billing.record_duration('du_a', 'du_hours', '2025-01-31 22:00', '2025-02-01 03:00', 'night-1');
SELECT meter, period_start, total FROM usage_billing.usage_aggregates
 WHERE customer_id = 'du_a' AND meter = 'du_hours' ORDER BY period_start;
-- parts are rounded on the running total: they add up to the whole span rounded once
SELECT total FROM usage_billing.record_duration('du_a', 'du_mins', '2025-01-31 23:59:59.5', '2025-02-01 00:00:00.5', 'edge-1');
SELECT period_start, amount, occurred_at, idempotency_key FROM usage_billing.usage_events
 WHERE customer_id = 'du_a' AND idempotency_key LIKE 'edge-1%' OR idempotency_key LIKE 'night-1%'
 ORDER BY event_id;
-- across three periods
SELECT total, period_start FROM usage_billing.record_duration('du_a', 'du_secs', '2025-02-28 23:59:59', '2025-04-01 00:00:01');
SELECT period_start, amount FROM usage_billing.usage_events
 WHERE customer_id = 'du_a' AND meter = 'du_secs' AND occurred_at >= '2025-02-01' ORDER BY event_id;

-- a retry of a keyed span is a duplicate, part by part; another span with the key is a conflict
SELECT total, duplicate FROM usage_billing.record_duration('du_a', 'du_hours', '2025-01-31 22:00', '2025-02-01 03:00', 'night-1');
SELECT total, duplicate FROM usage_billing.record_duration('du_a', 'du_hours', '2025-01-31 22:00', '2025-02-01 04:00', 'night-1');
\echo :LAST_ERROR_SQLSTATE

-- refused: negative spans, spans in the future, NULLs, meters that are not duration meters,
-- parts above max_amount
SELECT * FROM usage_billing.record_duration('du_a', 'du_hours', '2025-01-10 10:00', '2025-01-10 09:00');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.record_duration('du_a', 'du_hours', '2025-01-10 10:00', '2999-01-01');
SELECT * FROM usage_billing.record_duration('du_a', 'du_hours', NULL, '2025-01-10 09:00');
SELECT * FROM usage_billing.record_duration('du_a', 'du_hours', '2025-01-10', 'infinity');
SELECT * FROM usage_billing.record_duration('du_a', 'du_plain', '2025-01-10 08:00', '2025-01-10 09:00');
SELECT * FROM usage_billing.record_duration('du_a', 'nope', '2025-01-10 08:00', '2025-01-10 09:00');
SELECT * FROM usage_billing.record_duration('nobody', 'du_hours', '2025-01-10 08:00', '2025-01-10 09:00');
SELECT * FROM usage_billing.record_duration('du_a', 'du_hours', '2025-01-10 00:00', '2025-01-12 00:00');
SELECT meter, count(*), sum(amount) FROM usage_billing.usage_events
 WHERE customer_id = 'du_a' GROUP BY meter ORDER BY meter;
-- priced like any sum meter: 5 hours included, 2 per hour beyond (January: 6 hours)
SELECT line, meter, quantity, amount FROM usage_billing.preview_invoice('du_a', '2025-01-15') ORDER BY line, meter;
