/*-------------------------------------------------------------------------
 * tiers.c
 *	  Reading and checking the tiers of a limit row.
 *
 * Vocabulary
 *	 tiers		the JSON array of a plan limit or override, [{up_to, unit_price,
 *				flat_fee}], stored by the catalog and priced by pricing.c
 *	 up_to		a tier's inclusive upper bound; null on the last, open-ended tier
 *	 mode		graduated (each slice at its tier's price) or volume (the whole
 *				total at the price of the tier it falls in)
 *
 * Tiers follow Stripe: bounds strictly increase, prices and fees are finite
 * and not negative, unknown keys are refused (most likely typos).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "num.h"
#include "tiers.h"

PG_FUNCTION_INFO_V1(ub_validate_tiers);

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
