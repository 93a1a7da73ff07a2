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
 * are also cached per backend (catalog_cache.c).  A miss of the hot path
 * reads either everything at once (catalog_preload.c, when the cache is
 * empty and there are few enough customers) or the one customer with all its
 * overrides, from the indexes, and the (plan, meter) part with SQL.  The
 * effective limit is made by ub_build_target (catalog_target.c), from the
 * cache or from what was just read alike.  Results are palloc'd in the
 * caller's memory context (the SPI procedure context when called between
 * SPI_connect and SPI_finish).
 *
 * The row fillers (ub_fill_customer_row, ub_fill_override,
 * ub_fill_plan_meter) live here, used by the per-key reads and the preload
 * alike.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/xact.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "utils/acl.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "catalog_cache.h"
#include "catalog_preload.h"
#include "num.h"
#include "errors.h"
#include "citus.h"
#include "relations.h"

bool		ub_direct_reads = true;

static SPIPlanPtr customer_plan = NULL;
static SPIPlanPtr target_plan = NULL;
static SPIPlanPtr plan_limits_plan = NULL;

/* Fills the customer from columns 1..7 of a lookup row. */
static void
fill_customer(const char *customer_id, HeapTuple tup, TupleDesc desc, UbCustomer *c)
{
	bool		isnull;

	c->customer_id = pstrdup(customer_id);
	c->plan = ub_col_text(tup, desc, 1);
	c->billing_anchor = DatumGetTimestampTz(SPI_getbinval(tup, desc, 2, &isnull));
	c->period = *DatumGetIntervalP(SPI_getbinval(tup, desc, 3, &isnull));
	c->status = ub_col_text(tup, desc, 4);
	c->stripe_customer_id = ub_col_text(tup, desc, 5);
	c->base_price = ub_col_numeric(tup, desc, 6);
	c->currency = ub_col_text(tup, desc, 7);
}

#define CUSTOMER_COLUMNS \
	"c.plan, c.billing_anchor, p.period, c.status, c.stripe_customer_id, p.base_price, p.currency"

/*
 * Looks up a customer with the plan in force now (from its plan history when
 * the schema has one); false when there is no such customer.
 */
