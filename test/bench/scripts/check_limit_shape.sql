-- reference: a constant row of check_limit's eight columns and types, computed from the same
-- argument; no function, no table (what any check_limit could at best reach)
\set c random(1, 10000)
SELECT ('c' || :c::int) IS NOT NULL AS allowed, 0::numeric AS current, 1000000000::numeric AS included,
       1000000000::numeric AS remaining, 'ok'::text AS status, true AS overage_allowed,
       0.00::numeric AS estimated_overage_cost, NULL::text AS reason;
