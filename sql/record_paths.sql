-- increment_usage's two paths: through escrow slots (hot_key_slots = always: every sum and
-- count key takes usage through this backend's slot once it has one) and through the
-- aggregate row alone (off).  The same events recorded both ways leave the same ledger and
-- the same totals.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

SELECT usage_billing.create_meter('dw_calls', 'sum', 'calls');
SELECT usage_billing.create_meter('dw_logins', 'count');
SELECT usage_billing.create_meter('dw_peak', 'max', 'GB');
SELECT usage_billing.create_meter('dw_seats', 'last', 'seats');
SELECT usage_billing.create_plan('dw_plan', 0);
SELECT usage_billing.set_plan_limit('dw_plan', 'dw_calls', included => 100, hard_cap => true);
SELECT usage_billing.upsert_customer('dw_slots', 'dw_plan', '2025-01-01 00:00+00');
SELECT usage_billing.upsert_customer('dw_row', 'dw_plan', '2025-01-01 00:00+00');

-- One script of events, run once per path: every aggregation, out-of-order and tied
-- occurred_at for last, repeated keys, several calls in one statement and in one
-- transaction, a refused call (hard cap) that must leave nothing behind.
CREATE FUNCTION pg_temp.script(c text) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT * FROM (VALUES
            ('dw_calls', 10::numeric, 'k1', '2025-01-05'::timestamptz, NULL::jsonb),
            ('dw_calls', 10, 'k1', '2025-01-05', NULL),            -- duplicate key
            ('dw_calls', 2.5, NULL, '2025-01-04', '{"region": "eu"}'),
            ('dw_calls', 1, NULL, '2025-02-04', NULL),             -- next period
            ('dw_logins', 1, 'k2', '2025-01-07', NULL),
            ('dw_logins', 1, NULL, '2025-01-02', NULL),
            ('dw_peak', 20, NULL, '2025-01-03', NULL),
            ('dw_peak', 5, 'k3', '2025-01-04', NULL),
            ('dw_peak', 30, NULL, '2025-01-02', NULL),
            ('dw_seats', 4, NULL, '2025-01-10', NULL),
            ('dw_seats', 9, NULL, '2025-01-08', NULL),             -- older: ignored
            ('dw_seats', 6, 'k4', '2025-01-10', NULL),             -- tie: the later call wins
            ('dw_seats', 6, 'k4', '2025-01-10', NULL)              -- duplicate key
        ) AS e(meter, amount, key, at, props)
    LOOP
        RETURN NEXT (SELECT format('%s %s %s %s', i.total, i.status, i.duplicate, i.period_start::date)
                       FROM usage_billing.increment_usage(c, r.meter, r.amount, r.key, r.at, r.props) AS i);
    END LOOP;
    -- several calls in one statement
    RETURN QUERY SELECT format('multi %s', i.total)
                   FROM generate_series(1, 3) AS g,
                        LATERAL usage_billing.increment_usage(c, 'dw_calls', g, NULL, '2025-01-20') AS i;
    -- a refused call: 18.5 used of 100, +90 passes the hard cap
    BEGIN
        PERFORM usage_billing.increment_usage(c, 'dw_calls', 90, 'k5', '2025-01-21');
    EXCEPTION WHEN SQLSTATE 'PT402' THEN
        RETURN NEXT 'PT402';
    END;
    -- the refused key is free again
    RETURN NEXT (SELECT format('%s %s', i.total, i.duplicate)
                   FROM usage_billing.increment_usage(c, 'dw_calls', 3.5, 'k5', '2025-01-21') AS i);
    RETURN NEXT (SELECT format('%s %s', i.total, i.duplicate)
                   FROM usage_billing.increment_usage(c, 'dw_calls', 3.5, 'k5', '2025-01-21') AS i);
END $$;

SET usage_billing.hot_key_slots = always;
SELECT * FROM pg_temp.script('dw_slots');
SET usage_billing.hot_key_slots = off;
SELECT * FROM pg_temp.script('dw_row');
RESET usage_billing.hot_key_slots;

