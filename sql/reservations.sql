-- Reservations: check and hold in one step.  A hold counts against the hard cap at once, for
-- calls, batches and other reservations; a commit records it as usage exactly once; a release
-- or the hold's expiry frees the room.  check_limit counts holds and reports them.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
\set VERBOSITY default

SELECT usage_billing.create_meter('rv_renders', 'sum', 'renders');
SELECT usage_billing.create_meter('rv_peak', 'max');
SELECT usage_billing.create_meter('rv_free', 'sum');
SELECT usage_billing.create_plan('rv_plan', 0);
SELECT usage_billing.set_plan_limit('rv_plan', 'rv_renders', included => 50, hard_cap => true);
SELECT usage_billing.set_plan_limit('rv_plan', 'rv_peak', included => 50, hard_cap => true);
SELECT usage_billing.upsert_customer('rv_a', 'rv_plan');
SELECT usage_billing.upsert_customer('rv_b', 'rv_plan');

-- what the key holds, as the tables say
CREATE FUNCTION pg_temp.key(c text, m text)
RETURNS TABLE (total numeric, reserved numeric, held bigint, committed bigint, released bigint,
               expired bigint)
LANGUAGE sql AS $$
    SELECT (SELECT coalesce(sum(t.total), 0) FROM usage_billing.aggregate_totals t
             WHERE t.customer_id = c AND t.meter = m),
           (SELECT coalesce(sum(a.reserved), 0) FROM usage_billing.usage_aggregates a
             WHERE a.customer_id = c AND a.meter = m),
           count(*) FILTER (WHERE r.status = 'held'), count(*) FILTER (WHERE r.status = 'committed'),
           count(*) FILTER (WHERE r.status = 'released'), count(*) FILTER (WHERE r.status = 'expired')
      FROM usage_billing.reservations r WHERE r.customer_id = c AND r.meter = m
$$;

-- 1. 49 of 50 used: one hold of 1 fits, and then nothing else does
SELECT total FROM usage_billing.increment_usage('rv_a', 'rv_renders', 49);
SELECT reservation_id AS r1, expires_at - now() AS ttl, remaining
  FROM usage_billing.reserve_usage('rv_a', 'rv_renders', 1) \gset
SELECT :'ttl' AS ttl, :'remaining' AS remaining;
SELECT allowed, current, remaining, status, reason, reserved
  FROM usage_billing.check_limit('rv_a', 'rv_renders', 1);
SELECT * FROM usage_billing.reserve_usage('rv_a', 'rv_renders', 1);
SELECT total FROM usage_billing.increment_usage('rv_a', 'rv_renders', 1);
SELECT * FROM usage_billing.increment_usage_batch('[{"customer_id": "rv_a", "meter": "rv_renders", "amount": 1}]');
SELECT * FROM pg_temp.key('rv_a', 'rv_renders');

-- 2. commit records the hold as usage, once; a repeat is a duplicate; another amount conflicts
SELECT total, remaining, status, duplicate FROM usage_billing.commit_reservation(:'r1');
SELECT total, remaining, status, duplicate FROM usage_billing.commit_reservation(:'r1');
SELECT total, duplicate FROM usage_billing.commit_reservation(:'r1', 1);
-- (the message names the reservation, whose id changes from run to run)
\set VERBOSITY sqlstate
SELECT total, duplicate FROM usage_billing.commit_reservation(:'r1', 2);
\set VERBOSITY default
SELECT * FROM pg_temp.key('rv_a', 'rv_renders');
SELECT amount, idempotency_key = 'reservation:' || :'r1' AS keyed_by_reservation
  FROM usage_billing.usage_events WHERE customer_id = 'rv_a' AND meter = 'rv_renders'
 ORDER BY event_id;
-- a committed reservation cannot be released
-- (the message names the reservation, whose id changes from run to run)
\set VERBOSITY sqlstate
SELECT usage_billing.release_reservation(:'r1');
\set VERBOSITY default

-- 3. release frees the room; releasing twice does nothing; a released hold cannot be committed
SELECT reservation_id AS r2 FROM usage_billing.reserve_usage('rv_b', 'rv_renders', 30) \gset
SELECT * FROM usage_billing.reserve_usage('rv_b', 'rv_renders', 21);
SELECT usage_billing.release_reservation(:'r2');
SELECT usage_billing.release_reservation(:'r2');
SELECT * FROM pg_temp.key('rv_b', 'rv_renders');
-- (the message names the reservation, whose id changes from run to run)
\set VERBOSITY sqlstate
SELECT * FROM usage_billing.commit_reservation(:'r2');
\set VERBOSITY default
SELECT remaining FROM usage_billing.reserve_usage('rv_b', 'rv_renders', 50, idempotency_key => 'job-1');

