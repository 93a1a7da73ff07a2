-- baseline: the naive per-period counter upsert, random one of 10,000 users
\set c random(1, 10000)
INSERT INTO usage (user_id, type, period_start, count)
VALUES ('c' || :c::int, 'api_calls', date_trunc('month', now()), 1)
ON CONFLICT (user_id, type, period_start) DO UPDATE SET count = usage.count + 1;
