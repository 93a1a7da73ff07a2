/* usage_billing--1.0--1.1.sql: roles, row-level security, insight and corrections */

\echo Use "ALTER EXTENSION usage_billing UPDATE TO '1.1'" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Insight and corrections
-- ---------------------------------------------------------------------------
-- (insight section: owned by insight)

-- ---------------------------------------------------------------------------
-- Security: roles, grants, row-level security
-- ---------------------------------------------------------------------------
-- (security section: owned by security)
