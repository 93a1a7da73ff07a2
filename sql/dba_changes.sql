-- What a DBA may add to the tables, against every writing path: single calls (through the
-- aggregate row and through escrow slots), batches, corrections, the escrow fold and the
-- alert flush.  Every row reaches a table through the executor, so each change behaves
-- exactly as with plain SQL: generated columns get their values, triggers fire, constraints
-- refuse, indexes are maintained, replica identity is enforced, row-level security applies.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
CREATE EXTENSION IF NOT EXISTS amcheck;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

SELECT usage_billing.create_meter('dba_calls', 'sum', 'calls');
SELECT usage_billing.create_meter('dba_logins', 'count');
SELECT usage_billing.create_meter('dba_peak', 'max');
SELECT usage_billing.create_plan('dba_plan', 0);
SELECT usage_billing.set_plan_limit('dba_plan', 'dba_calls', included => 1000000, hard_cap => true);
SELECT usage_billing.upsert_customer('dba_a', 'dba_plan');
SELECT usage_billing.upsert_customer('dba_b', 'dba_plan');

-- every writing path once: row path, slot grant and spend, batch, corrections, fold
CREATE FUNCTION pg_temp.write_all(c text, tag text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    t numeric;
BEGIN
    PERFORM usage_billing.increment_usage(c, 'dba_calls', 3, tag || '-1');
    SET LOCAL usage_billing.hot_key_slots = always;
    PERFORM usage_billing.increment_usage(c, 'dba_calls', 2, tag || '-2');   -- row, grants a slot
    PERFORM usage_billing.increment_usage(c, 'dba_calls', 1, tag || '-3');   -- spends the slot
    PERFORM usage_billing.increment_usage(c, 'dba_logins', 1, tag || '-4');
    PERFORM usage_billing.increment_usage(c, 'dba_peak', 7, tag || '-5');
    PERFORM usage_billing.increment_usage_batch(jsonb_build_array(
        jsonb_build_object('customer_id', c, 'meter', 'dba_calls', 'amount', 4, 'idempotency_key', tag || '-6'),
        jsonb_build_object('customer_id', c, 'meter', 'dba_logins', 'idempotency_key', tag || '-7'),
        jsonb_build_object('customer_id', c, 'meter', 'dba_peak', 'amount', 9)));
    PERFORM usage_billing.adjust_usage(c, 'dba_calls', -1, 'goodwill');
    PERFORM usage_billing.void_usage(c, tag || '-1', 'test event');
    PERFORM usage_billing.fold_escrow_slots(c);
    SELECT total INTO t FROM usage_billing.aggregate_totals
     WHERE customer_id = c AND meter = 'dba_calls';
    RETURN format('calls %s', t);
END $$;

-- the ledger and aggregates against each other, and every index against its table
CREATE FUNCTION pg_temp.consistent() RETURNS TABLE (check_name text, ok boolean) LANGUAGE sql AS $$
    SELECT 'aggregates = ledger',
           NOT EXISTS (
               SELECT 1 FROM usage_billing.aggregate_totals a
                 JOIN usage_billing.meters m USING (meter)
                WHERE m.aggregation IN ('sum', 'count') AND a.customer_id LIKE 'dba%'
                  AND a.total IS DISTINCT FROM (
                      SELECT sum(CASE WHEN m.aggregation = 'count' AND e.kind = 'usage' THEN 1
                                      ELSE e.amount END)
                        FROM usage_billing.usage_events e
                       WHERE e.customer_id = a.customer_id AND e.meter = a.meter
                         AND e.period_start = a.period_start))
    UNION ALL
    -- bt_index_check raises when an index misses a row of its table (heapallindexed)
    SELECT 'indexes hold every row', count(bt_index_check(x.indexrelid, true)::text) = count(*)
      FROM (SELECT i.indexrelid FROM pg_index i
              JOIN pg_class c ON c.oid = i.indrelid
              JOIN pg_class ic ON ic.oid = i.indexrelid
              JOIN pg_am am ON am.oid = ic.relam
             WHERE c.relnamespace = 'usage_billing'::regnamespace AND am.amname = 'btree'
               AND c.relname IN ('usage_events', 'usage_aggregates', 'usage_aggregate_slots')) x
$$;

SELECT pg_temp.write_all('dba_a', 'base');
SELECT * FROM pg_temp.consistent();

-- 1. Stored generated columns on the ledger, the aggregates and the slots
ALTER TABLE usage_billing.usage_events ADD COLUMN dba_cents numeric GENERATED ALWAYS AS (amount * 100) STORED;
ALTER TABLE usage_billing.usage_aggregates ADD COLUMN dba_double numeric GENERATED ALWAYS AS (total * 2) STORED;
ALTER TABLE usage_billing.usage_aggregate_slots ADD COLUMN dba_left numeric GENERATED ALWAYS AS (budget - total) STORED;
SELECT pg_temp.write_all('dba_b', 'gen');
SELECT count(*) AS ledger_rows, count(*) FILTER (WHERE dba_cents = amount * 100) AS generated_right
  FROM usage_billing.usage_events WHERE customer_id = 'dba_b';
SELECT meter, total, dba_double = total * 2 AS generated_right
  FROM usage_billing.usage_aggregates WHERE customer_id = 'dba_b' ORDER BY meter;
-- a slot that is granted and spent keeps its generated column right
SET usage_billing.hot_key_slots = always;
SELECT total FROM usage_billing.increment_usage('dba_b', 'dba_calls', 1);
SELECT total FROM usage_billing.increment_usage('dba_b', 'dba_calls', 1);
SELECT count(*) AS slots, bool_and(dba_left IS NOT DISTINCT FROM budget - total) AS generated_right
  FROM usage_billing.usage_aggregate_slots WHERE customer_id = 'dba_b';
RESET usage_billing.hot_key_slots;
SELECT * FROM pg_temp.consistent();
ALTER TABLE usage_billing.usage_events DROP COLUMN dba_cents;
ALTER TABLE usage_billing.usage_aggregates DROP COLUMN dba_double;
ALTER TABLE usage_billing.usage_aggregate_slots DROP COLUMN dba_left;

-- 2. Row triggers see every row written, on every table
CREATE TABLE pg_temp.seen (tbl text, op text);
CREATE FUNCTION pg_temp.note() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pg_temp.seen VALUES (TG_TABLE_NAME, TG_OP);
    RETURN NULL;
END $$;
CREATE TRIGGER dba_note AFTER INSERT OR UPDATE OR DELETE ON usage_billing.usage_events
    FOR EACH ROW EXECUTE FUNCTION pg_temp.note();
CREATE TRIGGER dba_note AFTER INSERT OR UPDATE OR DELETE ON usage_billing.usage_aggregates
    FOR EACH ROW EXECUTE FUNCTION pg_temp.note();
CREATE TRIGGER dba_note AFTER INSERT OR UPDATE OR DELETE ON usage_billing.usage_aggregate_slots
    FOR EACH ROW EXECUTE FUNCTION pg_temp.note();
SELECT usage_billing.upsert_customer('dba_c', 'dba_plan');
SELECT pg_temp.write_all('dba_c', 'trg');
SELECT tbl, op, count(*) FROM pg_temp.seen GROUP BY 1, 2 ORDER BY 1, 2;
SELECT count(*) AS ledger_rows FROM usage_billing.usage_events WHERE customer_id = 'dba_c';
DROP TRIGGER dba_note ON usage_billing.usage_events;
DROP TRIGGER dba_note ON usage_billing.usage_aggregates;
DROP TRIGGER dba_note ON usage_billing.usage_aggregate_slots;
-- a BEFORE trigger that changes the row is honoured as with an INSERT
CREATE FUNCTION pg_temp.tag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.properties := coalesce(NEW.properties, '{}') || '{"tagged": true}';
    RETURN NEW;
END $$;
CREATE TRIGGER dba_tag BEFORE INSERT ON usage_billing.usage_events
    FOR EACH ROW EXECUTE FUNCTION pg_temp.tag();
SELECT total FROM usage_billing.increment_usage('dba_c', 'dba_calls', 1, 'tagged-1');
SELECT properties FROM usage_billing.usage_events WHERE customer_id = 'dba_c' AND idempotency_key = 'tagged-1';
DROP TRIGGER dba_tag ON usage_billing.usage_events;

-- 3. A CHECK constraint refuses as it refuses a plain INSERT, and nothing is half-written
ALTER TABLE usage_billing.usage_events ADD CONSTRAINT dba_small CHECK (amount < 1000);
\set VERBOSITY terse
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount)
VALUES ('dba_c', 'dba_calls', now(), now(), 5000);
SELECT total FROM usage_billing.increment_usage('dba_c', 'dba_calls', 5000);
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "dba_c", "meter": "dba_calls", "amount": 1},
                                                    {"customer_id": "dba_c", "meter": "dba_calls", "amount": 5000}]');
