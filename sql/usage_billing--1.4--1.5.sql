-- usage_billing 1.4 -> 1.5: scale-out on Citus, Stripe reconciliation and v2 streams.
\echo Use "ALTER EXTENSION usage_billing UPDATE" to load this file. \quit

-- Sections are added below, one per subsystem; usage_billing--1.5.sql holds the same objects
-- for a fresh install.