bool
ub_lookup_customer(const char *customer_id, UbCustomer *customer)
{
	static SPIPlanPtr history_customer_plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		args[1];
	int			ret;
	SPIPlanPtr	plan;

	if (ub_have_plan_history())
		plan = ub_prepare_once(&history_customer_plan,
							   "SELECT p.plan, c.billing_anchor, p.period, c.status, c.stripe_customer_id,"
							   "       p.base_price, p.currency"
							   "  FROM usage_billing.customers c"
							   "  JOIN usage_billing.plans p ON p.plan = coalesce("
							   "       (SELECT h.plan FROM usage_billing.customer_plans h"
							   "         WHERE h.customer_id = c.customer_id AND h.effective_from <= pg_catalog.now()"
							   "         ORDER BY h.effective_from DESC LIMIT 1), c.plan)"
							   " WHERE c.customer_id = $1", 1, types);
	else
		plan = ub_prepare_once(&customer_plan,
							   "SELECT " CUSTOMER_COLUMNS
							   "  FROM usage_billing.customers c"
							   "  JOIN usage_billing.plans p ON p.plan = c.plan"
							   " WHERE c.customer_id = $1", 1, types);
	args[0] = CStringGetTextDatum(customer_id);
	ret = SPI_execute_plan(plan, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "customer lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	fill_customer(customer_id, SPI_tuptable->vals[0], SPI_tuptable->tupdesc, customer);
	SPI_freetuptable(SPI_tuptable);
	return true;
}

/*
 * Reads the rows of usage_billing.<relname> whose primary key starts with
 * keyvals, straight from the index, and copies the named columns into
 * *values and *nulls, ncols a row; returns the number of rows.  This is the
 * cache miss path of the hot path: an executor start per miss costs more
 * than the whole call.
 */
static int
probe_rows(const char *relname, int nkeys, const Datum *keyvals, Snapshot snap,
		   int ncols, const char *const *colnames, Datum **values, bool **nulls)
{
	Oid			relid = ub_schema_relation(relname);
	Relation	rel;
	Relation	idx;
	TupleDesc	desc;
	ScanKeyData keys[2];
	AttrNumber	attnums[4];
	IndexScanDesc scan;
	TupleTableSlot *tuple;
	int			nrows = 0;
	int			cap = 1;

	Assert(nkeys <= 2 && ncols <= 4);
	if (!OidIsValid(relid))
		elog(ERROR, "usage_billing.%s is missing", relname);
	rel = table_open(relid, AccessShareLock);
	idx = index_open(RelationGetPrimaryKeyIndex(rel), AccessShareLock);
	desc = RelationGetDescr(rel);

	for (int c = 0; c < ncols; c++)
	{
		attnums[c] = InvalidAttrNumber;
		for (int a = 0; a < desc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, a);

			if (!att->attisdropped && strcmp(NameStr(att->attname), colnames[c]) == 0)
			{
				attnums[c] = a + 1;
				break;
			}
		}
		if (attnums[c] == InvalidAttrNumber)
			elog(ERROR, "usage_billing.%s has no column \"%s\"", relname, colnames[c]);
	}

	/* text keys, compared in the index's own collations as the planner would */
	for (int k = 0; k < nkeys; k++)
		ScanKeyEntryInitialize(&keys[k], 0, k + 1, BTEqualStrategyNumber, InvalidOid,
							   idx->rd_indcollation[k], F_TEXTEQ, keyvals[k]);
	scan = index_beginscan(rel, idx, snap, nkeys, 0);
	index_rescan(scan, keys, nkeys, NULL, 0);
	tuple = table_slot_create(rel, NULL);
	*values = palloc(cap * ncols * sizeof(Datum));
	*nulls = palloc(cap * ncols * sizeof(bool));
	while (index_getnext_slot(scan, ForwardScanDirection, tuple))
	{
		if (nrows == cap)
		{
			cap *= 2;
			*values = repalloc(*values, cap * ncols * sizeof(Datum));
			*nulls = repalloc(*nulls, cap * ncols * sizeof(bool));
		}
		for (int c = 0; c < ncols; c++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, attnums[c] - 1);
			Datum	   *v = &(*values)[nrows * ncols + c];
			bool	   *isnull = &(*nulls)[nrows * ncols + c];

			*v = slot_getattr(tuple, attnums[c], isnull);
			if (!*isnull)
				*v = datumCopy(*v, att->attbyval, att->attlen);
		}
		nrows++;
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(tuple);
	index_close(idx, AccessShareLock);
	table_close(rel, AccessShareLock);
	return nrows;
}

/*
 * The part of a target that does not depend on the customer: the plan, the
 * meter and the plan's limit row for it.  Few distinct, so cached by
 * (plan, meter) and read with SQL on a miss.
 */