-- the two customers' ledgers and aggregates are identical but for ids and clocks
SELECT meter, period_start, occurred_at, amount, idempotency_key, properties, kind,
       voided_event_id, reason, recorded_by = session_user AS by_session_user,
       recorded_at = now() AS at_now, count(*) AS events
  FROM usage_billing.usage_events WHERE customer_id IN ('dw_slots', 'dw_row')
 GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
HAVING count(*) <> 2;
SELECT meter, period_start, period_end, total, event_count, first_usage, last_usage, count(*)
  FROM usage_billing.aggregate_totals WHERE customer_id IN ('dw_slots', 'dw_row')
 GROUP BY 1, 2, 3, 4, 5, 6, 7
HAVING count(*) <> 2;
-- the slots path did take slots
SELECT count(*) > 0 AS slots_used FROM usage_billing.usage_aggregate_slots WHERE customer_id = 'dw_slots';
SELECT meter, period_start, total, event_count, first_usage, last_usage
  FROM usage_billing.aggregate_totals WHERE customer_id = 'dw_slots' ORDER BY 1, 2;
SELECT count(*) AS events, count(DISTINCT event_id) AS ids
  FROM usage_billing.usage_events WHERE customer_id IN ('dw_slots', 'dw_row');

-- several calls in one transaction see each other's writes
BEGIN;
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_logins', 1, occurred_at => '2025-01-25');
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_logins', 1, occurred_at => '2025-01-25');
SELECT total, duplicate FROM usage_billing.increment_usage('dw_slots', 'dw_logins', 1, 'k6', '2025-01-25');
SELECT total, duplicate FROM usage_billing.increment_usage('dw_slots', 'dw_logins', 1, 'k6', '2025-01-25');
ROLLBACK;
SELECT total, event_count FROM usage_billing.aggregate_totals
 WHERE customer_id = 'dw_slots' AND meter = 'dw_logins';

-- repeatable read records too; a read-only transaction records nothing
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_logins', 1, occurred_at => '2025-01-26');
COMMIT;
BEGIN READ ONLY;
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_logins', 1, occurred_at => '2025-01-26');
ROLLBACK;

-- a row trigger on the ledger is honoured
CREATE FUNCTION pg_temp.note_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'ledger row for % (%)', NEW.customer_id, NEW.amount;
    RETURN NEW;
END $$;
CREATE TRIGGER dw_note AFTER INSERT ON usage_billing.usage_events
    FOR EACH ROW EXECUTE FUNCTION pg_temp.note_event();
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_logins', 1, occurred_at => '2025-01-27');
DROP TRIGGER dw_note ON usage_billing.usage_events;
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_logins', 1, occurred_at => '2025-01-27');

-- a column added to the aggregates keeps its default on insert and its value on update
ALTER TABLE usage_billing.usage_aggregates ADD COLUMN dw_note text DEFAULT 'fresh';
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_calls', 1, occurred_at => '2025-03-05');
UPDATE usage_billing.usage_aggregates SET dw_note = 'kept'
 WHERE customer_id = 'dw_slots' AND meter = 'dw_calls' AND period_start = '2025-03-01';
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_calls', 1, occurred_at => '2025-03-06');
SELECT total, dw_note FROM usage_billing.usage_aggregates
 WHERE customer_id = 'dw_slots' AND meter = 'dw_calls' AND period_start >= '2025-02-01' ORDER BY period_start;
ALTER TABLE usage_billing.usage_aggregates DROP COLUMN dw_note;
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_calls', 1, occurred_at => '2025-03-07');

