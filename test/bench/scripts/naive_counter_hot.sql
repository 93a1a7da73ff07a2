-- baseline: every client on one counter row
INSERT INTO usage (user_id, type, period_start, count)
VALUES ('hot', 'api_calls', date_trunc('month', now()), 1)
ON CONFLICT (user_id, type, period_start) DO UPDATE SET count = usage.count + 1;
