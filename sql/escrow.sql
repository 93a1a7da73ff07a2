-- Escrow slots (escrow.c): with usage_billing.hot_key_slots = always, every sum and count key
-- takes usage through this backend's slot.  Totals, limits and alerts must be exactly those of
-- a single row; near a limit the slots are folded back and the decision is the single row's.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

SELECT usage_billing.create_meter('es_free', 'sum', 'calls');
SELECT usage_billing.create_meter('es_capped', 'sum', 'calls');
SELECT usage_billing.create_meter('es_count', 'count');
SELECT usage_billing.create_meter('es_peak', 'max', 'GB');
SELECT usage_billing.create_plan('es_plan', 0);
SELECT usage_billing.set_plan_limit('es_plan', 'es_capped', included => 100, hard_cap => true,
                                    soft_threshold => 0.8);
SELECT usage_billing.set_plan_limit('es_plan', 'es_count', included => 1000, overage_price => 1);
SELECT usage_billing.upsert_customer('es_a', 'es_plan', '2025-01-01 00:00+00');
SELECT usage_billing.upsert_customer('es_b', 'es_plan', '2025-01-01 00:00+00');

-- what the row holds, what the slots hold, what readers see and what the ledger says
CREATE FUNCTION pg_temp.state(c text, m text)
RETURNS TABLE (row_total numeric, slotted boolean, slots bigint, slot_total numeric,
               total numeric, event_count bigint, ledger numeric, ledger_events bigint)
LANGUAGE sql AS $$
    SELECT a.total, a.slotted,
           (SELECT count(*) FROM usage_billing.usage_aggregate_slots s
             WHERE s.customer_id = c AND s.meter = m),
           (SELECT sum(s.total) FROM usage_billing.usage_aggregate_slots s
             WHERE s.customer_id = c AND s.meter = m),
           t.total, t.event_count,
           (SELECT sum(CASE WHEN mm.aggregation = 'count' THEN 1 ELSE e.amount END)
              FROM usage_billing.usage_events e JOIN usage_billing.meters mm ON mm.meter = e.meter
             WHERE e.customer_id = c AND e.meter = m),
           (SELECT count(*) FROM usage_billing.usage_events e
             WHERE e.customer_id = c AND e.meter = m)
      FROM usage_billing.usage_aggregates a
      JOIN usage_billing.aggregate_totals t USING (customer_id, meter, period_start)
     WHERE a.customer_id = c AND a.meter = m
$$;

SET usage_billing.hot_key_slots = always;

-- 1. No limit: the first call takes the row and a slot with no budget limit; the rest go to
-- the slot.  Every call reports the key's total.
SELECT total, status FROM usage_billing.increment_usage('es_a', 'es_free', 2, NULL, '2025-01-03');
SELECT total FROM usage_billing.increment_usage('es_a', 'es_free', 3, NULL, '2025-01-02');
SELECT total FROM usage_billing.increment_usage('es_a', 'es_free', 5, NULL, '2025-01-09');
SELECT count(*) AS calls, max(r.total) AS last_total
  FROM generate_series(1, 10) g,
       LATERAL usage_billing.increment_usage('es_a', 'es_free', 1 + 0 * g, NULL, '2025-01-05') r;
SELECT * FROM pg_temp.state('es_a', 'es_free');
SELECT slot > 0 AS has_slot_number, budget, floor_total, budget_limit, first_usage, last_usage
  FROM usage_billing.usage_aggregate_slots WHERE customer_id = 'es_a' AND meter = 'es_free';
-- every reader sees the slots
SELECT meter, total, event_count, first_usage, last_usage
  FROM usage_billing.get_usage_summary('es_a', '2025-01-01', '2025-02-01') WHERE meter = 'es_free';
SELECT meter, total, event_count FROM usage_billing.aggregate_totals
 WHERE customer_id = 'es_a' AND meter = 'es_free';
-- the same idempotency key twice: the duplicate reports the total with the slots
SELECT total, duplicate FROM usage_billing.increment_usage('es_a', 'es_free', 4, 'es-k1', '2025-01-10');
SELECT total, duplicate FROM usage_billing.increment_usage('es_a', 'es_free', 4, 'es-k1', '2025-01-10');

-- 2. A hard cap at 100 with a soft threshold at 80: budgets stop short of 80, then of 100.
-- The soft_limit alert fires once, and the cap refuses exactly past 100.
SELECT total, status FROM usage_billing.increment_usage('es_a', 'es_capped', 10, NULL, '2025-01-04');
SELECT budget, floor_total, budget_limit FROM usage_billing.usage_aggregate_slots
 WHERE customer_id = 'es_a' AND meter = 'es_capped';
