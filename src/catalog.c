/*-------------------------------------------------------------------------
 * catalog.c
 *	  Lookups of customers, meters and effective limits for the C paths.
 *
 * The "effective limit" of a customer and meter is the plan's limit row with
 * the customer's override (customer_limits) applied: an override replaces
 * included, and hard_cap unless the override leaves it NULL.  A meter with
 * neither is unlimited and not billed.
 *
 * Every lookup is one SPI execution of a plan prepared once per backend
 * (SPI_keepplan), so the hot path pays no parse or plan cost; usage targets
 * are also cached per backend (catalog_cache.c).  Results are
 * palloc'd in the caller's memory context (the SPI procedure context when
 * called between SPI_connect and SPI_finish).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "catalog_cache.h"
#include "pricing.h"
#include "usage_billing.h"

static SPIPlanPtr customer_plan = NULL;
static SPIPlanPtr target_plan = NULL;
static SPIPlanPtr limits_plan = NULL;
static SPIPlanPtr plan_limits_plan = NULL;

/* Prepares a statement once per backend and keeps it. */
static SPIPlanPtr
prepare_saved(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/* Column accessors that copy out of the SPI tuple table. */
static char *
col_text(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

static Numeric
col_numeric(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : DatumGetNumericCopy(d);
}

static bool
col_bool(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? false : DatumGetBool(d);
}

/* Fills the customer from columns 1..7 of a lookup row. */
static void
fill_customer(const char *customer_id, HeapTuple tup, TupleDesc desc, UbCustomer *c)
{
	bool		isnull;

	c->customer_id = pstrdup(customer_id);
	c->plan = col_text(tup, desc, 1);
	c->billing_anchor = DatumGetTimestampTz(SPI_getbinval(tup, desc, 2, &isnull));
	c->period = *DatumGetIntervalP(SPI_getbinval(tup, desc, 3, &isnull));
	c->status = col_text(tup, desc, 4);
	c->stripe_customer_id = col_text(tup, desc, 5);
	c->base_price = col_numeric(tup, desc, 6);
	c->currency = col_text(tup, desc, 7);
}

/* Fills a limit from seven consecutive columns starting at "first". */
static void
fill_limit(HeapTuple tup, TupleDesc desc, int first, UbLimit *l)
{
	bool		isnull;
	Datum		tiers;
	char	   *mode;

	l->included = col_numeric(tup, desc, first);
	l->hard_cap = col_bool(tup, desc, first + 1);
	l->overage_price = col_numeric(tup, desc, first + 2);
	l->overage_unit = col_numeric(tup, desc, first + 3);
	if (l->overage_unit == NULL)
		l->overage_unit = ub_num_int(1);
	l->soft_threshold = col_numeric(tup, desc, first + 4);
	tiers = SPI_getbinval(tup, desc, first + 5, &isnull);
	mode = col_text(tup, desc, first + 6);
	l->tiers = isnull ? NULL :
		ub_parse_tiers(DatumGetJsonbPCopy(tiers), mode != NULL && strcmp(mode, "volume") == 0);
}

#define CUSTOMER_COLUMNS \
	"c.plan, c.billing_anchor, p.period, c.status, c.stripe_customer_id, p.base_price, p.currency"

/* Looks up a customer with its plan; false when there is no such customer. */
bool
ub_lookup_customer(const char *customer_id, UbCustomer *customer)
{
	Datum		args[1];
	int			ret;

	if (customer_plan == NULL)
	{
		Oid			types[1] = {TEXTOID};

		customer_plan = prepare_saved(
			"SELECT " CUSTOMER_COLUMNS
			"  FROM usage_billing.customers c"
			"  JOIN usage_billing.plans p ON p.plan = c.plan"
			" WHERE c.customer_id = $1", 1, types);
	}
	args[0] = CStringGetTextDatum(customer_id);
	ret = SPI_execute_plan(customer_plan, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "customer lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	fill_customer(customer_id, SPI_tuptable->vals[0], SPI_tuptable->tupdesc, customer);
	SPI_freetuptable(SPI_tuptable);
	return true;
}

/*
 * Looks up, in one round, the customer, the meter and the effective limit of
 * that meter for the customer: what every hot-path call needs.  Returns false
 * when the customer does not exist; *meter_found says whether the meter does.
 */
bool
ub_lookup_usage_target(const char *customer_id, const char *meter,
					   UbCustomer *customer, UbMeter *m, bool *meter_found,
					   UbLimit *limit)
{
	Datum		args[2];
	int			ret;
	HeapTuple	tup;
	TupleDesc	desc;
	char	   *agg;
	uint64		generation;

	if (ub_cache_get(customer_id, meter, customer, m, meter_found, limit))
		return true;
	generation = ub_cache_generation();

	if (target_plan == NULL)
	{
		Oid			types[2] = {TEXTOID, TEXTOID};

		target_plan = prepare_saved(
			"SELECT " CUSTOMER_COLUMNS ","
			"       m.aggregation, m.value_property, m.stripe_event_name,"
			"       (pl.plan IS NOT NULL OR cl.customer_id IS NOT NULL),"
			"       CASE WHEN cl.customer_id IS NOT NULL THEN cl.included ELSE pl.included END,"
			"       coalesce(cl.hard_cap, pl.hard_cap, false),"
			"       pl.overage_price, pl.overage_unit,"
			"       CASE WHEN pl.plan IS NULL THEN 0.8 ELSE pl.soft_threshold END,"
			"       pl.tiers, pl.tier_mode"
			"  FROM usage_billing.customers c"
			"  JOIN usage_billing.plans p ON p.plan = c.plan"
			"  LEFT JOIN usage_billing.meters m ON m.meter = $2"
			"  LEFT JOIN usage_billing.plan_limits pl ON pl.plan = c.plan AND pl.meter = $2"
			"  LEFT JOIN usage_billing.customer_limits cl"
			"         ON cl.customer_id = c.customer_id AND cl.meter = $2"
			" WHERE c.customer_id = $1", 2, types);
	}
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);

	/*
	 * What we cache must be at least as new as the invalidations we have
	 * processed, or a change committed after the statement's (or a repeatable
	 * read transaction's) snapshot would be cached as if it never happened.
	 * Read with a fresh snapshot, as PostgreSQL reads its own catalogs.
	 */
	ret = SPI_execute_snapshot(target_plan, args, NULL, GetLatestSnapshot(), InvalidSnapshot,
							   true, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "usage target lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	fill_customer(customer_id, tup, desc, customer);

	memset(limit, 0, sizeof(UbLimit));
	agg = col_text(tup, desc, 8);
	*meter_found = (agg != NULL);
	if (*meter_found)
	{
		m->meter = pstrdup(meter);
		m->aggregation = ub_parse_aggregation(agg);
		m->value_property = col_text(tup, desc, 9);
		m->stripe_event_name = col_text(tup, desc, 10);

		limit->meter = m->meter;
		limit->aggregation = m->aggregation;
		limit->exists = col_bool(tup, desc, 11);
		if (limit->exists)
			fill_limit(tup, desc, 12, limit);
	}
	SPI_freetuptable(SPI_tuptable);
	ub_cache_put(generation, customer_id, meter, customer, m, *meter_found, limit);
	return true;
}

/* Every effective limit of a customer, ordered by meter, as a List of UbLimit. */
List *
ub_customer_limits(const UbCustomer *customer)
{
	Datum		args[1];
	int			ret;
	List	   *result = NIL;

	if (limits_plan == NULL)
	{
		Oid			types[1] = {TEXTOID};

		limits_plan = prepare_saved(
			"SELECT l.meter, m.aggregation,"
			"       l.included, l.hard_cap, l.overage_price, l.overage_unit,"
			"       l.soft_threshold, l.tiers, l.tier_mode"
			"  FROM usage_billing.effective_limits l"
			"  JOIN usage_billing.meters m ON m.meter = l.meter"
			" WHERE l.customer_id = $1"
			" ORDER BY l.meter", 1, types);
	}
	args[0] = CStringGetTextDatum(customer->customer_id);
	ret = SPI_execute_plan(limits_plan, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "limit lookup failed: %s", SPI_result_code_string(ret));

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		UbLimit    *l = palloc0(sizeof(UbLimit));

		l->meter = col_text(tup, desc, 1);
		l->aggregation = ub_parse_aggregation(col_text(tup, desc, 2));
		l->exists = true;
		fill_limit(tup, desc, 3, l);
		result = lappend(result, l);
	}
	SPI_freetuptable(SPI_tuptable);
	return result;
}

/* The limits of a plan as written, ignoring customer overrides (plan comparisons), ordered by meter. */
List *
ub_plan_limits(const char *plan)
{
	Datum		args[1];
	int			ret;
	List	   *result = NIL;

	if (plan_limits_plan == NULL)
	{
		Oid			types[1] = {TEXTOID};

		plan_limits_plan = prepare_saved(
			"SELECT l.meter, m.aggregation,"
			"       l.included, l.hard_cap, l.overage_price, l.overage_unit,"
			"       l.soft_threshold, l.tiers, l.tier_mode"
			"  FROM usage_billing.plan_limits l"
			"  JOIN usage_billing.meters m ON m.meter = l.meter"
			" WHERE l.plan = $1"
			" ORDER BY l.meter", 1, types);
	}
	args[0] = CStringGetTextDatum(plan);
	ret = SPI_execute_plan(plan_limits_plan, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "plan limit lookup failed: %s", SPI_result_code_string(ret));

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		UbLimit    *l = palloc0(sizeof(UbLimit));

		l->meter = col_text(tup, desc, 1);
		l->aggregation = ub_parse_aggregation(col_text(tup, desc, 2));
		l->exists = true;
		fill_limit(tup, desc, 3, l);
		result = lappend(result, l);
	}
	SPI_freetuptable(SPI_tuptable);
	return result;
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

/* Raises 22023 for a NULL, empty or over-long name argument. */
void
ub_check_name(const char *what, const char *value, int maxlen)
{
	if (value == NULL || value[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what),
				 errdetail("The %s given was %s.", what, value == NULL ? "NULL" : "an empty string")));
	if (strlen(value) > (size_t) maxlen)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long", what),
				 errdetail("The %s has %zu bytes; at most %d are allowed.", what, strlen(value), maxlen)));
}
