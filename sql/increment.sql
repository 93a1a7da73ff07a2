-- increment_usage: aggregations, idempotency, periods, hard caps, errors
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

SELECT usage_billing.create_meter('inc_calls', 'sum', 'calls');
SELECT usage_billing.create_meter('inc_logins', 'count');
SELECT usage_billing.create_meter('inc_peak', 'max', 'GB');
SELECT usage_billing.create_meter('inc_seats', 'last', 'seats');
SELECT usage_billing.create_meter('inc_users', 'unique_count', value_property => 'user_id');
SELECT usage_billing.create_plan('inc_basic', 10);
SELECT usage_billing.set_plan_limit('inc_basic', 'inc_calls', included => 100);
SELECT usage_billing.set_plan_limit('inc_basic', 'inc_peak', included => 50, hard_cap => true);
SELECT usage_billing.create_plan('inc_capped', 0);
SELECT usage_billing.set_plan_limit('inc_capped', 'inc_calls', included => 10, hard_cap => true);
SELECT usage_billing.upsert_customer('inc_a', 'inc_basic', '2025-01-31 00:00+00');

-- sum: statuses at the edges (included 100, soft 0.8)
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 79, occurred_at => '2025-02-10');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 1, occurred_at => '2025-02-10');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 20, occurred_at => '2025-02-10');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 0.5, occurred_at => '2025-02-10');
-- month-end clamping: Feb 28 .. Mar 31 for an anchor on Jan 31
SELECT total, period_start, period_end
  FROM usage_billing.increment_usage('inc_a', 'inc_calls', 1, occurred_at => '2025-03-30 23:59:59');
SELECT total, period_start, period_end
  FROM usage_billing.increment_usage('inc_a', 'inc_calls', 1, occurred_at => '2025-03-31 00:00');
-- a period before the anchor
SELECT total, period_start, period_end
  FROM usage_billing.increment_usage('inc_a', 'inc_calls', 3, occurred_at => '2024-12-31 12:00');

-- count: one per event; an amount other than NULL or 1 is refused
SELECT total, status FROM usage_billing.increment_usage('inc_a', 'inc_logins', 5, occurred_at => '2025-02-10');
SELECT total, status FROM usage_billing.increment_usage('inc_a', 'inc_logins', 0, occurred_at => '2025-02-11');
SELECT total, status FROM usage_billing.increment_usage('inc_a', 'inc_logins', NULL, occurred_at => '2025-02-10');
SELECT total, status FROM usage_billing.increment_usage('inc_a', 'inc_logins', 1, occurred_at => '2025-02-11');

-- max keeps the largest; last keeps the latest occurred_at (not the latest call)
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_peak', 20, occurred_at => '2025-02-10');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_peak', 12, occurred_at => '2025-02-11');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_peak', -3, occurred_at => '2025-02-12');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_seats', 7, occurred_at => '2025-02-10 10:00');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_seats', 9, occurred_at => '2025-02-10 12:00');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_seats', 4, occurred_at => '2025-02-10 11:00');

-- unique_count counts distinct property values
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_users', properties => '{"user_id": "u1"}', occurred_at => '2025-02-10');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_users', properties => '{"user_id": "u2"}', occurred_at => '2025-02-10');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_users', properties => '{"user_id": "u1"}', occurred_at => '2025-02-11');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_users', properties => '{"user_id": 1}', occurred_at => '2025-02-11');
SELECT meter, period_start, total, event_count, first_usage, last_usage
  FROM usage_billing.usage_aggregates WHERE customer_id = 'inc_a' ORDER BY meter, period_start;

-- idempotency: the second call records nothing and reports the original meter and period
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 2, 'key-1', '2025-02-15');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 2, 'key-1', '2025-02-15');
-- the same key with another meter, amount and time: refused (23505), nothing recorded
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_logins', 999, 'key-1', '2030-01-01');
-- a duplicate is reported even when the repeat would now be refused (here: too late)
SET usage_billing.late_event_grace = 0;
SELECT duplicate, total FROM usage_billing.increment_usage('inc_a', 'inc_calls', 2, 'key-1', '2025-02-15');
RESET usage_billing.late_event_grace;
SELECT count(*) FROM usage_billing.usage_events WHERE customer_id = 'inc_a' AND idempotency_key = 'key-1';

-- hard cap on a max meter: the aggregate after the call decides
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_peak', 50, occurred_at => '2025-02-13');
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_peak', 51, occurred_at => '2025-02-13');