SELECT array_agg(r.total ORDER BY g) AS totals
  FROM generate_series(1, 12) g,
       LATERAL usage_billing.increment_usage('es_a', 'es_capped', 1 + 0 * g, NULL, '2025-01-04') r;
SELECT * FROM pg_temp.state('es_a', 'es_capped');
-- up to 79: still below the threshold
SELECT total, status FROM usage_billing.increment_usage('es_a', 'es_capped', 57, NULL, '2025-01-05');
SELECT * FROM pg_temp.state('es_a', 'es_capped');
-- to 80 exactly: the crossing is decided on the folded row, and the alert fires once
SELECT total, status FROM usage_billing.increment_usage('es_a', 'es_capped', 1, NULL, '2025-01-05');
SELECT array_agg(r.total ORDER BY g) AS totals
  FROM generate_series(1, 19) g,
       LATERAL usage_billing.increment_usage('es_a', 'es_capped', 1 + 0 * g, NULL, '2025-01-06') r;
SELECT * FROM pg_temp.state('es_a', 'es_capped');
-- 99 + 2 would pass the cap: refused, nothing written
SELECT total FROM usage_billing.increment_usage('es_a', 'es_capped', 2, NULL, '2025-01-06');
SELECT total, status, remaining FROM usage_billing.increment_usage('es_a', 'es_capped', 1, NULL, '2025-01-06');
SELECT total FROM usage_billing.increment_usage('es_a', 'es_capped', 1, NULL, '2025-01-06');
SELECT * FROM pg_temp.state('es_a', 'es_capped');
SELECT kind, count(*) FROM usage_billing.alert_log
 WHERE customer_id = 'es_a' AND meter = 'es_capped' GROUP BY kind ORDER BY kind;

-- 3. A limit added while a slot holds an unlimited budget: the slot may no longer be spent,
-- and the cap decides on the exact total.
SELECT total FROM usage_billing.increment_usage('es_b', 'es_free', 10, NULL, '2025-01-03');
SELECT total FROM usage_billing.increment_usage('es_b', 'es_free', 5, NULL, '2025-01-03');
SELECT * FROM pg_temp.state('es_b', 'es_free');
SELECT usage_billing.set_customer_limit('es_b', 'es_free', 20, true);
SELECT total FROM usage_billing.increment_usage('es_b', 'es_free', 6, NULL, '2025-01-04');
SELECT total, status FROM usage_billing.increment_usage('es_b', 'es_free', 5, NULL, '2025-01-04');
SELECT * FROM pg_temp.state('es_b', 'es_free');

-- 4. Count meter, batches and the SQL path on a key with slots.
SELECT total FROM usage_billing.increment_usage('es_b', 'es_count', 1, NULL, '2025-01-03');
SELECT total FROM usage_billing.increment_usage('es_b', 'es_count', NULL, NULL, '2025-01-04');
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "es_b", "meter": "es_count", "occurred_at": "2025-01-05"},
  {"customer_id": "es_b", "meter": "es_count", "occurred_at": "2025-01-06"},
  {"customer_id": "es_b", "meter": "es_count", "occurred_at": "2025-01-07", "idempotency_key": "es-b1"}]');
SELECT * FROM pg_temp.state('es_b', 'es_count');
SET usage_billing.direct_writes = off;
-- the SQL path folds the slots under the row's lock, then reports the exact total
SELECT total FROM usage_billing.increment_usage('es_b', 'es_count', 1, NULL, '2025-01-08');
SELECT * FROM pg_temp.state('es_b', 'es_count');
RESET usage_billing.direct_writes;
SELECT total FROM usage_billing.increment_usage('es_b', 'es_count', 1, NULL, '2025-01-09');
SELECT total FROM usage_billing.increment_usage('es_b', 'es_count', 1, NULL, '2025-01-09');
SELECT * FROM pg_temp.state('es_b', 'es_count');
-- a batch on the SQL path folds them too
SET usage_billing.direct_writes = off;
SELECT * FROM usage_billing.increment_usage_batch('[
  {"customer_id": "es_b", "meter": "es_count", "occurred_at": "2025-01-10"},
  {"customer_id": "es_b", "meter": "es_count", "occurred_at": "2025-01-11"}]');
SELECT * FROM pg_temp.state('es_b', 'es_count');
RESET usage_billing.direct_writes;
SELECT total FROM usage_billing.increment_usage('es_b', 'es_count', 1, NULL, '2025-01-12');
SELECT total FROM usage_billing.increment_usage('es_b', 'es_count', 1, NULL, '2025-01-12');
SELECT * FROM pg_temp.state('es_b', 'es_count');