SELECT usage_billing.adjust_usage('dba_c', 'dba_calls', 5000, 'too big');
\set VERBOSITY default
ALTER TABLE usage_billing.usage_events DROP CONSTRAINT dba_small;
ALTER TABLE usage_billing.usage_aggregates ADD CONSTRAINT dba_cap CHECK (total <= 100000);
\set VERBOSITY terse
SELECT total FROM usage_billing.increment_usage('dba_c', 'dba_calls', 200000);
\set VERBOSITY default
ALTER TABLE usage_billing.usage_aggregates DROP CONSTRAINT dba_cap;
SELECT * FROM pg_temp.consistent();

-- 4. Partial and expression indexes are maintained by every path
CREATE INDEX dba_big ON usage_billing.usage_events (customer_id) WHERE amount >= 4;
CREATE INDEX dba_lower ON usage_billing.usage_events (lower(customer_id), meter);
CREATE INDEX dba_agg_expr ON usage_billing.usage_aggregates ((total * 10));
SELECT usage_billing.upsert_customer('dba_d', 'dba_plan');
SELECT pg_temp.write_all('dba_d', 'idx');
SELECT * FROM pg_temp.consistent();
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SELECT count(*) AS big_rows FROM usage_billing.usage_events WHERE customer_id = 'dba_d' AND amount >= 4;
SELECT count(*) AS lower_rows FROM usage_billing.usage_events WHERE lower(customer_id) = 'dba_d';
RESET enable_seqscan;
RESET enable_bitmapscan;
DROP INDEX usage_billing.dba_big;
DROP INDEX usage_billing.dba_lower;
DROP INDEX usage_billing.dba_agg_expr;