-- 4. the same idempotency key: the same reservation; other parameters: a conflict
SELECT count(DISTINCT reservation_id) AS reservations
  FROM (SELECT reservation_id FROM usage_billing.reserve_usage('rv_b', 'rv_renders', 50, idempotency_key => 'job-1')
        UNION ALL
        SELECT reservation_id FROM usage_billing.reservations WHERE idempotency_key = 'job-1') r;
SELECT * FROM usage_billing.reserve_usage('rv_b', 'rv_renders', 40, idempotency_key => 'job-1');

-- 5. a commit above the hold is checked against the cap for the difference
SELECT reservation_id AS r3 FROM usage_billing.reservations WHERE idempotency_key = 'job-1' \gset
SELECT * FROM usage_billing.commit_reservation(:'r3', 51);
SELECT * FROM pg_temp.key('rv_b', 'rv_renders');
SELECT total, remaining, duplicate FROM usage_billing.commit_reservation(:'r3', 45);
SELECT * FROM pg_temp.key('rv_b', 'rv_renders');

-- 6. an expired hold frees itself: check_limit stops counting it at once, and the next
-- decision that needs the room ends it
SELECT usage_billing.upsert_customer('rv_c', 'rv_plan');
SELECT reservation_id AS r4 FROM usage_billing.reserve_usage('rv_c', 'rv_renders', 50, ttl => '1 second') \gset
SELECT allowed, reason, reserved FROM usage_billing.check_limit('rv_c', 'rv_renders', 1);
SELECT pg_sleep(1.1);
-- a new transaction, so that now() is past the hold
SELECT allowed, reason, reserved FROM usage_billing.check_limit('rv_c', 'rv_renders', 1);
SELECT total FROM usage_billing.increment_usage('rv_c', 'rv_renders', 1);
SELECT * FROM pg_temp.key('rv_c', 'rv_renders');
-- committing it afterwards still records the work, checked against the cap in full
SELECT total, duplicate FROM usage_billing.commit_reservation(:'r4', 10);
SELECT * FROM pg_temp.key('rv_c', 'rv_renders');

-- 7. holds and escrow slots: budgets stop short of the cap minus the holds
SET usage_billing.hot_key_slots = always;
SELECT usage_billing.upsert_customer('rv_d', 'rv_plan');
SELECT total FROM usage_billing.increment_usage('rv_d', 'rv_renders', 1);
SELECT reservation_id AS r5 FROM usage_billing.reserve_usage('rv_d', 'rv_renders', 40) \gset
SELECT count(*) AS calls, max(r.total) AS last_total
  FROM generate_series(1, 9) g, LATERAL usage_billing.increment_usage('rv_d', 'rv_renders', 1 + 0 * g) r;
SELECT total FROM usage_billing.increment_usage('rv_d', 'rv_renders', 1);
SELECT * FROM pg_temp.key('rv_d', 'rv_renders');
SELECT usage_billing.release_reservation(:'r5');
SELECT total FROM usage_billing.increment_usage('rv_d', 'rv_renders', 1);
RESET usage_billing.hot_key_slots;

-- 8. bad input: 22023 (or P0002, PT403), and nothing recorded
\set VERBOSITY terse
SELECT * FROM usage_billing.reserve_usage('rv_a', 'rv_renders', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.reserve_usage('rv_a', 'rv_renders', -1);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.reserve_usage('rv_a', 'rv_renders', 1, ttl => '0 seconds');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.reserve_usage('rv_a', 'rv_renders', 1, ttl => '8 days');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.reserve_usage('rv_a', 'rv_peak', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.reserve_usage('rv_nobody', 'rv_renders', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM usage_billing.commit_reservation('00000000-0000-0000-0000-000000000000');
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.release_reservation(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_customer_status('rv_b', 'suspended');
SELECT * FROM usage_billing.reserve_usage('rv_b', 'rv_renders', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT usage_billing.set_customer_status('rv_b', 'active');
\set VERBOSITY default
-- a meter without a limit takes holds too (reported, never refused)
SELECT remaining FROM usage_billing.reserve_usage('rv_a', 'rv_free', 1000000);
SELECT allowed, reserved FROM usage_billing.check_limit('rv_a', 'rv_free', 1);
SELECT count(*) AS holds FROM usage_billing.reservations WHERE status = 'held';
