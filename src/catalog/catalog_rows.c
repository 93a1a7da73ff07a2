/*-------------------------------------------------------------------------
 * catalog_rows.c
 *	  Decoding the catalog's SQL rows into the structs of catalog.h and
 *	  catalog_cache.h.
 *
 * Vocabulary
 *	 row		one SPI result row of a catalog lookup; "first" is the column
 *				at which the part being decoded starts, so that one statement
 *				can return several parts side by side
 *	 plan part	the plan's period, base price and currency
 *	 limit		the seven columns of a plan limit (included, hard_cap,
 *				overage_price, overage_unit, soft_threshold, tiers, tier_mode)
 *
 * Used by the lookups (catalog.c) and the preload (catalog_preload.c).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "catalog_cache.h"
#include "num.h"

/* Fills a limit from seven consecutive columns starting at "first". */
void
ub_fill_limit(HeapTuple tup, TupleDesc desc, int first, UbLimit *l)
{
	bool		isnull;
	Datum		tiers;
	char	   *mode;

	l->included = ub_col_numeric(tup, desc, first);
	l->hard_cap = ub_col_bool(tup, desc, first + 1);
	l->overage_price = ub_col_numeric(tup, desc, first + 2);
	l->overage_unit = ub_col_numeric(tup, desc, first + 3);
	if (l->overage_unit == NULL)
		l->overage_unit = ub_num_int(1);
	l->soft_threshold = ub_col_numeric(tup, desc, first + 4);
	tiers = SPI_getbinval(tup, desc, first + 5, &isnull);
	mode = ub_col_text(tup, desc, first + 6);
	l->tiers = isnull ? NULL :
		ub_parse_tiers(DatumGetJsonbPCopy(tiers), mode != NULL && strcmp(mode, "volume") == 0);
}

/* Fills a plan meter from the UB_PLAN_METER_COLUMNS starting at "first". */
void
ub_fill_plan_meter(HeapTuple tup, TupleDesc desc, int first, const char *plan, const char *meter,
				   UbPlanMeter *pm)
{
	bool		isnull;
	char	   *agg;

	memset(pm, 0, sizeof(UbPlanMeter));
	pm->plan_part.plan = pstrdup(plan);
	pm->plan_part.period = *DatumGetIntervalP(SPI_getbinval(tup, desc, first, &isnull));
	pm->plan_part.base_price = ub_col_numeric(tup, desc, first + 1);
	pm->plan_part.currency = ub_col_text(tup, desc, first + 2);
	pm->meter.meter = pstrdup(meter);
	agg = ub_col_text(tup, desc, first + 3);
	pm->meter_found = (agg != NULL);
	if (!pm->meter_found)
		return;
	pm->meter.aggregation = ub_parse_aggregation(agg);
	pm->meter.value_property = ub_col_text(tup, desc, first + 4);
	pm->meter.stripe_event_name = ub_col_text(tup, desc, first + 5);
	/* read through to_jsonb(m): NULL on a schema before 1.4, which takes the defaults */
	{
		Datum		d = SPI_getbinval(tup, desc, first + 14, &isnull);

		pm->meter.decimals = isnull ? UB_DEFAULT_DECIMALS : DatumGetInt32(d);
	}
	pm->meter.max_amount = ub_col_numeric(tup, desc, first + 15);
	if (pm->meter.max_amount == NULL)
		pm->meter.max_amount = ub_default_max_amount();
	pm->limit.meter = pm->meter.meter;
	pm->limit.aggregation = pm->meter.aggregation;
	pm->limit.exists = ub_col_bool(tup, desc, first + 6);
	if (pm->limit.exists)
		ub_fill_limit(tup, desc, first + 7, &pm->limit);
}

/* Fills a customer row (no overrides) from plan, billing_anchor, stripe_customer_id, status at "first". */
void
ub_fill_customer_row(HeapTuple tup, TupleDesc desc, int first, const char *customer_id,
					 UbCustomerRow *row)
{
	bool		isnull;

	row->customer_id = pstrdup(customer_id);
	row->plan = ub_col_text(tup, desc, first);
	row->billing_anchor = DatumGetTimestampTz(SPI_getbinval(tup, desc, first + 1, &isnull));
	row->stripe_customer_id = ub_col_text(tup, desc, first + 2);
	row->status = ub_col_text(tup, desc, first + 3);
	row->noverrides = 0;
	row->overrides = NULL;
	row->nplans = 0;
	row->plan_from = NULL;
	row->plan_names = NULL;
}

/* Fills an override from meter, included, hard_cap at "first". */
void
ub_fill_override(HeapTuple tup, TupleDesc desc, int first, UbOverride *o)
{
	o->meter = ub_col_text(tup, desc, first);
	o->included = ub_col_numeric(tup, desc, first + 1);
	(void) SPI_getbinval(tup, desc, first + 2, &o->hard_cap_null);
	o->hard_cap = ub_col_bool(tup, desc, first + 2);
}

/* Maps an aggregation name to its enum. */
UbAggregation
ub_parse_aggregation(const char *name)
{
	if (strcmp(name, "count") == 0)
		return UB_AGG_COUNT;
	if (strcmp(name, "sum") == 0)
		return UB_AGG_SUM;
	if (strcmp(name, "max") == 0)
		return UB_AGG_MAX;
	if (strcmp(name, "last") == 0)
		return UB_AGG_LAST;
	if (strcmp(name, "unique_count") == 0)
		return UB_AGG_UNIQUE_COUNT;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid aggregation \"%s\"", name)));
	pg_unreachable();
}

/* The SQL name of an aggregation. */
const char *
ub_aggregation_name(UbAggregation agg)
{
	switch (agg)
	{
		case UB_AGG_COUNT:
			return "count";
		case UB_AGG_SUM:
			return "sum";
		case UB_AGG_MAX:
			return "max";
		case UB_AGG_LAST:
			return "last";
		case UB_AGG_UNIQUE_COUNT:
			return "unique_count";
	}
	return "?";
}

/* The largest amount of one event on a meter that does not say (a schema before 1.4). */
Numeric
ub_default_max_amount(void)
{
	return DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(UB_DEFAULT_MAX_AMOUNT),
											   ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
}
