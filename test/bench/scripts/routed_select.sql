-- baseline on Citus: a plain SELECT routed to the shard of a random one of 10,000 customers
\set c random(1, 10000)
SELECT plan FROM usage_billing.customers WHERE customer_id = 'c' || :c::int;
