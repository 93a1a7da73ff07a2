-- Strict input: per-meter decimals and max_amount, count meters, occurred_at windows, batch
-- keys, Stripe customer ids, contradictory limits, corrections without a reason.  Every
-- refusal is 22023 with a detail naming the field and the limit, and records nothing.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

-- the built-in defaults: 35 days of late events, 5 minutes ahead (the tests' config widens the grace)
SELECT name, boot_val, unit FROM pg_settings
 WHERE name IN ('usage_billing.late_event_grace', 'usage_billing.max_future_skew') ORDER BY name;

SELECT usage_billing.create_meter('si_calls', 'sum');
SELECT usage_billing.create_meter('si_gb', 'sum', 'GB', decimals => 2, max_amount => 100);
SELECT usage_billing.create_meter('si_whole', 'sum', decimals => 0);
SELECT usage_billing.create_meter('si_logins', 'count');
SELECT usage_billing.create_meter('si_peak', 'max');
SELECT meter, decimals, max_amount FROM usage_billing.meters WHERE meter LIKE 'si\_%' ORDER BY meter;
SELECT usage_billing.create_plan('si_plan', 0);
SELECT usage_billing.upsert_customer('si_a', 'si_plan');

-- amounts: too large, too many decimals, infinitely many digits
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 1e30);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 1e1000);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 1e-20);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 0.0000001);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_gb', 100.001);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_gb', 100.01);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_whole', 1.5);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_peak', -1e13);
-- at the limits: accepted; zeros beyond the decimals are dropped, so totals keep the meter's decimals
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 1e12);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 0.000001);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_gb', 100.00);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_gb', 1.50000000000000000000);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_whole', 2.000);
SELECT meter, amount FROM usage_billing.usage_events WHERE customer_id = 'si_a' ORDER BY event_id;

-- count meters: NULL or 1, nothing else
SELECT total FROM usage_billing.increment_usage('si_a', 'si_logins', 5);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_logins', 0);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_logins', 1.5);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_logins', NULL);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_logins', 1);
SELECT total FROM usage_billing.increment_usage('si_a', 'si_logins');
SELECT amount FROM usage_billing.usage_events WHERE customer_id = 'si_a' AND meter = 'si_logins';

-- occurred_at: at most 5 minutes ahead of now()
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 1, occurred_at => '2999-01-01');
\set VERBOSITY terse
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 1, occurred_at => now() + interval '6 minutes');
SELECT total > 0 FROM usage_billing.increment_usage('si_a', 'si_calls', 1, occurred_at => now() + interval '4 minutes');
SET usage_billing.max_future_skew = '1h';
SELECT total > 0 FROM usage_billing.increment_usage('si_a', 'si_calls', 1, occurred_at => now() + interval '30 minutes');
RESET usage_billing.max_future_skew;
\set VERBOSITY default

-- late events: the grace Stripe has (35 days after the period's end); -1 takes any past period
SET usage_billing.late_event_grace = '35d';
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 1, occurred_at => '1900-01-01');
\set VERBOSITY terse
SELECT total > 0 FROM usage_billing.increment_usage('si_a', 'si_calls', 1,
       occurred_at => date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - interval '20 days');
SELECT total FROM usage_billing.increment_usage('si_a', 'si_calls', 1,
       occurred_at => date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - interval '40 days');
\set VERBOSITY default
SET usage_billing.late_event_grace = -1;
SELECT period_start FROM usage_billing.increment_usage('si_a', 'si_calls', 1, occurred_at => '1900-01-01');
RESET usage_billing.late_event_grace;

-- nothing of the refusals above was recorded
SELECT meter, count(*), sum(amount) FROM usage_billing.usage_events
 WHERE customer_id = 'si_a' AND occurred_at < '2999-01-01' GROUP BY meter ORDER BY meter;

-- batches: unknown keys, missing keys, non-objects, bad values; nothing of the batch is recorded
SELECT * FROM usage_billing.increment_usage_batch(
  '[{"customer_id": "si_a", "meter": "si_calls", "amount": 2},
    {"customer_id": "si_a", "meter": "si_calls", "amout": 5}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "si_a", "amount": 2}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"meter": "si_calls"}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": null, "meter": "si_calls"}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "si_a", "meter": "si_calls"}, "x"]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "si_a", "meter": "si_calls", "amount": "abc"}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "si_a", "meter": "si_calls", "occurred_at": "soon"}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "si_a", "meter": "si_calls", "properties": [1]}]');
SELECT * FROM usage_billing.increment_usage_batch(
  '[{"customer_id": "si_a", "meter": "si_calls"},
    {"customer_id": "si_a", "meter": "si_logins", "amount": 5}]');
SELECT * FROM usage_billing.increment_usage_batch(
  '[{"customer_id": "si_a", "meter": "si_calls"},
    {"customer_id": "si_a", "meter": "si_calls", "amount": 1e30}]');