static void
lookup_plan_meter(const char *plan, const char *meter, uint64 generation, UbPlanMeter *pm)
{
	Datum		args[2];
	int			ret;

	if (ub_static_cache_get(plan, meter, pm))
		return;

	if (target_plan == NULL)
	{
		Oid			types[2] = {TEXTOID, TEXTOID};

		target_plan = ub_prepare_saved_with(
			"SELECT " UB_PLAN_METER_COLUMNS
			"  FROM usage_billing.plans p"
			"  LEFT JOIN usage_billing.meters m ON m.meter = $2"
			"  LEFT JOIN usage_billing.plan_limits pl ON pl.plan = p.plan AND pl.meter = $2"
			" WHERE p.plan = $1", 2, types, CURSOR_OPT_GENERIC_PLAN);
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
	ub_fill_plan_meter(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, plan, meter, pm);
	SPI_freetuptable(SPI_tuptable);
	ub_static_cache_put(generation, pm);
}

/* Reads a customer and all its overrides straight from the indexes; false when there is none. */
static bool
read_customer_direct(const char *customer_id, Snapshot snap, UbCustomerRow *row)
{
	static const char *const customer_cols[] = {"plan", "billing_anchor", "stripe_customer_id", "status"};
	static const char *const override_cols[] = {"meter", "included", "hard_cap"};
	Datum		key = CStringGetTextDatum(customer_id);
	Datum	   *v;
	bool	   *n;
	int			noverrides;

	if (probe_rows("customers", 1, &key, snap, 4, customer_cols, &v, &n) == 0)
		return false;
	row->customer_id = pstrdup(customer_id);
	row->plan = TextDatumGetCString(v[0]);
	row->billing_anchor = DatumGetTimestampTz(v[1]);
	row->stripe_customer_id = n[2] ? NULL : TextDatumGetCString(v[2]);
	row->status = TextDatumGetCString(v[3]);

	noverrides = probe_rows("customer_limits", 1, &key, snap, 3, override_cols, &v, &n);
	row->noverrides = noverrides;
	row->overrides = noverrides > 0 ? palloc(noverrides * sizeof(UbOverride)) : NULL;
	for (int i = 0; i < noverrides; i++)
	{
		UbOverride *o = &row->overrides[i];

		o->meter = TextDatumGetCString(v[i * 3]);
		o->included = DatumGetNumeric(v[i * 3 + 1]);
		o->hard_cap_null = n[i * 3 + 2];
		o->hard_cap = !n[i * 3 + 2] && DatumGetBool(v[i * 3 + 2]);
	}

	row->nplans = 0;
	row->plan_from = NULL;
	row->plan_names = NULL;
	if (ub_have_plan_history())
	{
		static const char *const history_cols[] = {"effective_from", "plan"};
		int			nplans = probe_rows("customer_plans", 1, &key, snap, 2, history_cols, &v, &n);

		/* the primary key (customer_id, effective_from) returns them in order */
		for (int i = 0; i < nplans; i++)
			ub_row_add_plan(row, DatumGetTimestampTz(v[i * 2]), TextDatumGetCString(v[i * 2 + 1]));
	}
	return true;
}

/*
 * The same in single-table statements, for Citus (citus.c): Citus keeps a
 * generic plan of a one-table statement keyed by the distribution column and
 * picks the shard when it runs, where a join has to be planned anew for
 * every call.
 */
static bool
read_customer_single_tables(const char *customer_id, Snapshot snap, UbCustomerRow *row)
{
	static SPIPlanPtr customer_plan = NULL;
	static SPIPlanPtr overrides_plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		args[1];

	ub_prepare_routable(&customer_plan,
						"SELECT plan, billing_anchor, stripe_customer_id, status"
						"  FROM usage_billing.customers WHERE customer_id = $1", 1, types);
	ub_prepare_routable(&overrides_plan,
						"SELECT meter, included, hard_cap"
						"  FROM usage_billing.customer_limits WHERE customer_id = $1", 1, types);
	args[0] = CStringGetTextDatum(customer_id);
	if (SPI_execute_snapshot(customer_plan, args, NULL, snap, InvalidSnapshot, true, false, 1) !=
		SPI_OK_SELECT)
		elog(ERROR, "customer lookup failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_processed == 0)
		return false;
	ub_fill_customer_row(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, customer_id, row);
	SPI_freetuptable(SPI_tuptable);
	if (SPI_execute_snapshot(overrides_plan, args, NULL, snap, InvalidSnapshot, true, false, 0) !=
		SPI_OK_SELECT)
		elog(ERROR, "customer limit lookup failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_processed > 0)
		row->overrides = palloc(SPI_processed * sizeof(UbOverride));
	for (uint64 i = 0; i < SPI_processed; i++)
		ub_fill_override(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1,
						 &row->overrides[row->noverrides++]);
	SPI_freetuptable(SPI_tuptable);
	ub_read_plan_history(customer_id, snap, row);
	return true;
}

/*
 * The same with SQL, for distributed tables (usage_billing.direct_reads =
 * off): one row per override, or one with NULLs when there is none.
 */
static bool
read_customer_sql(const char *customer_id, Snapshot snap, UbCustomerRow *row)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[1];
	int			ret;
	TupleDesc	desc;

	if (ub_distributed())
		return read_customer_single_tables(customer_id, snap, row);
	if (plan == NULL)
	{
		Oid			types[1] = {TEXTOID};

		plan = ub_prepare_saved(
			"SELECT c.plan, c.billing_anchor, c.stripe_customer_id, c.status,"
			"       cl.meter, cl.included, cl.hard_cap"
			"  FROM usage_billing.customers c"
			"  LEFT JOIN usage_billing.customer_limits cl ON cl.customer_id = c.customer_id"
			" WHERE c.customer_id = $1", 1, types);
	}
	args[0] = CStringGetTextDatum(customer_id);
	ret = SPI_execute_snapshot(plan, args, NULL, snap, InvalidSnapshot, true, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "customer lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	desc = SPI_tuptable->tupdesc;
	ub_fill_customer_row(SPI_tuptable->vals[0], desc, 1, customer_id, row);
	row->overrides = palloc(SPI_processed * sizeof(UbOverride));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		bool		isnull;

		(void) SPI_getbinval(tup, desc, 5, &isnull);
		if (!isnull)
			ub_fill_override(tup, desc, 5, &row->overrides[row->noverrides++]);
	}
	SPI_freetuptable(SPI_tuptable);
	ub_read_plan_history(customer_id, snap, row);
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
	UbCustomerRow row;
	UbPlanMeter pm;
	uint64		generation;
	bool		absent;

	if (ub_cache_get(customer_id, meter, customer, m, meter_found, limit))
		return true;
	if (ub_preload_catalog() &&
		ub_cache_get(customer_id, meter, customer, m, meter_found, limit))
		return true;

	generation = ub_cache_generation();
	if (!ub_cache_get_customer(customer_id, &row, &absent))
	{
		Snapshot	snap;
		bool		found;

		if (absent)
			return false;
		/* fresh, for the same reason as in lookup_plan_meter */
		snap = RegisterSnapshot(GetLatestSnapshot());
		found = ub_use_direct_reads() ? read_customer_direct(customer_id, snap, &row) :
			read_customer_sql(customer_id, snap, &row);
		UnregisterSnapshot(snap);
		if (!found)
			return false;
		ub_cache_put_customer(generation, &row);
	}
	lookup_plan_meter(ub_row_plan_at(&row, GetCurrentTransactionStartTimestamp()), meter,
					  generation, &pm);
	ub_build_target(&row, &pm, customer, m, meter_found, limit);
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

/*
 * The limit rows of the last statement (meter, aggregation, then the limit's
 * columns) as a List of UbLimit, in CurrentMemoryContext.
 */
static List *
limits_of_result(void)
{
	List	   *result = NIL;

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		UbLimit    *l = palloc0(sizeof(UbLimit));

		l->meter = ub_col_text(tup, desc, 1);
		l->aggregation = ub_parse_aggregation(ub_col_text(tup, desc, 2));
		l->exists = true;
		ub_fill_limit(tup, desc, 3, l);
		result = lappend(result, l);
	}
	SPI_freetuptable(SPI_tuptable);
	return result;
}

/* Runs one of the limit-list statements for a key; a List of UbLimit ordered by meter. */
static List *
limit_list(SPIPlanPtr *plan, const char *sql, const char *key)
{
	Oid			types[1] = {TEXTOID};
	Datum		args[1];
	int			ret;

	ub_prepare_once(plan, sql, 1, types);
	args[0] = CStringGetTextDatum(key);
	ret = SPI_execute_plan(*plan, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "limit lookup failed: %s", SPI_result_code_string(ret));
	return limits_of_result();
}

/* Every effective limit of a customer under the plan in force now, ordered by meter. */
List *
ub_customer_limits(const UbCustomer *customer)
{
	return ub_customer_plan_limits(customer->customer_id, customer->plan);
}

/*
 * The effective limits of a customer under a given plan (one of its history),
 * ordered by meter: the plan's limit rows with the customer's overrides, and
 * a row of the table's defaults for an override of a meter the plan does not
 * limit (as the view effective_limits).
 */
List *
ub_customer_plan_limits(const char *customer_id, const char *plan)
{
	static SPIPlanPtr limits_plan = NULL;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		args[2];
	int			ret;

	ub_prepare_once(&limits_plan,
					"SELECT l.meter, m.aggregation,"
					"       l.included, l.hard_cap, l.overage_price, l.overage_unit,"
					"       l.soft_threshold, l.tiers, l.tier_mode"
					"  FROM (SELECT pl.meter,"
					"               CASE WHEN cl.customer_id IS NOT NULL THEN cl.included ELSE pl.included END AS included,"
					"               coalesce(cl.hard_cap, pl.hard_cap) AS hard_cap,"
					"               pl.overage_price, pl.overage_unit, pl.soft_threshold, pl.tiers, pl.tier_mode"
					"          FROM usage_billing.plan_limits pl"
					"          LEFT JOIN usage_billing.customer_limits cl"
					"                 ON cl.customer_id = $1 AND cl.meter = pl.meter"
					"         WHERE pl.plan = $2"
					"        UNION ALL"
					"        SELECT cl.meter, cl.included, coalesce(cl.hard_cap, false),"
					"               NULL, 1, 0.8, NULL, 'graduated'"
					"          FROM usage_billing.customer_limits cl"
					"         WHERE cl.customer_id = $1"
					"           AND NOT EXISTS (SELECT 1 FROM usage_billing.plan_limits pl"
					"                            WHERE pl.plan = $2 AND pl.meter = cl.meter)) l"
					"  JOIN usage_billing.meters m ON m.meter = l.meter"
					" ORDER BY l.meter", 2, types);
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(plan);
	ret = SPI_execute_plan(limits_plan, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "limit lookup failed: %s", SPI_result_code_string(ret));
	return limits_of_result();
}

/* The limits of a plan as written, ignoring customer overrides (plan comparisons), ordered by meter. */
List *
ub_plan_limits(const char *plan)
{
	return limit_list(&plan_limits_plan,
					  LIMIT_LIST_SQL("usage_billing.plan_limits", "plan"),
					  plan);
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

/*
 * The usage target of (customer, meter), or P0002 for an unknown customer or
 * meter: the first check of the calls that need both (adjust_usage,
 * usage_history).
 */
void
ub_require_usage_target(const char *customer_id, const char *meter,
						UbCustomer *customer, UbMeter *m, UbLimit *limit)
{
	bool		meter_found = false;

	if (!ub_lookup_usage_target(customer_id, meter, customer, m, &meter_found, limit))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("customer \"%s\" does not exist", customer_id)));
	if (!meter_found)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("meter \"%s\" does not exist", meter)));
}