-- 5. max is not a sum: no slots.
SELECT total FROM usage_billing.increment_usage('es_b', 'es_peak', 7, NULL, '2025-01-03');
SELECT total FROM usage_billing.increment_usage('es_b', 'es_peak', 3, NULL, '2025-01-04');
SELECT * FROM pg_temp.state('es_b', 'es_peak');

-- 6. Corrections fold first and decide on the exact total.
SELECT total FROM usage_billing.increment_usage('es_a', 'es_free', 1, 'es-k2', '2025-01-11');
SELECT * FROM pg_temp.state('es_a', 'es_free');
SELECT usage_billing.adjust_usage('es_a', 'es_free', -2, 'refund', '2025-01-12');
SELECT * FROM pg_temp.state('es_a', 'es_free');
SELECT usage_billing.void_usage('es_a', 'es-k2', 'mistake');
SELECT * FROM pg_temp.state('es_a', 'es_free');
SELECT total FROM usage_billing.increment_usage('es_a', 'es_free', 1, NULL, '2025-01-12');
SELECT total FROM usage_billing.increment_usage('es_a', 'es_free', 1, NULL, '2025-01-12');
SELECT * FROM pg_temp.state('es_a', 'es_free');
SELECT meter, total FROM usage_billing.get_usage_summary('es_a', '2025-01-01', '2025-02-01')
 WHERE meter = 'es_free';

-- check_limit reads the current period's row and slots
SELECT total FROM usage_billing.increment_usage('es_b', 'es_capped', 30);
SELECT total FROM usage_billing.increment_usage('es_b', 'es_capped', 1);
SELECT total FROM usage_billing.increment_usage('es_b', 'es_capped', 1);
SELECT total FROM usage_billing.increment_usage('es_b', 'es_capped', 1);
SELECT a.total AS row_total, a.slotted FROM usage_billing.usage_aggregates a
 WHERE customer_id = 'es_b' AND meter = 'es_capped';
SELECT allowed, current, remaining, status FROM usage_billing.check_limit('es_b', 'es_capped', 67);
SELECT allowed, current, reason FROM usage_billing.check_limit('es_b', 'es_capped', 68);
SELECT meter, total, usage_percent FROM usage_billing.current_usage WHERE customer_id = 'es_b' AND meter = 'es_capped';

-- 7. Turned off, existing slots are still read and folded; fold_escrow_slots moves them
-- into the rows.
SELECT total FROM usage_billing.increment_usage('es_a', 'es_count', 1, NULL, '2025-01-12');
SELECT total FROM usage_billing.increment_usage('es_a', 'es_count', 1, NULL, '2025-01-12');
SELECT total FROM usage_billing.increment_usage('es_a', 'es_count', 1, NULL, '2025-01-13');
SELECT * FROM pg_temp.state('es_a', 'es_count');
SET usage_billing.hot_key_slots = off;
SELECT total FROM usage_billing.increment_usage('es_a', 'es_free', 1, NULL, '2025-01-13');
SELECT * FROM pg_temp.state('es_a', 'es_free');
SELECT usage_billing.fold_escrow_slots('es_b') AS folded_b;
SELECT count(*) AS slots_b FROM usage_billing.usage_aggregate_slots WHERE customer_id = 'es_b';
SELECT usage_billing.fold_escrow_slots() AS folded_rest;
SELECT count(*) AS slots_left FROM usage_billing.usage_aggregate_slots;
SELECT count(*) AS still_slotted FROM usage_billing.usage_aggregates WHERE slotted;
SELECT * FROM pg_temp.state('es_a', 'es_free');
SELECT * FROM pg_temp.state('es_a', 'es_count');
SELECT * FROM pg_temp.state('es_b', 'es_count');
RESET usage_billing.hot_key_slots;

-- 8. Who may fold, and the new objects' access
SELECT has_function_privilege('usage_billing_writer', 'usage_billing.fold_escrow_slots(text)', 'EXECUTE') AS writer_folds,
       has_function_privilege('usage_billing_admin', 'usage_billing.fold_escrow_slots(text)', 'EXECUTE') AS admin_folds,
       has_table_privilege('usage_billing_reader', 'usage_billing.aggregate_totals', 'SELECT') AS reader_reads,
       has_table_privilege('usage_billing_reader', 'usage_billing.usage_aggregate_slots', 'UPDATE') AS reader_writes;