-- a batch (every aggregation, keys repeated inside the batch and recorded before) recorded
-- with and without slots leaves the same rows
CREATE FUNCTION pg_temp.batch_for(c text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_agg(jsonb_build_object('customer_id', c, 'meter', m, 'amount', a,
                                        'idempotency_key', k, 'occurred_at', t))
      FROM (VALUES ('dw_calls', 1, 'b1', '2025-04-02'), ('dw_calls', 1, 'b1', '2025-04-02'),
                   ('dw_calls', 3, NULL, '2025-04-01'), ('dw_calls', 10, 'k1', '2025-01-05'),
                   ('dw_logins', 1, NULL, '2025-04-05'), ('dw_logins', 1, NULL, '2025-04-06'),
                   ('dw_peak', 7, NULL, '2025-04-07'), ('dw_peak', 3, 'b2', '2025-04-08'),
                   ('dw_seats', 2, NULL, '2025-04-09'), ('dw_seats', 8, NULL, '2025-04-08'),
                   ('dw_seats', 5, 'b3', '2025-04-09')) AS e(m, a, k, t)
$$;
SET usage_billing.hot_key_slots = always;
SELECT * FROM usage_billing.increment_usage_batch(pg_temp.batch_for('dw_slots'));
SELECT * FROM usage_billing.increment_usage_batch(pg_temp.batch_for('dw_slots'));
SET usage_billing.hot_key_slots = off;
SELECT * FROM usage_billing.increment_usage_batch(pg_temp.batch_for('dw_row'));
SELECT * FROM usage_billing.increment_usage_batch(pg_temp.batch_for('dw_row'));
RESET usage_billing.hot_key_slots;
SELECT meter, total, event_count, first_usage, last_usage
  FROM usage_billing.aggregate_totals WHERE customer_id = 'dw_slots' AND period_start = '2025-04-01'
 ORDER BY 1;
SELECT meter, period_start, total, event_count, first_usage, last_usage, count(*)
  FROM usage_billing.aggregate_totals WHERE customer_id IN ('dw_slots', 'dw_row')
   AND period_start = '2025-04-01'
 GROUP BY 1, 2, 3, 4, 5, 6
HAVING count(*) <> 2;
SELECT meter, occurred_at, amount, idempotency_key,
       count(*) FILTER (WHERE customer_id = 'dw_slots') AS slots,
       count(*) FILTER (WHERE customer_id = 'dw_row') AS row
  FROM usage_billing.usage_events WHERE customer_id IN ('dw_slots', 'dw_row')
   AND period_start = '2025-04-01'
 GROUP BY 1, 2, 3, 4
 ORDER BY 1, 2, 3, 4;

-- a batch refused at a hard cap inside an exception block leaves nothing behind, and the
-- transaction goes on writing through the same path
DO $$
BEGIN
    PERFORM usage_billing.increment_usage_batch(
        '[{"customer_id": "dw_slots", "meter": "dw_calls", "amount": 1, "occurred_at": "2025-05-02"},
          {"customer_id": "dw_slots", "meter": "dw_calls", "amount": 500, "occurred_at": "2025-05-03"}]');
EXCEPTION WHEN SQLSTATE 'PT402' THEN
    RAISE NOTICE 'refused: %', SQLERRM;
END $$;
SELECT total, duplicate FROM usage_billing.increment_usage('dw_slots', 'dw_calls', 2, occurred_at => '2025-05-04');
SELECT count(*) FROM usage_billing.usage_events
 WHERE customer_id = 'dw_slots' AND period_start = '2025-05-01';

-- the writes are the executor's: a function owner without INSERT on the ledger is refused
CREATE ROLE dw_nobody NOLOGIN;
ALTER FUNCTION usage_billing.increment_usage(text, text, numeric, text, timestamptz, jsonb) OWNER TO dw_nobody;
\set VERBOSITY terse
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_calls', 1, occurred_at => '2025-05-05');
\set VERBOSITY default
DO $$ BEGIN EXECUTE format('ALTER FUNCTION usage_billing.increment_usage(text, text, numeric, text, timestamptz, jsonb) OWNER TO %I', current_user); END $$;
DROP ROLE dw_nobody;
SELECT total FROM usage_billing.increment_usage('dw_slots', 'dw_calls', 1, occurred_at => '2025-05-05');