/* From _PG_init: the catalog's setting; saved plans are custom when distributed. */
void
ub_catalog_init(void)
{
	ub_custom_plans_hook = ub_distributed;

	DefineCustomBoolVariable("usage_billing.direct_reads",
							 "Read customers, overrides and aggregates straight from their indexes on the hot path.",
							 "Turn off when the tables are distributed with Citus: only SQL is routed to the shards.",
							 &ub_direct_reads,
							 true,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);
}

/* Looks the customer up or raises P0002: every reading call but check_limit needs one. */
void
ub_require_customer(const char *customer_id, UbCustomer *customer)
{
	if (customer_id == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("customer id must not be empty"),
				 errdetail("The customer id given was NULL.")));
	if (!ub_lookup_customer(customer_id, customer))
	{
		/* the hint names an admin function: only for those who may call it, not tenants */
		Oid			argtypes[4] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID};
		Oid			upsert = LookupFuncName(list_make2(makeString("usage_billing"),
													   makeString("upsert_customer")),
											4, argtypes, true);
		bool		may_create = OidIsValid(upsert) &&
			pg_proc_aclcheck(upsert, GetUserId(), ACL_EXECUTE) == ACLCHECK_OK;

		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("customer \"%s\" does not exist", customer_id),
				 may_create ? errhint("Create it with usage_billing.upsert_customer().") : 0));
	}
}

/* May the hot path read the tables straight from their indexes (usage_billing.direct_reads)? */
bool
ub_use_direct_reads(void)
{
	return ub_direct_reads && !ub_distributed();
}
