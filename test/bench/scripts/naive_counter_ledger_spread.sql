-- reference: the naive counter upsert plus the naive ledger insert, in one statement (the same
-- durable work as ours: a ledger row and a counter), random one of 10,000 users
\set c random(1, 10000)
WITH ledger AS (
    INSERT INTO usage_records (user_id, usage_type, usage_amount)
    VALUES ('c' || :c::int, 'api_calls', 1)
)
INSERT INTO usage (user_id, type, period_start, count)
VALUES ('c' || :c::int, 'api_calls', date_trunc('month', now()), 1)
ON CONFLICT (user_id, type, period_start) DO UPDATE SET count = usage.count + 1;
