/*-------------------------------------------------------------------------
 * pricing.c
 *	  Exact pricing of usage: tiers, overage, status and money rounding.
 *
 * Everything here is numeric: money never passes through floating point.
 * A meter is "billed" for a customer when its effective limit has tiers, or
 * has both an overage price and an included quantity.  Only invoice lines
 * are rounded (to the currency's minor unit, half away from zero); costs
 * returned elsewhere are exact.
 *
 * Tiers follow Stripe: up_to is inclusive, the last tier is open-ended.
 * Graduated pricing charges each slice (up_to[i-1], up_to[i]] at its tier's
 * price plus the flat fee of every tier reached; volume pricing charges the
 * whole total at the price of the tier it falls in, plus that tier's fee.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "pricing.h"

/* Prices a period's total quantity with a tier list. */
Numeric
ub_tiers_price(const UbTiers *tiers, Numeric total)
{
	Numeric		cost = ub_num_zero();
	Numeric		lower = ub_num_zero();

	if (tiers->volume)
	{
		for (int i = 0; i < tiers->ntiers; i++)
		{
			const UbTier *t = &tiers->tiers[i];

			if (t->up_to == NULL || ub_num_cmp(total, t->up_to) <= 0)
				return ub_num_add(ub_num_mul(total, t->unit_price), t->flat_fee);
		}
		elog(ERROR, "volume tiers without an open-ended tier");
	}

	for (int i = 0; i < tiers->ntiers; i++)
	{
		const UbTier *t = &tiers->tiers[i];
		Numeric		upper;

		if (ub_num_cmp(total, lower) <= 0)
			break;
		upper = (t->up_to == NULL || ub_num_cmp(total, t->up_to) < 0) ? total : t->up_to;
		cost = ub_num_add(cost, ub_num_mul(ub_num_sub(upper, lower), t->unit_price));
		cost = ub_num_add(cost, t->flat_fee);
		if (t->up_to == NULL)
			break;
		lower = t->up_to;
	}
	return cost;
}

/* Is this meter priced at all for the customer? */
bool
ub_limit_is_billed(const UbLimit *limit)
{
	if (!limit->exists)
		return false;
	return limit->tiers != NULL ||
		(limit->overage_price != NULL && limit->included != NULL);
}

/* max(total - included, 0); NULL when unlimited. */
Numeric
ub_overage_quantity(const UbLimit *limit, Numeric total)
{
	if (!limit->exists || limit->included == NULL)
		return NULL;
	return ub_num_max(ub_num_sub(total, limit->included), ub_num_zero());
}

/* The exact usage cost of a period's total; NULL when the meter is not billed. */
Numeric
ub_usage_cost(const UbLimit *limit, Numeric total)
{
	Numeric		over;
	Numeric		cost;

	if (!ub_limit_is_billed(limit))
		return NULL;
	if (limit->tiers != NULL)
		return ub_tiers_price(limit->tiers, total);

	over = ub_overage_quantity(limit, total);
	cost = ub_num_mul(limit->overage_price, over);
	if (ub_num_cmp(limit->overage_unit, ub_num_int(1)) != 0)
		cost = ub_num_div(cost, limit->overage_unit);
	return cost;
}

/* included - total floored at 0; NULL when unlimited. */
Numeric
ub_remaining(const UbLimit *limit, Numeric total)
{
	if (!limit->exists || limit->included == NULL)
		return NULL;
	return ub_num_max(ub_num_sub(limit->included, total), ub_num_zero());
}

/* 'ok', 'warning' (at or above the soft threshold) or 'over_limit' (above included). */
const char *
ub_usage_status(const UbLimit *limit, Numeric total)
{
	if (!limit->exists || limit->included == NULL)
		return "ok";
	if (ub_num_cmp(total, limit->included) > 0)
		return "over_limit";
	/* included 0 with total 0 is simply ok: there is nothing to warn about yet */
	if (limit->soft_threshold != NULL &&
		ub_num_cmp(limit->included, ub_num_zero()) > 0 &&
		ub_num_cmp(total, ub_num_mul(limit->soft_threshold, limit->included)) >= 0)
		return "warning";
	return "ok";
}

/* Minor-unit digits of a currency, as Stripe counts them. */
int
ub_currency_decimals(const char *currency)
{
	static const char *const zero_decimal[] = {
		"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf",
		"ugx", "vnd", "vuv", "xaf", "xof", "xpf", NULL
	};
	static const char *const three_decimal[] = {
		"bhd", "jod", "kwd", "omr", "tnd", NULL
	};

	for (int i = 0; zero_decimal[i] != NULL; i++)
		if (pg_strcasecmp(currency, zero_decimal[i]) == 0)
			return 0;
	for (int i = 0; three_decimal[i] != NULL; i++)
		if (pg_strcasecmp(currency, three_decimal[i]) == 0)
			return 3;
	return 2;
}

/* Rounds an amount to the currency's minor unit, half away from zero. */
Numeric
ub_round_money(Numeric amount, const char *currency)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_round,
											   NumericGetDatum(amount),
											   Int32GetDatum(ub_currency_decimals(currency))));
}
