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

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/relcache.h"
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

/* Prepares a statement into *slot on first use; the plan lives as long as the backend. */
SPIPlanPtr
ub_prepare_once(SPIPlanPtr *slot, const char *sql, int nargs, Oid *types)
{
	if (*slot == NULL)
		*slot = prepare_saved(sql, nargs, types);
	return *slot;
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
 * Reads the row of usage_billing.<relname> whose primary key equals keyvals,
 * straight from the index, and copies the named columns.  This is the cache
 * miss path of the hot path: an executor start per miss costs more than the
 * whole call, and a new connection misses on every customer it meets.
 */
static bool
probe_row(const char *relname, int nkeys, const Datum *keyvals, Snapshot snap,
		  int ncols, const char *const *colnames, Datum *values, bool *nulls)
{
	Oid			nsp = get_namespace_oid("usage_billing", false);
	Oid			relid = get_relname_relid(relname, nsp);
	Relation	rel;
	Relation	idx;
	TupleDesc	desc;
	ScanKeyData keys[2];
	IndexScanDesc scan;
	TupleTableSlot *slot;
	bool		found;

	Assert(nkeys <= 2);
	if (!OidIsValid(relid))
		elog(ERROR, "usage_billing.%s is missing", relname);
	rel = table_open(relid, AccessShareLock);
	idx = index_open(RelationGetPrimaryKeyIndex(rel), AccessShareLock);
	desc = RelationGetDescr(rel);

	/* text keys, compared in the index's own collations as the planner would */
	for (int k = 0; k < nkeys; k++)
		ScanKeyEntryInitialize(&keys[k], 0, k + 1, BTEqualStrategyNumber, InvalidOid,
							   idx->rd_indcollation[k], F_TEXTEQ, keyvals[k]);
	scan = index_beginscan(rel, idx, snap, nkeys, 0);
	index_rescan(scan, keys, nkeys, NULL, 0);
	slot = table_slot_create(rel, NULL);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	for (int c = 0; found && c < ncols; c++)
	{
		int			attnum = InvalidAttrNumber;

		for (int a = 0; a < desc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, a);

			if (!att->attisdropped && strcmp(NameStr(att->attname), colnames[c]) == 0)
			{
				attnum = a + 1;
				break;
			}
		}
		if (attnum == InvalidAttrNumber)
			elog(ERROR, "usage_billing.%s has no column \"%s\"", relname, colnames[c]);
		values[c] = slot_getattr(slot, attnum, &nulls[c]);
		if (!nulls[c])
			values[c] = datumCopy(values[c], TupleDescAttr(desc, attnum - 1)->attbyval,
								  TupleDescAttr(desc, attnum - 1)->attlen);
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(idx, AccessShareLock);
	table_close(rel, AccessShareLock);
	return found;
}

/*
 * The part of a target that does not depend on the customer: the plan, the
 * meter and the plan's limit row for it.  Few distinct, so cached by
 * (plan, meter) and read with SQL on a miss.
 */
static void
lookup_plan_part(const char *plan, const char *meter, uint64 generation,
				 UbCustomer *plan_part, UbMeter *m, bool *meter_found, UbLimit *plan_limit)
{
	Datum		args[2];
	int			ret;
	HeapTuple	tup;
	TupleDesc	desc;
	char	   *agg;
	bool		isnull;

	if (ub_static_cache_get(plan, meter, plan_part, m, meter_found, plan_limit))
		return;

	if (target_plan == NULL)
	{
		Oid			types[2] = {TEXTOID, TEXTOID};

		target_plan = prepare_saved(
			"SELECT p.period, p.base_price, p.currency,"
			"       m.aggregation, m.value_property, m.stripe_event_name,"
			"       pl.plan IS NOT NULL,"
			"       pl.included, pl.hard_cap, pl.overage_price, pl.overage_unit,"
			"       pl.soft_threshold, pl.tiers, pl.tier_mode"
			"  FROM usage_billing.plans p"
			"  LEFT JOIN usage_billing.meters m ON m.meter = $2"
			"  LEFT JOIN usage_billing.plan_limits pl ON pl.plan = p.plan AND pl.meter = $2"
			" WHERE p.plan = $1", 2, types);
	}
	args[0] = CStringGetTextDatum(plan);
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
		elog(ERROR, "plan lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		elog(ERROR, "plan \"%s\" of a customer does not exist", plan);

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	memset(plan_part, 0, sizeof(UbCustomer));
	plan_part->plan = pstrdup(plan);
	plan_part->period = *DatumGetIntervalP(SPI_getbinval(tup, desc, 1, &isnull));
	plan_part->base_price = col_numeric(tup, desc, 2);
	plan_part->currency = col_text(tup, desc, 3);

	memset(plan_limit, 0, sizeof(UbLimit));
	agg = col_text(tup, desc, 4);
	*meter_found = (agg != NULL);
	if (*meter_found)
	{
		m->meter = pstrdup(meter);
		m->aggregation = ub_parse_aggregation(agg);
		m->value_property = col_text(tup, desc, 5);
		m->stripe_event_name = col_text(tup, desc, 6);
		plan_limit->meter = m->meter;
		plan_limit->aggregation = m->aggregation;
		plan_limit->exists = col_bool(tup, desc, 7);
		if (plan_limit->exists)
			fill_limit(tup, desc, 8, plan_limit);
	}
	SPI_freetuptable(SPI_tuptable);
	ub_static_cache_put(generation, plan, meter, plan_part, m, *meter_found, plan_limit);
}

/*
 * The customer row and its override with SQL, for distributed tables
 * (usage_billing.direct_reads = off): same columns as the index probes.
 */
static bool
read_customer_sql(const Datum *keys, Datum *cv, bool *cn, bool *overridden, Datum *ov, bool *on)
{
	static SPIPlanPtr plan = NULL;
	int			ret;
	HeapTuple	tup;
	TupleDesc	desc;

	if (plan == NULL)
	{
		Oid			types[2] = {TEXTOID, TEXTOID};

		plan = prepare_saved(
			"SELECT c.plan, c.billing_anchor, c.stripe_customer_id, c.status,"
			"       cl.customer_id IS NOT NULL, cl.included, cl.hard_cap"
			"  FROM usage_billing.customers c"
			"  LEFT JOIN usage_billing.customer_limits cl"
			"         ON cl.customer_id = c.customer_id AND cl.meter = $2"
			" WHERE c.customer_id = $1", 2, types);
	}
	ret = SPI_execute_snapshot(plan, (Datum *) keys, NULL, GetLatestSnapshot(), InvalidSnapshot,
							   true, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "customer lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	for (int c = 0; c < 4; c++)
	{
		cv[c] = SPI_getbinval(tup, desc, c + 1, &cn[c]);
		if (!cn[c])
			cv[c] = datumCopy(cv[c], TupleDescAttr(desc, c)->attbyval, TupleDescAttr(desc, c)->attlen);
	}
	*overridden = col_bool(tup, desc, 5);
	for (int c = 0; c < 2; c++)
	{
		ov[c] = SPI_getbinval(tup, desc, c + 6, &on[c]);
		if (!on[c])
			ov[c] = datumCopy(ov[c], TupleDescAttr(desc, c + 5)->attbyval, TupleDescAttr(desc, c + 5)->attlen);
	}
	SPI_freetuptable(SPI_tuptable);
	return true;
}

/*
 * Looks up the customer, the meter and the effective limit of that meter for
 * the customer: what every hot-path call needs.  Returns false when the
 * customer does not exist; *meter_found says whether the meter does.
 */
bool
ub_lookup_usage_target(const char *customer_id, const char *meter,
					   UbCustomer *customer, UbMeter *m, bool *meter_found,
					   UbLimit *limit)
{
	static const char *const customer_cols[] = {"plan", "billing_anchor", "stripe_customer_id", "status"};
	static const char *const override_cols[] = {"included", "hard_cap"};
	Datum		keys[2];
	Datum		cv[4];
	bool		cn[4];
	Datum		ov[2];
	bool		on[2];
	bool		overridden = false;
	Snapshot	snap;
	uint64		generation;
	UbCustomer	plan_part;

	if (ub_cache_get(customer_id, meter, customer, m, meter_found, limit))
		return true;
	generation = ub_cache_generation();

	keys[0] = CStringGetTextDatum(customer_id);
	keys[1] = CStringGetTextDatum(meter);
	if (!ub_direct_reads)
	{
		if (!read_customer_sql(keys, cv, cn, &overridden, ov, on))
			return false;
	}
	else
	{
		/* fresh, for the same reason as in lookup_plan_part */
		snap = RegisterSnapshot(GetLatestSnapshot());
		if (!probe_row("customers", 1, keys, snap, 4, customer_cols, cv, cn))
		{
			UnregisterSnapshot(snap);
			return false;
		}
		overridden = probe_row("customer_limits", 2, keys, snap, 2, override_cols, ov, on);
		UnregisterSnapshot(snap);
	}

	lookup_plan_part(TextDatumGetCString(cv[0]), meter, generation, &plan_part, m, meter_found, limit);

	customer->customer_id = pstrdup(customer_id);
	customer->plan = TextDatumGetCString(cv[0]);
	customer->billing_anchor = DatumGetTimestampTz(cv[1]);
	customer->stripe_customer_id = cn[2] ? NULL : TextDatumGetCString(cv[2]);
	customer->status = TextDatumGetCString(cv[3]);
	customer->period = plan_part.period;
	customer->base_price = plan_part.base_price;
	customer->currency = plan_part.currency;

	/* the override replaces included, and hard_cap unless it leaves it NULL */
	if (*meter_found && overridden)
	{
		if (!limit->exists)
		{
			limit->exists = true;
			limit->hard_cap = false;
			limit->overage_price = NULL;
			limit->overage_unit = ub_num_int(1);
			limit->soft_threshold = DatumGetNumeric(DirectFunctionCall3(numeric_in,
																		CStringGetDatum("0.8"),
																		ObjectIdGetDatum(InvalidOid),
																		Int32GetDatum(-1)));
			limit->tiers = NULL;
		}
		limit->included = DatumGetNumeric(ov[0]);
		if (!on[1])
			limit->hard_cap = DatumGetBool(ov[1]);
	}

	ub_cache_put(generation, customer_id, meter, customer, m, *meter_found, limit);
	return true;
}

#define LIMIT_LIST_SQL(source, keycol) \
	"SELECT l.meter, m.aggregation," \
	"       l.included, l.hard_cap, l.overage_price, l.overage_unit," \
	"       l.soft_threshold, l.tiers, l.tier_mode" \
	"  FROM " source " l" \
	"  JOIN usage_billing.meters m ON m.meter = l.meter" \
	" WHERE l." keycol " = $1" \
	" ORDER BY l.meter"

/* Runs one of the limit-list statements for a key; a List of UbLimit ordered by meter. */
static List *
limit_list(SPIPlanPtr *slot, const char *sql, const char *key)
{
	Oid			types[1] = {TEXTOID};
	Datum		args[1];
	int			ret;
	List	   *result = NIL;

	ub_prepare_once(slot, sql, 1, types);
	args[0] = CStringGetTextDatum(key);
	ret = SPI_execute_plan(*slot, args, NULL, true, 0);
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

/* Every effective limit of a customer, ordered by meter, as a List of UbLimit. */
List *
ub_customer_limits(const UbCustomer *customer)
{
	return limit_list(&limits_plan,
					  LIMIT_LIST_SQL("usage_billing.effective_limits", "customer_id"),
					  customer->customer_id);
}

/* The limits of a plan as written, ignoring customer overrides (plan comparisons), ordered by meter. */
List *
ub_plan_limits(const char *plan)
{
	return limit_list(&plan_limits_plan,
					  LIMIT_LIST_SQL("usage_billing.plan_limits", "plan"),
					  plan);
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