-- hard cap on a sum meter: refused exactly past the boundary, nothing recorded
SELECT usage_billing.upsert_customer('inc_b', 'inc_capped', '2025-01-01 00:00+00');
SELECT total, remaining, status FROM usage_billing.increment_usage('inc_b', 'inc_calls', 9, occurred_at => '2025-01-05');
SELECT total, remaining, status FROM usage_billing.increment_usage('inc_b', 'inc_calls', 2, 'cap-1', occurred_at => '2025-01-05');
SELECT total, remaining, status FROM usage_billing.increment_usage('inc_b', 'inc_calls', 1, occurred_at => '2025-01-05');
SELECT total, remaining, status FROM usage_billing.increment_usage('inc_b', 'inc_calls', 1, occurred_at => '2025-01-05');
SELECT count(*) AS events, sum(amount) FROM usage_billing.usage_events WHERE customer_id = 'inc_b';
-- the refused key was not consumed
SELECT count(*) FROM usage_billing.usage_events WHERE idempotency_key = 'cap-1';
-- an upgrade lifts the cap at once; usage already recorded stays
SELECT usage_billing.upsert_customer('inc_b', 'inc_basic');
SELECT total, included, status FROM usage_billing.increment_usage('inc_b', 'inc_calls', 5, occurred_at => '2025-01-05');
-- a customer override with a hard cap
SELECT usage_billing.set_customer_limit('inc_b', 'inc_calls', 16, true);
SELECT total, included, status FROM usage_billing.increment_usage('inc_b', 'inc_calls', 1, occurred_at => '2025-01-05');
SELECT total, included, status FROM usage_billing.increment_usage('inc_b', 'inc_calls', 1, occurred_at => '2025-01-05');
SELECT usage_billing.set_customer_limit('inc_b', 'inc_calls', NULL);
SELECT total, included, status FROM usage_billing.increment_usage('inc_b', 'inc_calls', 1, occurred_at => '2025-01-05');

-- errors
SELECT * FROM usage_billing.increment_usage('nobody', 'inc_calls');
SELECT * FROM usage_billing.increment_usage('inc_a', 'nothing');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', NULL);
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 'NaN');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 'Infinity');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', -1);
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_logins', -1);
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_users', -1, properties => '{"user_id": "x"}');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', occurred_at => NULL);
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', occurred_at => 'infinity');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', properties => '[1, 2]');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', properties => '"text"');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_users');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_users', properties => '{"user_id": null}');
SELECT * FROM usage_billing.increment_usage('', 'inc_calls');
SELECT * FROM usage_billing.increment_usage(NULL, 'inc_calls');
SELECT * FROM usage_billing.increment_usage('inc_a', repeat('m', 201));
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 1, repeat('k', 256));
SELECT usage_billing.set_customer_status('inc_a', 'suspended');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls');
SELECT usage_billing.set_customer_status('inc_a', 'canceled');
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls');
SELECT usage_billing.set_customer_status('inc_a', 'active');
-- max and last accept negative amounts
SELECT total FROM usage_billing.increment_usage('inc_a', 'inc_seats', -2, occurred_at => '2025-02-20');

-- nothing half-written: the error rolled back every failed call
SELECT meter, count(*), sum(amount) FROM usage_billing.usage_events
 WHERE customer_id = 'inc_a' GROUP BY meter ORDER BY meter;
SELECT a.meter, a.period_start, a.event_count,
       (SELECT count(*) FROM usage_billing.usage_events e
         WHERE e.customer_id = a.customer_id AND e.meter = a.meter AND e.period_start = a.period_start) AS ledger_rows
  FROM usage_billing.usage_aggregates a WHERE customer_id = 'inc_a' ORDER BY 1, 2;

-- late events
SET usage_billing.late_event_grace = '1h';
SELECT * FROM usage_billing.increment_usage('inc_a', 'inc_calls', 1, occurred_at => '2025-02-10');
SET usage_billing.late_event_action = 'current_period';
SELECT total >= 1 AS ok, period_start <= now() AND period_end > now() AS current_period
  FROM usage_billing.increment_usage('inc_a', 'inc_calls', 1, occurred_at => '2025-02-10');
RESET usage_billing.late_event_grace;
RESET usage_billing.late_event_action;

-- with usage_billing.direct_reads off (for Citus) every read goes through SQL: same answers
SET usage_billing.direct_reads = off;
SELECT usage_billing.upsert_customer('inc_sql', 'inc_capped', '2025-01-01 00:00+00');
SELECT usage_billing.set_customer_limit('inc_sql', 'inc_calls', 12);
SELECT total, included, remaining, status
  FROM usage_billing.increment_usage('inc_sql', 'inc_calls', 11, occurred_at => now());
SELECT allowed, current, included, remaining, status, reason
  FROM usage_billing.check_limit('inc_sql', 'inc_calls', 2);
\set VERBOSITY terse
SELECT * FROM usage_billing.increment_usage('inc_sql', 'inc_calls', 2, occurred_at => now());
\set VERBOSITY default
SELECT * FROM usage_billing.increment_usage('inc_sql', 'nothing');
SELECT * FROM usage_billing.increment_usage('nobody_sql', 'inc_calls');
RESET usage_billing.direct_reads;
SELECT allowed, current, included, remaining, status, reason
  FROM usage_billing.check_limit('inc_sql', 'inc_calls', 1);
