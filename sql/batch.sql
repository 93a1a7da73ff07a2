-- increment_usage_batch: all or nothing, same rules as increment_usage
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

SELECT usage_billing.create_meter('bat_calls', 'sum');
SELECT usage_billing.create_meter('bat_users', 'unique_count', value_property => 'user');
SELECT usage_billing.create_plan('bat_plan', 0);
SELECT usage_billing.set_plan_limit('bat_plan', 'bat_calls', included => 100, hard_cap => true);
SELECT usage_billing.upsert_customer('bat_a', 'bat_plan', '2025-01-01 00:00+00');
SELECT usage_billing.upsert_customer('bat_b', 'bat_plan', '2025-01-01 00:00+00');

SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "bat_a", "meter": "bat_calls", "amount": 10, "idempotency_key": "b1", "occurred_at": "2025-01-02T00:00:00Z"},
  {"customer_id": "bat_b", "meter": "bat_calls", "amount": "2.5", "occurred_at": "2025-01-02T00:00:00Z"},
  {"customer_id": "bat_a", "meter": "bat_calls", "idempotency_key": "b2", "occurred_at": "2025-01-03T00:00:00Z"},
  {"customer_id": "bat_a", "meter": "bat_calls", "amount": 10, "idempotency_key": "b1", "occurred_at": "2025-01-02T00:00:00Z"},
  {"customer_id": "bat_a", "meter": "bat_users", "properties": {"user": "u1"}, "occurred_at": "2025-01-03T00:00:00Z"},
  {"customer_id": "bat_a", "meter": "bat_users", "properties": {"user": "u1"}, "occurred_at": "2025-01-04T00:00:00Z"}
]');
SELECT customer_id, meter, total, event_count FROM usage_billing.usage_aggregates
 WHERE customer_id LIKE 'bat_%' ORDER BY 1, 2;
-- repeating the batch's keys: all duplicates
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "bat_a", "meter": "bat_calls", "amount": 10, "idempotency_key": "b1"},
  {"customer_id": "bat_a", "meter": "bat_calls", "amount": 10, "idempotency_key": "b2"}
]');
SELECT * FROM usage_billing.increment_usage_batch('[]');

-- all or nothing: a hard cap breach in the last event records nothing
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "bat_b", "meter": "bat_calls", "amount": 1, "occurred_at": "2025-01-05T00:00:00Z"},
  {"customer_id": "bat_a", "meter": "bat_calls", "amount": 80, "occurred_at": "2025-01-05T00:00:00Z"},
  {"customer_id": "bat_a", "meter": "bat_calls", "amount": 10, "occurred_at": "2025-01-05T00:00:00Z"}
]');
-- and so does any other error
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "bat_b", "meter": "bat_calls", "amount": 1},
  {"customer_id": "nobody", "meter": "bat_calls", "amount": 1}
]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "bat_a", "meter": "bat_calls", "amount": null}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "bat_a", "meter": "bat_calls", "occurred_at": null}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "bat_a", "meter": "bat_calls", "amount": "abc"}]');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": 5, "meter": "bat_calls"}]');
SELECT * FROM usage_billing.increment_usage_batch('[1]');
SELECT * FROM usage_billing.increment_usage_batch('{"customer_id": "bat_a"}');
SELECT * FROM usage_billing.increment_usage_batch(NULL);
SELECT customer_id, meter, total, event_count FROM usage_billing.usage_aggregates
 WHERE customer_id LIKE 'bat_%' ORDER BY 1, 2;
SELECT count(*) FROM usage_billing.usage_events WHERE customer_id LIKE 'bat_%';
