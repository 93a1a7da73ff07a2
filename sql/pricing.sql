-- pricing: tiers (graduated, volume, flat fees, boundaries), packages, rounding, currencies
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS usage_billing;
RESET client_min_messages;

-- sets the aggregate of a customer's meter in January 2025 (every customer here is anchored on Jan 1)
CREATE FUNCTION pg_temp.set_total(text, text, numeric) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO usage_billing.usage_aggregates AS a
           (customer_id, meter, period_start, period_end, total, event_count)
    VALUES ($1, $2, '2025-01-01 00:00:00+00', '2025-02-01 00:00:00+00', $3, 1)
    ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET total = EXCLUDED.total
$$;

-- one customer per total on a plan, all with the same meter
CREATE FUNCTION pg_temp.customers_with_totals(prefix text, plan text, meter text, totals numeric[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t numeric;
BEGIN
    FOREACH t IN ARRAY totals LOOP
        PERFORM usage_billing.upsert_customer(prefix || t, plan, '2025-01-01 00:00:00+00');
        PERFORM pg_temp.set_total(prefix || t, meter, t);
    END LOOP;
END
$$;

-- the contract's example tiers: 1,000 free, then 0.002 up to 10,000, then 0.001 plus a flat 5
SELECT usage_billing.create_meter('pr_graduated');
SELECT usage_billing.create_meter('pr_volume');
SELECT usage_billing.create_plan('pr_graduated_plan');
SELECT usage_billing.set_plan_limit('pr_graduated_plan', 'pr_graduated', tiers =>
    '[{"up_to": 1000, "unit_price": 0}, {"up_to": 10000, "unit_price": 0.002},
      {"up_to": null, "unit_price": 0.001, "flat_fee": 5}]');
SELECT usage_billing.create_plan('pr_volume_plan');
SELECT usage_billing.set_plan_limit('pr_volume_plan', 'pr_volume', tier_mode => 'volume', tiers =>
    '[{"up_to": 1000, "unit_price": 0}, {"up_to": 10000, "unit_price": 0.002},
      {"up_to": null, "unit_price": 0.001, "flat_fee": 5}]');

SELECT pg_temp.customers_with_totals('pr_g_', 'pr_graduated_plan', 'pr_graduated',
    '{0, 0.5, 1000, 1000.5, 1001, 10000, 10001, 20000}');
SELECT pg_temp.customers_with_totals('pr_v_', 'pr_volume_plan', 'pr_volume',
    '{0, 0.5, 1000, 1000.5, 1001, 10000, 10001, 20000}');

-- graduated: each slice at its tier's price; the flat fee once the tier is entered (total > 10000)
SELECT o.meter, o.total, o.included, o.overage_quantity, o.overage_cost, o.currency
  FROM usage_billing.customers c,
       LATERAL usage_billing.calculate_overage(c.customer_id, '2025-01-15') o
 WHERE c.customer_id LIKE 'pr\_g\_%' ORDER BY o.total;
-- volume: the whole total at the price of the tier it falls in (up_to inclusive), plus its flat fee
SELECT o.meter, o.total, o.overage_cost
  FROM usage_billing.customers c,
       LATERAL usage_billing.calculate_overage(c.customer_id, '2025-01-15') o
 WHERE c.customer_id LIKE 'pr\_v\_%' ORDER BY o.total;
-- tier lines carry the total as quantity and no unit price
SELECT * FROM usage_billing.preview_invoice('pr_g_10001', '2025-01-15');
SELECT * FROM usage_billing.preview_invoice('pr_v_1000.5', '2025-01-15');

-- flat fees on the first tier: graduated charges nothing at 0, volume charges the fee even at 0
SELECT usage_billing.create_meter('pr_fee_g');
SELECT usage_billing.create_meter('pr_fee_v');
SELECT usage_billing.create_plan('pr_fee_plan', base_price => 5);
SELECT usage_billing.set_plan_limit('pr_fee_plan', 'pr_fee_g', tiers =>
    '[{"up_to": 100, "unit_price": 1, "flat_fee": 10}, {"up_to": null, "unit_price": 0.5, "flat_fee": 2}]');
SELECT usage_billing.set_plan_limit('pr_fee_plan', 'pr_fee_v', tier_mode => 'volume', tiers =>
    '[{"up_to": 100, "unit_price": 1, "flat_fee": 10}, {"up_to": null, "unit_price": 0.5, "flat_fee": 2}]');
SELECT pg_temp.customers_with_totals('pr_fee_', 'pr_fee_plan', 'pr_fee_g', '{0, 1, 100, 101}');
SELECT pg_temp.set_total(c.customer_id, 'pr_fee_v', a.total)
  FROM usage_billing.customers c
  JOIN usage_billing.usage_aggregates a ON a.customer_id = c.customer_id AND a.meter = 'pr_fee_g'
 WHERE c.customer_id LIKE 'pr\_fee\_%';
SELECT c.customer_id, o.meter, o.total, o.overage_cost
  FROM usage_billing.customers c,
       LATERAL usage_billing.calculate_overage(c.customer_id, '2025-01-15') o
 WHERE c.customer_id LIKE 'pr\_fee\_%' ORDER BY o.total, o.meter;
SELECT * FROM usage_billing.preview_invoice('pr_fee_0', '2025-01-15');

-- tiers with included: included does not reduce the price, but gives overage_quantity
SELECT usage_billing.create_meter('pr_tiered_incl');
SELECT usage_billing.create_plan('pr_incl_plan');
SELECT usage_billing.set_plan_limit('pr_incl_plan', 'pr_tiered_incl', included => 5000, tiers =>
    '[{"up_to": 1000, "unit_price": 0}, {"up_to": 10000, "unit_price": 0.002},
      {"up_to": null, "unit_price": 0.001, "flat_fee": 5}]');
SELECT pg_temp.customers_with_totals('pr_incl_', 'pr_incl_plan', 'pr_tiered_incl', '{4000, 10001}');
SELECT o.* FROM usage_billing.customers c,
       LATERAL usage_billing.calculate_overage(c.customer_id, '2025-01-15') o
 WHERE c.customer_id LIKE 'pr\_incl\_%' ORDER BY o.total;
SELECT line, meter, quantity, unit_price, amount
  FROM usage_billing.preview_invoice('pr_incl_10001', '2025-01-15') WHERE line = 'usage';

-- per package, pro rata: $0.01 per 1,000 calls; exact costs, invoice lines rounded half away from zero
SELECT usage_billing.create_meter('pr_calls');
SELECT usage_billing.create_plan('pr_pkg_plan');
SELECT usage_billing.set_plan_limit('pr_pkg_plan', 'pr_calls', included => 1000, overage_price => 0.01,
                                    overage_unit => 1000);
SELECT pg_temp.customers_with_totals('pr_pkg_', 'pr_pkg_plan', 'pr_calls',
    '{0, 1000, 1001, 1400, 1500, 2234, 13500, 51000}');
SELECT o.total, o.overage_quantity, o.overage_cost, i.unit_price, i.amount
  FROM usage_billing.customers c,
       LATERAL usage_billing.calculate_overage(c.customer_id, '2025-01-15') o,
       LATERAL usage_billing.preview_invoice(c.customer_id, '2025-01-15') i
 WHERE c.customer_id LIKE 'pr\_pkg\_%' AND i.line = 'usage' ORDER BY o.total;

-- half away from zero at the cent: 0.125 -> 0.13, 0.005 -> 0.01, 0.004 -> 0.00, 0.0149 -> 0.01
SELECT usage_billing.create_meter('pr_cents');
SELECT usage_billing.create_plan('pr_cents_plan', base_price => 10.005);
SELECT usage_billing.set_plan_limit('pr_cents_plan', 'pr_cents', included => 0, overage_price => 0.001);
SELECT pg_temp.customers_with_totals('pr_cents_', 'pr_cents_plan', 'pr_cents', '{125, 5, 4, 14.9}');
SELECT o.total, o.overage_cost, i.amount
  FROM usage_billing.customers c,
       LATERAL usage_billing.calculate_overage(c.customer_id, '2025-01-15') o,
       LATERAL usage_billing.preview_invoice(c.customer_id, '2025-01-15') i
 WHERE c.customer_id LIKE 'pr\_cents\_%' AND i.line = 'usage' ORDER BY o.total;
-- the base line is rounded too, and the total is the sum of the rounded lines (10.01 + 0.13)
SELECT * FROM usage_billing.preview_invoice('pr_cents_125', '2025-01-15');

-- the total adds rounded lines: three lines of 0.005 each are 0.03, not round(0.015) = 0.02
SELECT usage_billing.create_meter('pr_half_a');
SELECT usage_billing.create_meter('pr_half_b');
SELECT usage_billing.create_meter('pr_half_c');
SELECT usage_billing.create_plan('pr_half_plan');
SELECT usage_billing.set_plan_limit('pr_half_plan', m, included => 0, overage_price => 0.005)
  FROM unnest('{pr_half_a, pr_half_b, pr_half_c}'::text[]) m;
SELECT usage_billing.upsert_customer('pr_half', 'pr_half_plan', '2025-01-01 00:00:00+00');
SELECT pg_temp.set_total('pr_half', m, 1) FROM unnest('{pr_half_a, pr_half_b, pr_half_c}'::text[]) m;
SELECT * FROM usage_billing.preview_invoice('pr_half', '2025-01-15');
SELECT sum(overage_cost) AS exact_sum FROM usage_billing.calculate_overage('pr_half', '2025-01-15');

-- zero-decimal currency: yen lines are whole yen, half away from zero
SELECT usage_billing.create_meter('pr_yen_calls');
SELECT usage_billing.create_plan('pr_yen_plan', base_price => 980.5, currency => 'jpy');
SELECT usage_billing.set_plan_limit('pr_yen_plan', 'pr_yen_calls', included => 100, overage_price => 0.5);
SELECT pg_temp.customers_with_totals('pr_yen_', 'pr_yen_plan', 'pr_yen_calls', '{103, 104, 100}');
SELECT o.total, o.overage_cost, o.currency, i.amount
  FROM usage_billing.customers c,
       LATERAL usage_billing.calculate_overage(c.customer_id, '2025-01-15') o,
       LATERAL usage_billing.preview_invoice(c.customer_id, '2025-01-15') i
 WHERE c.customer_id LIKE 'pr\_yen\_%' AND i.line = 'usage' ORDER BY o.total;
SELECT * FROM usage_billing.preview_invoice('pr_yen_103', '2025-01-15');

-- not billed: no price, or a price without included; a limit row with neither tiers nor included
SELECT usage_billing.create_meter('pr_unpriced');
SELECT usage_billing.create_meter('pr_unlimited_priced');
SELECT usage_billing.create_plan('pr_nobill_plan', base_price => 1);
SELECT usage_billing.set_plan_limit('pr_nobill_plan', 'pr_unpriced', included => 10);
SELECT usage_billing.set_plan_limit('pr_nobill_plan', 'pr_unlimited_priced', overage_price => 1);
SELECT usage_billing.upsert_customer('pr_nobill', 'pr_nobill_plan', '2025-01-01 00:00:00+00');
SELECT pg_temp.set_total('pr_nobill', 'pr_unpriced', 50);
SELECT pg_temp.set_total('pr_nobill', 'pr_unlimited_priced', 50);
SELECT count(*) AS billed_meters FROM usage_billing.calculate_overage('pr_nobill', '2025-01-15');
SELECT * FROM usage_billing.preview_invoice('pr_nobill', '2025-01-15');