-- 5. A renamed idempotency index: duplicates are still found (ON CONFLICT names columns)
ALTER INDEX usage_billing.usage_events_idempotency_idx RENAME TO dba_renamed_idx;
SELECT total, duplicate FROM usage_billing.increment_usage('dba_d', 'dba_calls', 1, 'ren-1');
SELECT total, duplicate FROM usage_billing.increment_usage('dba_d', 'dba_calls', 1, 'ren-1');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "dba_d", "meter": "dba_calls", "idempotency_key": "ren-1"},
                                                    {"customer_id": "dba_d", "meter": "dba_calls", "idempotency_key": "ren-2"}]');
ALTER INDEX usage_billing.dba_renamed_idx RENAME TO usage_events_idempotency_idx;

-- 6. A changed column default applies at once, in this backend too (plans are invalidated)
ALTER TABLE usage_billing.usage_events ALTER COLUMN recorded_by SET DEFAULT 'dba-default';
SELECT total FROM usage_billing.increment_usage('dba_d', 'dba_calls', 1, 'def-1');
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "dba_d", "meter": "dba_calls", "idempotency_key": "def-2"}]');
SELECT idempotency_key, recorded_by FROM usage_billing.usage_events
 WHERE customer_id = 'dba_d' AND idempotency_key LIKE 'def-%' ORDER BY 1;
ALTER TABLE usage_billing.usage_events ALTER COLUMN recorded_by SET DEFAULT session_user;

