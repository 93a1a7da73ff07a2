-- alerts: soft_limit / limit_reached crossings, hard_cap_blocked, acknowledge_alert
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
\set VERBOSITY default

SELECT usage_billing.create_meter('al_requests', 'sum', 'requests');
SELECT usage_billing.create_meter('al_peak', 'max', 'GB');
SELECT usage_billing.create_meter('al_quiet', 'sum');
SELECT usage_billing.create_meter('al_zero', 'count');
SELECT usage_billing.create_plan('al_starter', 29);
-- the seeds' Starter plan: 100 requests, warned at 90 %
SELECT usage_billing.set_plan_limit('al_starter', 'al_requests', included => 100, soft_threshold => 0.9);
SELECT usage_billing.set_plan_limit('al_starter', 'al_peak', included => 10);
SELECT usage_billing.set_plan_limit('al_starter', 'al_quiet', included => 10, soft_threshold => NULL);
SELECT usage_billing.set_plan_limit('al_starter', 'al_zero', included => 0);
SELECT usage_billing.create_plan('al_capped', 0);
SELECT usage_billing.set_plan_limit('al_capped', 'al_requests', included => 10, hard_cap => true);
SELECT usage_billing.upsert_customer('al_a', 'al_starter', '2025-01-01 00:00+00');
SELECT usage_billing.upsert_customer('al_b', 'al_starter', '2025-01-01 00:00+00');
SELECT usage_billing.upsert_customer('al_c', 'al_capped', '2025-01-01 00:00+00');

-- notifications go to a file whose server PIDs are masked when it is shown
\o results/alerts_notify.txt
LISTEN usage_billing_alerts;

-- 89 of 100: below 90 %, no alert
SELECT total, status FROM usage_billing.increment_usage('al_a', 'al_requests', 89, occurred_at => '2025-01-05');
-- 90 of 100: exactly one soft_limit alert and one notification
SELECT total, status FROM usage_billing.increment_usage('al_a', 'al_requests', 1, occurred_at => '2025-01-06');
-- 95, 100: still one alert; 100 is not past the limit
SELECT total, status FROM usage_billing.increment_usage('al_a', 'al_requests', 5, occurred_at => '2025-01-07');
SELECT total, status FROM usage_billing.increment_usage('al_a', 'al_requests', 5, occurred_at => '2025-01-07');
-- 100.5: passes the limit
SELECT total, status FROM usage_billing.increment_usage('al_a', 'al_requests', 0.5, occurred_at => '2025-01-08');
SELECT total, status FROM usage_billing.increment_usage('al_a', 'al_requests', 50, occurred_at => '2025-01-08');
\o
\! sed -E 's/PID [0-9]+/PID N/' results/alerts_notify.txt
SELECT customer_id, meter, period_start, kind, value, included, acknowledged_at
  FROM usage_billing.alerts WHERE customer_id = 'al_a' ORDER BY created_at, kind;

\o results/alerts_notify.txt
-- one call may raise both, in one transaction with both notifications
SELECT total, status FROM usage_billing.increment_usage('al_b', 'al_requests', 120, occurred_at => '2025-01-05');
-- a rolled-back crossing leaves no alert and no notification
BEGIN;
SELECT total, status FROM usage_billing.increment_usage('al_a', 'al_requests', 95, occurred_at => '2025-02-03');
ROLLBACK;
-- the next period has its own alerts
SELECT total, status FROM usage_billing.increment_usage('al_a', 'al_requests', 90, 'al-feb-1', '2025-02-03');
-- a duplicate raises nothing
SELECT total, duplicate FROM usage_billing.increment_usage('al_a', 'al_requests', 90, 'al-feb-1', '2025-02-03');
\o
\! sed -E 's/PID [0-9]+/PID N/' results/alerts_notify.txt
SELECT customer_id, meter, period_start, kind, value, included
  FROM usage_billing.alerts WHERE customer_id IN ('al_a', 'al_b') ORDER BY customer_id, period_start, kind;

\o results/alerts_notify.txt
-- max: a smaller value does not cross; the alert's value is the new total
SELECT total, status FROM usage_billing.increment_usage('al_b', 'al_peak', 5, occurred_at => '2025-01-05');
SELECT total, status FROM usage_billing.increment_usage('al_b', 'al_peak', 3, occurred_at => '2025-01-05');
SELECT total, status FROM usage_billing.increment_usage('al_b', 'al_peak', 12, occurred_at => '2025-01-06');
-- soft_threshold NULL never warns, but passing the limit still alerts
SELECT total, status FROM usage_billing.increment_usage('al_b', 'al_quiet', 9.99, occurred_at => '2025-01-05');
SELECT total, status FROM usage_billing.increment_usage('al_b', 'al_quiet', 1, occurred_at => '2025-01-05');
-- included 0: no soft alert, limit_reached on the first event
SELECT total, status FROM usage_billing.increment_usage('al_b', 'al_zero', occurred_at => '2025-01-05');
\o
\! sed -E 's/PID [0-9]+/PID N/' results/alerts_notify.txt
SELECT meter, kind, value, included
  FROM usage_billing.alerts WHERE customer_id = 'al_b' AND meter <> 'al_requests' ORDER BY meter, kind;

