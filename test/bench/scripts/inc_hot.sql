-- ours: every client on one customer and meter
SELECT * FROM usage_billing.increment_usage('hot', 'api_calls', 1);
