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

PG_FUNCTION_INFO_V1(ub_validate_tiers);

/* Sums two numerics. */
Numeric
ub_num_add(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_add, NumericGetDatum(a), NumericGetDatum(b)));
}

/* Subtracts b from a. */
Numeric
ub_num_sub(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_sub, NumericGetDatum(a), NumericGetDatum(b)));
}

/* Multiplies two numerics. */
Numeric
ub_num_mul(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_mul, NumericGetDatum(a), NumericGetDatum(b)));
}

/* Divides, then drops the trailing zeros numeric division pads its result with. */
Numeric
ub_num_div(Numeric a, Numeric b)
{
	Datum		q = DirectFunctionCall2(numeric_div, NumericGetDatum(a), NumericGetDatum(b));

	return DatumGetNumeric(DirectFunctionCall1(numeric_trim_scale, q));
}

/* Three-way comparison. */
int
ub_num_cmp(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a), NumericGetDatum(b)));
}

/* A fresh numeric zero. */
Numeric
ub_num_zero(void)
{
	return int64_to_numeric(0);
}

/* A numeric from an integer. */
Numeric
ub_num_int(int64 v)
{
	return int64_to_numeric(v);
}

/* The larger of two numerics. */
Numeric
ub_num_max(Numeric a, Numeric b)
{
	return ub_num_cmp(a, b) >= 0 ? a : b;
}

/* A numeric as text, for messages and reports. */
char *
ub_num_str(Numeric n)
{
	return DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(n)));
}

/* NaN or an infinity: values that must never reach a total or a price. */
bool
ub_num_is_special(Numeric a)
{
	return numeric_is_nan(a) || numeric_is_inf(a);
}

/* Reads an optional number member of a tier object; reports what is wrong with it. */
static Numeric
tier_number(JsonbContainer *tier, const char *key, int index, bool null_ok, bool *present)
{
	JsonbValue	v;

	*present = getKeyJsonValueFromContainer(tier, key, strlen(key), &v) != NULL;
	if (!*present)
		return NULL;
	if (v.type == jbvNull)
	{
		if (null_ok)
			return NULL;
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid tiers"),
				 errdetail("Tier %d has a null \"%s\".", index + 1, key)));
	}
	if (v.type != jbvNumeric)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid tiers"),
				 errdetail("Tier %d has a \"%s\" that is not a number.", index + 1, key)));
	if (ub_num_cmp(v.val.numeric, ub_num_zero()) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid tiers"),
				 errdetail("Tier %d has a negative \"%s\".", index + 1, key)));
	return v.val.numeric;
}

/* Parses and validates a tier list; raises 22023 with a precise detail when it is invalid. */
UbTiers *
ub_parse_tiers(Jsonb *tiers, bool volume)
{
	int			n;
	UbTiers    *result;
	Numeric		prev = NULL;

	if (!JB_ROOT_IS_ARRAY(tiers) || JB_ROOT_IS_SCALAR(tiers))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid tiers"),
				 errdetail("Tiers must be a JSON array of objects."),
				 errhint("For example: [{\"up_to\": 1000, \"unit_price\": 0}, {\"up_to\": null, \"unit_price\": 0.001}].")));
	n = JB_ROOT_COUNT(tiers);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid tiers"),
				 errdetail("The tier list is empty.")));

	result = palloc0(offsetof(UbTiers, tiers) + n * sizeof(UbTier));
	result->volume = volume;
	result->ntiers = n;

	for (int i = 0; i < n; i++)
	{
		JsonbValue *elem = getIthJsonbValueFromContainer(&tiers->root, i);
		JsonbContainer *obj;
		JsonbIterator *it;
		JsonbValue	kv;
		JsonbIteratorToken tok;
		bool		has_up_to,
					has_price,
					has_fee;

		if (elem == NULL || elem->type != jbvBinary || !JsonContainerIsObject(elem->val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid tiers"),
					 errdetail("Tier %d is not a JSON object.", i + 1)));
		obj = elem->val.binary.data;

		/* unknown keys are most likely typos ("upto"); refuse them rather than guess */
		it = JsonbIteratorInit(obj);
		while ((tok = JsonbIteratorNext(&it, &kv, true)) != WJB_DONE)
		{
			if (tok == WJB_KEY)
			{
				char	   *key = pnstrdup(kv.val.string.val, kv.val.string.len);

				if (strcmp(key, "up_to") != 0 && strcmp(key, "unit_price") != 0 &&
					strcmp(key, "flat_fee") != 0)
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("invalid tiers"),
							 errdetail("Tier %d has an unknown key \"%s\".", i + 1, key),
							 errhint("A tier has up_to, unit_price and optionally flat_fee.")));
			}
		}

		result->tiers[i].up_to = tier_number(obj, "up_to", i, true, &has_up_to);
		result->tiers[i].unit_price = tier_number(obj, "unit_price", i, false, &has_price);
		result->tiers[i].flat_fee = tier_number(obj, "flat_fee", i, false, &has_fee);
		if (!has_up_to)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid tiers"),
					 errdetail("Tier %d has no \"up_to\".", i + 1),
					 errhint("Use \"up_to\": null for the last, open-ended tier.")));
		if (!has_price && !has_fee)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid tiers"),
					 errdetail("Tier %d has neither \"unit_price\" nor \"flat_fee\".", i + 1)));
		if (result->tiers[i].unit_price == NULL)
			result->tiers[i].unit_price = ub_num_zero();
		if (result->tiers[i].flat_fee == NULL)
			result->tiers[i].flat_fee = ub_num_zero();

		if (result->tiers[i].up_to == NULL)
		{
			if (i != n - 1)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid tiers"),
						 errdetail("Only the last tier may be open-ended, but tier %d is.", i + 1)));
		}
		else
		{
			if (i == n - 1)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid tiers"),
						 errdetail("The last tier must be open-ended."),
						 errhint("Give the last tier \"up_to\": null.")));
			if (prev != NULL && ub_num_cmp(result->tiers[i].up_to, prev) <= 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid tiers"),
						 errdetail("Tier %d does not end above tier %d: \"up_to\" must increase.", i + 1, i)));
			prev = result->tiers[i].up_to;
		}
	}
	return result;
}

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

/* SQL: validate_tiers(jsonb) raises 22023 unless the tier list is valid. */
Datum
ub_validate_tiers(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid tiers"),
				 errdetail("The tier list is NULL.")));
	(void) ub_parse_tiers(PG_GETARG_JSONB_P(0), false);
	PG_RETURN_VOID();
}