-- 7. Replica identity under a publication: an UPDATE or DELETE without one is refused, as
-- plain SQL is, and nothing is half-written
SET usage_billing.hot_key_slots = always;
SELECT total FROM usage_billing.increment_usage('dba_d', 'dba_calls', 1);
SELECT total FROM usage_billing.increment_usage('dba_d', 'dba_calls', 1);
SELECT count(*) AS slots FROM usage_billing.usage_aggregate_slots WHERE customer_id = 'dba_d';
SET client_min_messages = error;
CREATE PUBLICATION dba_all FOR ALL TABLES;
RESET client_min_messages;
ALTER TABLE usage_billing.usage_aggregate_slots REPLICA IDENTITY NOTHING;
\set VERBOSITY terse
DELETE FROM usage_billing.usage_aggregate_slots WHERE customer_id = 'dba_d';
SELECT usage_billing.fold_escrow_slots('dba_d');
SELECT total FROM usage_billing.increment_usage('dba_d', 'dba_calls', 1);
\set VERBOSITY default
SELECT total FROM usage_billing.aggregate_totals WHERE customer_id = 'dba_d' AND meter = 'dba_calls';
ALTER TABLE usage_billing.usage_aggregate_slots REPLICA IDENTITY FULL;
SELECT usage_billing.fold_escrow_slots('dba_d');
SELECT count(*) AS slots FROM usage_billing.usage_aggregate_slots WHERE customer_id = 'dba_d';
ALTER TABLE usage_billing.usage_aggregate_slots REPLICA IDENTITY DEFAULT;
RESET usage_billing.hot_key_slots;
DROP PUBLICATION dba_all;
SELECT * FROM pg_temp.consistent();

-- 8. Row-level security (on by default on the ledger, for tenants) applies to the writing
-- functions' owner as to a plain INSERT by it
CREATE ROLE dba_owner NOLOGIN;
GRANT USAGE ON SCHEMA usage_billing TO dba_owner;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA usage_billing TO dba_owner;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA usage_billing TO dba_owner;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA usage_billing TO dba_owner;
ALTER FUNCTION usage_billing.increment_usage(text, text, numeric, text, timestamptz, jsonb) OWNER TO dba_owner;
ALTER FUNCTION usage_billing.increment_usage_batch(jsonb) OWNER TO dba_owner;
-- the tenant policies of the schema let dba_owner see everything; the ledger's only 'dba_a'
DO $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT relname FROM pg_class WHERE relnamespace = 'usage_billing'::regnamespace
                AND relrowsecurity AND relname <> 'usage_events'
    LOOP
        EXECUTE format('CREATE POLICY dba_see_all ON usage_billing.%I TO dba_owner USING (true)', t);
    END LOOP;
END $$;
CREATE POLICY dba_only_a ON usage_billing.usage_events TO dba_owner USING (true)
    WITH CHECK (customer_id = 'dba_a');
SELECT total FROM usage_billing.increment_usage('dba_a', 'dba_calls', 1);
\set VERBOSITY terse
SET ROLE dba_owner;
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount)
VALUES ('dba_b', 'dba_calls', now(), now(), 1);
RESET ROLE;
SELECT total FROM usage_billing.increment_usage('dba_b', 'dba_calls', 1);
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "dba_b", "meter": "dba_calls"}]');
\set VERBOSITY default
DROP POLICY dba_only_a ON usage_billing.usage_events;
DO $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT c.relname FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
              WHERE p.polname = 'dba_see_all'
    LOOP
        EXECUTE format('DROP POLICY dba_see_all ON usage_billing.%I', t);
    END LOOP;
END $$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION usage_billing.increment_usage(text, text, numeric, text, timestamptz, jsonb) OWNER TO %I', current_user);
    EXECUTE format('ALTER FUNCTION usage_billing.increment_usage_batch(jsonb) OWNER TO %I', current_user);
END $$;
REVOKE ALL ON ALL TABLES IN SCHEMA usage_billing FROM dba_owner;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA usage_billing FROM dba_owner;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA usage_billing FROM dba_owner;
REVOKE ALL ON SCHEMA usage_billing FROM dba_owner;
DROP ROLE dba_owner;
SELECT * FROM pg_temp.consistent();
-- leave no slots behind for the tests that follow
SELECT sum(usage_billing.fold_escrow_slots(c)) >= 0 AS folded
  FROM unnest(ARRAY['dba_a', 'dba_b', 'dba_c', 'dba_d']) c;
