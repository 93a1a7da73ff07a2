-- baseline: the round trip itself
\set c random(1, 10000)
SELECT 1;
