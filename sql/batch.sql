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
  {"customer_id": "bat_a", "meter": "bat_calls", "idempotency_key": "b2"}
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

-- every aggregation in bulk gives what single calls give
SELECT usage_billing.create_meter('bat_count', 'count');
SELECT usage_billing.create_meter('bat_max', 'max');
SELECT usage_billing.create_meter('bat_last', 'last');
SELECT usage_billing.upsert_customer('bat_bulk', 'bat_plan', '2025-01-01 00:00+00');
SELECT usage_billing.upsert_customer('bat_single', 'bat_plan', '2025-01-01 00:00+00');
CREATE TEMP TABLE bat_events AS
-- an event with a key repeats the first event of that key exactly (s: the event it repeats)
SELECT g AS position,
       (ARRAY['bat_calls', 'bat_count', 'bat_max', 'bat_last', 'bat_users'])[1 + s % 5] AS meter,
       CASE WHEN s % 5 = 1 THEN 1
            ELSE (s * 7 % 13) - CASE WHEN s % 5 IN (2, 3) THEN 4 ELSE 0 END END AS amount,
       CASE WHEN s % 4 = 0 THEN 'k' || (s % 24) END AS idempotency_key,
       timestamptz '2025-01-20 00:00+00' + (s * 37 % 50) * interval '1 day' AS occurred_at,
       jsonb_build_object('user', 'u' || (s % 6)) AS properties
  FROM generate_series(1, 120) g,
       LATERAL (SELECT CASE WHEN g % 4 = 0 THEN (g - 1) % 24 + 1 ELSE g END AS s) x;
SELECT * FROM usage_billing.increment_usage_batch(
    (SELECT jsonb_agg(jsonb_build_object('customer_id', 'bat_bulk', 'meter', meter, 'amount', amount,
                                         'idempotency_key', idempotency_key, 'occurred_at', occurred_at,
                                         'properties', properties) ORDER BY position)
       FROM bat_events));
SELECT count(*) FILTER (WHERE NOT r.duplicate) AS accepted, count(*) FILTER (WHERE r.duplicate) AS duplicates
  FROM bat_events e,
       LATERAL usage_billing.increment_usage('bat_single', e.meter, e.amount, e.idempotency_key,
                                             e.occurred_at, e.properties) r;
SELECT b.meter, b.period_start, b.total, b.event_count, b.first_usage, b.last_usage,
       (b.total, b.event_count, b.first_usage, b.last_usage)
         IS NOT DISTINCT FROM (s.total, s.event_count, s.first_usage, s.last_usage) AS same_as_single
  FROM usage_billing.usage_aggregates b
  FULL JOIN usage_billing.usage_aggregates s
    ON s.customer_id = 'bat_single' AND s.meter = b.meter AND s.period_start = b.period_start
 WHERE b.customer_id = 'bat_bulk'
 ORDER BY 1, 2;
SELECT (SELECT count(*) FROM usage_billing.usage_events WHERE customer_id = 'bat_bulk') AS bulk_ledger,
       (SELECT count(*) FROM usage_billing.usage_events WHERE customer_id = 'bat_single') AS single_ledger;
