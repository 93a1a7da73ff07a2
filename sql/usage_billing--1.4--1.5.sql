-- usage_billing 1.4 -> 1.5: scale-out on Citus, Stripe reconciliation and v2 streams.
\echo Use "ALTER EXTENSION usage_billing UPDATE" to load this file. \quit

-- Sections are added below, one per subsystem; usage_billing--1.5.sql holds the same objects
-- for a fresh install.

-- ---------------------------------------------------------------------------
-- Security: the tenants' policies of the escrow slots and reservations say what they do
-- ---------------------------------------------------------------------------
COMMENT ON POLICY tenant_own_rows ON usage_billing.usage_aggregate_slots IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';
COMMENT ON POLICY tenant_own_rows ON usage_billing.reservations IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';
