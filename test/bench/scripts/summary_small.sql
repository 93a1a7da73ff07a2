-- ours: current-period summary of the customer with 1,000 events
SELECT * FROM usage_billing.get_usage_summary('small');
