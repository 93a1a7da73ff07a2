-- test/bench/setup.sql: catalog, customers and the baselines of the benchmark.
-- Ours: meter api_calls (sum), plan "bench" with 1e9 included (never over), customers
-- c1..c10000 plus "hot", "big" and "small".  Baselines: the naive counter table and the naive
-- ledger with 1,000,000 rows for user "big" in the current month and 1,000 for "small".
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

CREATE EXTENSION usage_billing;
SELECT usage_billing.create_meter('api_calls', 'sum', 'calls');
SELECT usage_billing.create_plan('bench', base_price => 10);
SELECT usage_billing.set_plan_limit('bench', 'api_calls', included => 1e9, overage_price => 0.01, overage_unit => 1000);
SELECT count(usage_billing.upsert_customer('c' || g, 'bench')) AS customers
  FROM generate_series(1, 10000) AS g;
SELECT usage_billing.upsert_customer(c, 'bench') FROM unnest(ARRAY['hot', 'big', 'small']) AS c;

-- the naive counter most apps write
CREATE TABLE usage (
    user_id      text NOT NULL,
    type         text NOT NULL,
    period_start timestamptz NOT NULL,
    count        bigint NOT NULL,
    PRIMARY KEY (user_id, type, period_start)
);

-- the naive ledger: one row per event, summed on read
CREATE TABLE usage_records (
    id           bigserial PRIMARY KEY,
    user_id      text NOT NULL,
    usage_type   text NOT NULL,
    usage_amount numeric NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_records_user_created_idx ON usage_records (user_id, created_at);
INSERT INTO usage_records (user_id, usage_type, usage_amount, created_at)
SELECT 'big', 'api_calls', 1, date_trunc('month', now()) + (g % 86400) * interval '1 second'
  FROM generate_series(1, 1000000) AS g;
INSERT INTO usage_records (user_id, usage_type, usage_amount, created_at)
SELECT 'small', 'api_calls', 1, date_trunc('month', now()) + g * interval '1 second'
  FROM generate_series(1, 1000) AS g;
VACUUM ANALYZE usage_records;
