-- baseline: the naive ledger's summary, a sum over the period's 1,000,000 rows
SELECT sum(usage_amount) FROM usage_records
 WHERE user_id = 'big' AND created_at >= date_trunc('month', now());
