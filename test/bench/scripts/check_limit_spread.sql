-- ours: read-only limit check for a random one of 10,000 customers
\set c random(1, 10000)
SELECT * FROM usage_billing.check_limit('c' || :c::int, 'api_calls', 1);