-- hard cap: the refusal is recorded although its transaction fails, once per period
\o results/alerts_notify.txt
SELECT total, status FROM usage_billing.increment_usage('al_c', 'al_requests', 10, occurred_at => '2025-01-05');
\o
\! sed -E 's/PID [0-9]+/PID N/' results/alerts_notify.txt
SELECT total FROM usage_billing.increment_usage('al_c', 'al_requests', 1, occurred_at => '2025-01-06');
SELECT total FROM usage_billing.increment_usage('al_c', 'al_requests', 5, occurred_at => '2025-01-06');
-- visible at once, before anything flushed it
SELECT meter, period_start, kind, value, included, acknowledged_at
  FROM usage_billing.alerts WHERE customer_id = 'al_c' ORDER BY kind;
SELECT count(*) AS logged FROM usage_billing.alert_log WHERE customer_id = 'al_c' AND kind = 'hard_cap_blocked';
-- a flush in a transaction that rolls back keeps it pending
BEGIN;
SELECT usage_billing.flush_alerts() >= 1 AS flushed;
ROLLBACK;
SELECT count(*) AS pending FROM usage_billing.pending_alerts() WHERE customer_id = 'al_c';
\o results/alerts_notify.txt
SELECT usage_billing.flush_alerts() >= 1 AS flushed;
SELECT usage_billing.flush_alerts() AS flushed_again;
\o
\! sed -E 's/PID [0-9]+/PID N/' results/alerts_notify.txt
SELECT count(*) AS pending FROM usage_billing.pending_alerts() WHERE customer_id = 'al_c';
-- refused again in the same period: already known, nothing new
SELECT total FROM usage_billing.increment_usage('al_c', 'al_requests', 1, occurred_at => '2025-01-07');
SELECT count(*) AS pending FROM usage_billing.pending_alerts() WHERE customer_id = 'al_c';
SELECT meter, period_start, kind, value, included
  FROM usage_billing.alerts WHERE customer_id = 'al_c' ORDER BY kind;
-- a refusal in another period is a new alert, flushed by the next successful call
\o results/alerts_notify.txt
SELECT total FROM usage_billing.increment_usage('al_c', 'al_requests', 11, occurred_at => '2025-02-06');
SELECT total FROM usage_billing.increment_usage('al_c', 'al_requests', 1, occurred_at => '2025-02-06');
\o
\! sed -E 's/PID [0-9]+/PID N/' results/alerts_notify.txt
SELECT count(*) AS pending FROM usage_billing.pending_alerts() WHERE customer_id = 'al_c';
SELECT meter, period_start, kind, value, included
  FROM usage_billing.alert_log WHERE customer_id = 'al_c' ORDER BY period_start, kind;
-- batches alert like single calls, once per customer, meter and period; the value
-- is the total after the batch (the batch adds each group in one step)
\o results/alerts_notify.txt
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "al_b", "meter": "al_requests", "amount": 10, "occurred_at": "2025-03-02T00:00:00Z"},
  {"customer_id": "al_b", "meter": "al_requests", "amount": 85, "occurred_at": "2025-03-03T00:00:00Z"},
  {"customer_id": "al_b", "meter": "al_requests", "amount": 1, "occurred_at": "2025-03-04T00:00:00Z"},
  {"customer_id": "al_a", "meter": "al_requests", "amount": 200, "occurred_at": "2025-03-04T00:00:00Z"}]');
\o
\! sed -E 's/PID [0-9]+/PID N/' results/alerts_notify.txt
SELECT customer_id, kind, value FROM usage_billing.alerts
 WHERE period_start = '2025-03-01' ORDER BY customer_id, kind;
-- a batch refused at a hard cap records nothing but the refusal
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "al_c", "meter": "al_requests", "amount": 4, "occurred_at": "2025-03-02T00:00:00Z"},
  {"customer_id": "al_c", "meter": "al_requests", "amount": 7, "occurred_at": "2025-03-03T00:00:00Z"}]');
SELECT kind, value FROM usage_billing.alerts
 WHERE customer_id = 'al_c' AND period_start = '2025-03-01' ORDER BY kind;
UNLISTEN *;

-- acknowledge_alert
SELECT usage_billing.acknowledge_alert('al_a', 'al_requests', '2025-01-01 00:00+00', 'soft_limit');
SELECT kind, acknowledged_at IS NOT NULL AS acknowledged
  FROM usage_billing.alerts WHERE customer_id = 'al_a' AND period_start = '2025-01-01' ORDER BY kind;
-- acknowledging twice keeps the first time
CREATE TEMP TABLE al_ack AS
  SELECT acknowledged_at FROM usage_billing.alert_log
   WHERE customer_id = 'al_a' AND period_start = '2025-01-01' AND kind = 'soft_limit';
SELECT usage_billing.acknowledge_alert('al_a', 'al_requests', '2025-01-01 00:00+00', 'soft_limit');
SELECT l.acknowledged_at = a.acknowledged_at AS unchanged
  FROM usage_billing.alert_log l, al_ack a
 WHERE l.customer_id = 'al_a' AND l.period_start = '2025-01-01' AND l.kind = 'soft_limit';
-- unknown alerts: P0002
SELECT usage_billing.acknowledge_alert('al_a', 'al_requests', '2025-03-01 00:00+00', 'soft_limit');
SELECT usage_billing.acknowledge_alert('al_a', 'al_requests', '2025-01-01 00:00+00', 'hard_cap_blocked');
SELECT usage_billing.acknowledge_alert('nobody', 'al_requests', '2025-01-01 00:00+00', 'soft_limit');
SELECT usage_billing.acknowledge_alert('al_a', 'al_requests', '2025-01-01 00:00+00', 'bogus');
