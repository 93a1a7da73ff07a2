-- Exact idempotency: a repeated (customer_id, idempotency_key) is a duplicate only when it
-- repeats the original's meter, amount, occurred_at (when given) and properties; otherwise it
-- is refused with 23505 naming what differs, and nothing is recorded.  Single calls (both
-- write paths), unique_count meters, batches, repeats inside a batch.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

SELECT usage_billing.create_meter('id_calls', 'sum');
SELECT usage_billing.create_meter('id_storage', 'sum');
SELECT usage_billing.create_meter('id_logins', 'count');
SELECT usage_billing.create_meter('id_users', 'unique_count', value_property => 'user');
SELECT usage_billing.create_plan('id_plan', 0);
SELECT usage_billing.set_plan_limit('id_plan', 'id_calls', included => 100);
SELECT usage_billing.upsert_customer('id_a', 'id_plan', '2025-01-01 00:00+00');

CREATE FUNCTION pg_temp.ledger(c text) RETURNS TABLE (meter text, events bigint, amount numeric)
LANGUAGE sql AS $$
    SELECT e.meter, count(*), sum(e.amount) FROM usage_billing.usage_events e
     WHERE e.customer_id = c GROUP BY e.meter ORDER BY e.meter
$$;

-- the original, then an exact repeat: a duplicate with the state of its meter and period
SELECT * FROM usage_billing.increment_usage('id_a', 'id_calls', 5, 'k1', '2025-01-10', '{"region": "eu"}');
SELECT * FROM usage_billing.increment_usage('id_a', 'id_storage', 7, occurred_at => '2025-02-10');
SELECT * FROM usage_billing.increment_usage('id_a', 'id_calls', 5, 'k1', '2025-01-10', '{"region": "eu"}');
-- the same numbers written otherwise, properties in another order, occurred_at left out
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_calls', 5.000, 'k1', '2025-01-10 01:00+01', '{"region": "eu"}');
SELECT total, duplicate, period_start FROM usage_billing.increment_usage('id_a', 'id_calls', 5, 'k1', properties => '{"region": "eu"}');

-- the same key with other parameters: 23505, naming what differs
SELECT * FROM usage_billing.increment_usage('id_a', 'id_calls', 6, 'k1', '2025-01-10', '{"region": "eu"}');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.increment_usage('id_a', 'id_storage', 5, 'k1', '2025-01-10', '{"region": "eu"}');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.increment_usage('id_a', 'id_calls', 5, 'k1', '2025-02-10', '{"region": "eu"}');
SELECT * FROM usage_billing.increment_usage('id_a', 'id_calls', 5, 'k1', '2025-01-10', '{"region": "us"}');
SELECT * FROM usage_billing.increment_usage('id_a', 'id_calls', 5, 'k1', '2025-01-10');
SELECT * FROM usage_billing.increment_usage('id_a', 'id_storage', 1, 'k1');
-- the same when the key takes escrow slots
SET usage_billing.hot_key_slots = always;
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_calls', 5, 'k1', '2025-01-10', '{"region": "eu"}');
SELECT * FROM usage_billing.increment_usage('id_a', 'id_storage', 5, 'k1', '2025-01-10', '{"region": "eu"}');
RESET usage_billing.hot_key_slots;
-- nothing of it was recorded: the storage meter still has its one event
SELECT * FROM pg_temp.ledger('id_a');

-- count meters: NULL and 1 are the same amount
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_logins', NULL, 'login-1', '2025-01-11');
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_logins', 1, 'login-1', '2025-01-11');
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_logins', idempotency_key => 'login-1');

-- unique_count meters (their own write path): the property is part of the event
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_users', 1, 'seat-1', '2025-01-12', '{"user": "u1"}');
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_users', 1, 'seat-1', '2025-01-12', '{"user": "u1"}');
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_users', 1, 'seat-1', '2025-01-12', '{"user": "u2"}');

-- a repeat that would now be refused is still answered as the duplicate it is; with other
-- parameters it is a conflict first
SELECT usage_billing.set_customer_status('id_a', 'suspended');
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_calls', 5, 'k1', '2025-01-10', '{"region": "eu"}');
SELECT total, duplicate FROM usage_billing.increment_usage('id_a', 'id_calls', 50, 'k1', '2025-01-10', '{"region": "eu"}');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_customer_status('id_a', 'active');

-- batches: a key recorded before is a duplicate when the event repeats it ...
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "id_a", "meter": "id_calls", "amount": 5, "idempotency_key": "k1",
   "occurred_at": "2025-01-10T00:00:00Z", "properties": {"region": "eu"}},
  {"customer_id": "id_a", "meter": "id_calls", "amount": 1, "idempotency_key": "b1", "occurred_at": "2025-01-13T00:00:00Z"}]');
-- ... and a conflict otherwise, which records nothing of the batch
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "id_a", "meter": "id_calls", "amount": 1, "idempotency_key": "b2", "occurred_at": "2025-01-13T00:00:00Z"},
  {"customer_id": "id_a", "meter": "id_storage", "amount": 1, "idempotency_key": "b1", "occurred_at": "2025-01-13T00:00:00Z"}]');
\echo :LAST_ERROR_SQLSTATE
SET usage_billing.hot_key_slots = always;
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "id_a", "meter": "id_calls", "amount": 1, "idempotency_key": "b2", "occurred_at": "2025-01-13T00:00:00Z"},
  {"customer_id": "id_a", "meter": "id_calls", "amount": 2, "idempotency_key": "b1", "occurred_at": "2025-01-13T00:00:00Z"}]');
RESET usage_billing.hot_key_slots;
-- identical repeats inside one batch count once; a conflicting repeat refuses the batch
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "id_a", "meter": "id_calls", "amount": 2, "idempotency_key": "b3", "occurred_at": "2025-01-14T00:00:00Z"},
  {"customer_id": "id_a", "meter": "id_calls", "amount": 2, "idempotency_key": "b3", "occurred_at": "2025-01-14T00:00:00Z"},
  {"customer_id": "id_a", "meter": "id_calls", "amount": 2, "idempotency_key": "b3"}]');
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "id_a", "meter": "id_calls", "amount": 2, "idempotency_key": "b4", "occurred_at": "2025-01-14T00:00:00Z"},
  {"customer_id": "id_a", "meter": "id_storage", "amount": 2, "idempotency_key": "b4", "occurred_at": "2025-01-14T00:00:00Z"}]');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "id_a", "meter": "id_users", "idempotency_key": "b5", "properties": {"user": "u3"}, "occurred_at": "2025-01-14T00:00:00Z"},
  {"customer_id": "id_a", "meter": "id_users", "idempotency_key": "b5", "properties": {"user": "u4"}, "occurred_at": "2025-01-14T00:00:00Z"}]');
-- the same key for two customers is two events
SELECT usage_billing.upsert_customer('id_b', 'id_plan', '2025-01-01 00:00+00');
SELECT total, duplicate FROM usage_billing.increment_usage('id_b', 'id_storage', 9, 'k1', '2025-01-10');
SELECT * FROM pg_temp.ledger('id_a');
SELECT * FROM pg_temp.ledger('id_b');
SELECT meter, period_start, total, event_count FROM usage_billing.usage_aggregates
 WHERE customer_id IN ('id_a', 'id_b') ORDER BY customer_id, meter, period_start;