SELECT * FROM usage_billing.increment_usage_batch(
  '[{"customer_id": "si_a", "meter": "si_calls", "occurred_at": "2999-01-01"}]');
SELECT meter, count(*) FROM usage_billing.usage_events
 WHERE customer_id = 'si_a' AND occurred_at < '2999-01-01' GROUP BY meter ORDER BY meter;
-- a valid batch: count meters take null or 1, amounts are normalized as in single calls
SELECT * FROM usage_billing.increment_usage_batch(
  '[{"customer_id": "si_a", "meter": "si_logins", "amount": null},
    {"customer_id": "si_a", "meter": "si_logins", "amount": 1},
    {"customer_id": "si_a", "meter": "si_gb", "amount": "2.5000"}]');
SELECT meter, amount FROM usage_billing.usage_events
 WHERE customer_id = 'si_a' AND meter IN ('si_logins', 'si_gb') ORDER BY event_id;

-- Stripe customer ids: 1 to 100 characters, no white space or control characters
SELECT usage_billing.upsert_customer('si_b', 'si_plan', stripe_customer_id => repeat('c', 124));
SELECT usage_billing.upsert_customer('si_b', 'si_plan', stripe_customer_id => '');
SELECT usage_billing.upsert_customer('si_b', 'si_plan', stripe_customer_id => '   ');
SELECT usage_billing.upsert_customer('si_b', 'si_plan', stripe_customer_id => 'cus_1 ');
SELECT usage_billing.upsert_customer('si_b', 'si_plan', stripe_customer_id => E'cus_\t1');
SELECT usage_billing.upsert_customer('si_b', 'si_plan', stripe_customer_id => 'cus_' || repeat('x', 96));
SELECT length(stripe_customer_id) FROM usage_billing.customers WHERE customer_id = 'si_b';
SELECT usage_billing.upsert_customer('si_b', NULL, stripe_customer_id => 'cus_' || repeat('x', 97));

-- contradictory catalog settings
SELECT usage_billing.set_plan_limit('si_plan', 'si_calls', included => 10, hard_cap => true, overage_price => 0.5);
SELECT count(*) FROM usage_billing.plan_limits WHERE plan = 'si_plan';
SELECT usage_billing.create_meter('si_bad', decimals => 21);
SELECT usage_billing.create_meter('si_bad', decimals => -1);
SELECT usage_billing.create_meter('si_bad', max_amount => 0);
SELECT usage_billing.create_meter('si_bad', max_amount => 'Infinity');
SELECT usage_billing.create_meter('si_bad', max_amount => NULL);

-- corrections: a void needs a reason; adjustments obey the meter's amount rules
SELECT total FROM usage_billing.increment_usage('si_a', 'si_gb', 3, 'si-void-1');
SELECT usage_billing.void_usage('si_a', 'si-void-1', NULL);
SELECT usage_billing.void_usage('si_a', 'si-void-1', '  ');
SELECT usage_billing.adjust_usage('si_a', 'si_gb', 0.001, 'typo');
SELECT usage_billing.adjust_usage('si_a', 'si_gb', -101, 'typo');
\set VERBOSITY terse
SELECT usage_billing.adjust_usage('si_a', 'si_gb', 1, 'typo', now() + interval '1 day');
\set VERBOSITY default
SELECT count(*) FROM usage_billing.usage_events WHERE customer_id = 'si_a' AND kind <> 'usage';
SELECT usage_billing.void_usage('si_a', 'si-void-1', 'recorded twice');
SELECT usage_billing.adjust_usage('si_a', 'si_gb', -0.50, 'partial refund');
SELECT kind, amount, reason FROM usage_billing.usage_events
 WHERE customer_id = 'si_a' AND kind <> 'usage' ORDER BY event_id;

-- data from before these rules (written here behind the functions' back) is listed, not
-- changed; so is the event recorded 30 minutes ahead above, under a widened max_future_skew
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount)
VALUES ('si_a', 'si_logins', '2025-01-01', '2025-01-02', 5),
       ('si_a', 'si_calls', '2025-01-01', '2025-01-02', 1e-20),
       ('si_a', 'si_gb', '2025-01-01', '2025-01-02', 1e30);
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount, kind)
VALUES ('si_a', 'si_calls', '2025-01-01', '2025-01-02', -1, 'void');
UPDATE usage_billing.customers SET stripe_customer_id = repeat('c', 124) WHERE customer_id = 'si_b';
INSERT INTO usage_billing.plan_limits (plan, meter, included, hard_cap, overage_price)
VALUES ('si_plan', 'si_peak', 10, true, 1);
SELECT object, customer_id, meter, field, problem FROM usage_billing.input_violations
 WHERE coalesce(customer_id, 'si_') LIKE 'si\_%' ORDER BY object, customer_id, meter, event_id, problem;
