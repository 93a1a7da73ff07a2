/*-------------------------------------------------------------------------
 * catalog_preload.c
 *	  Loading the whole catalog into a backend's cache in one pass.
 *
 * "Preload": a backend that misses with an empty cache (its first call, or
 * the first after an invalidation) loads every customer, override, plan
 * history row and plan meter in one pass when there are at most usage_billing.
 * catalog_preload_limit customers; the cache is then "complete" and a
 * customer not in it does not exist.  Otherwise it reads key by key
 * (catalog.c).  This file reads; catalog_cache.c builds the preload in a
 * context of its own and only replaces the cache with it when no
 * invalidation arrived while it was read.  The rows are filled by the same
 * helpers as the per-key reads (ub_fill_*, catalog.c).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "catalog.h"
#include "catalog_cache.h"
#include "catalog_preload.h"
#include "relations.h"

/* the largest preload we allow: about 150 bytes a customer, so some 1.5 GB a backend */
#define UB_PRELOAD_MAX			10000000

int			ub_catalog_preload_limit = 100000;

/* Defines usage_billing.catalog_preload_limit; called from _PG_init. */
void
ub_catalog_preload_init(void)
{
	DefineCustomIntVariable("usage_billing.catalog_preload_limit",
							"Most customers a backend loads into its catalog cache in one pass.",
							"When the cache is empty and there are at most this many customers, "
							"the first miss loads all customers, overrides and plan limits; "
							"0 reads every customer on its own first use.",
							&ub_catalog_preload_limit,
							100000, 0, UB_PRELOAD_MAX,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);
}

/* pg_class.reltuples of customers: what ANALYZE last counted, -1 when never. */
static double
customers_estimate(void)
{
	Oid			relid = ub_schema_relation("customers");
	Relation	rel;
	double		tuples;

	if (!OidIsValid(relid))
		elog(ERROR, "usage_billing.customers is missing");
	rel = table_open(relid, AccessShareLock);
	tuples = rel->rd_rel->reltuples;
	table_close(rel, AccessShareLock);
	return tuples;
}

/*
 * Loads every customer, override and plan meter into the cache in one pass
 * when there are at most usage_billing.catalog_preload_limit customers: a new
 * connection would otherwise miss once for every customer it meets.  The
 * reads share one fresh snapshot (fresh for the reason lookup_plan_meter in
 * catalog.c gives), and the cache installs them only if no invalidation
 * arrived since read_generation.  Plan meters past the limit are left to the
 * misses.
 */
static void
preload_catalog(uint64 read_generation)
{
	static SPIPlanPtr customers_plan = NULL;
	static SPIPlanPtr overrides_plan = NULL;
	static SPIPlanPtr plan_meters_plan = NULL;
	static SPIPlanPtr history_plan = NULL;
	int64		limit = ub_catalog_preload_limit;
	Oid			types[1] = {INT8OID};
	Datum		args[1];
	Snapshot	snap;
	SPITupleTable *tuptable;
	uint64		nrows;
	UbCachePreload *p;
	MemoryContext rowcxt;
	MemoryContext old;

	/* a table analyzed as too big is not read only to be dropped */
	if (customers_estimate() > limit)
		return;

	ub_prepare_once(&customers_plan,
					"SELECT customer_id, plan, billing_anchor, stripe_customer_id, status"
					"  FROM usage_billing.customers LIMIT $1", 1, types);
	ub_prepare_once(&overrides_plan,
					"SELECT customer_id, meter, included, hard_cap"
					"  FROM usage_billing.customer_limits", 0, NULL);
	ub_prepare_once(&plan_meters_plan,
					"SELECT p.plan, m.meter, " UB_PLAN_METER_COLUMNS
					"  FROM usage_billing.plans p"
					" CROSS JOIN usage_billing.meters m"
					"  LEFT JOIN usage_billing.plan_limits pl ON pl.plan = p.plan AND pl.meter = m.meter"
					" LIMIT $1", 1, types);

	snap = RegisterSnapshot(GetLatestSnapshot());
	args[0] = Int64GetDatum(limit + 1);
	if (SPI_execute_snapshot(customers_plan, args, NULL, snap, InvalidSnapshot,
							 true, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "customer preload failed");
	if (SPI_processed > (uint64) limit)
	{
		SPI_freetuptable(SPI_tuptable);
		UnregisterSnapshot(snap);
		return;
	}

	/* each row's strings are garbage once copied into the preload */
	rowcxt = AllocSetContextCreate(CurrentMemoryContext, "usage_billing preload row",
								   ALLOCSET_SMALL_SIZES);
	tuptable = SPI_tuptable;
	nrows = SPI_processed;
	p = ub_cache_preload_begin((long) nrows);
	for (uint64 i = 0; i < nrows; i++)
	{
		UbCustomerRow row;

		old = MemoryContextSwitchTo(rowcxt);
		ub_fill_customer_row(tuptable->vals[i], tuptable->tupdesc, 2,
							 ub_col_text(tuptable->vals[i], tuptable->tupdesc, 1), &row);
		MemoryContextSwitchTo(old);
		ub_cache_preload_customer(p, &row);
		MemoryContextReset(rowcxt);
	}
	SPI_freetuptable(tuptable);

	if (SPI_execute_snapshot(overrides_plan, NULL, NULL, snap, InvalidSnapshot,
							 true, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "customer limit preload failed");
	tuptable = SPI_tuptable;
	nrows = SPI_processed;
	for (uint64 i = 0; i < nrows; i++)
	{
		UbOverride	o;
		char	   *id;

		old = MemoryContextSwitchTo(rowcxt);
		id = ub_col_text(tuptable->vals[i], tuptable->tupdesc, 1);
		ub_fill_override(tuptable->vals[i], tuptable->tupdesc, 2, &o);
		MemoryContextSwitchTo(old);
		ub_cache_preload_override(p, id, &o);
		MemoryContextReset(rowcxt);
	}
	SPI_freetuptable(tuptable);

	if (ub_have_plan_history())
	{
		ub_prepare_once(&history_plan,
						"SELECT customer_id, effective_from, plan FROM usage_billing.customer_plans"
						" ORDER BY customer_id, effective_from", 0, NULL);
		if (SPI_execute_snapshot(history_plan, NULL, NULL, snap, InvalidSnapshot,
								 true, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "plan history preload failed");
		tuptable = SPI_tuptable;
		nrows = SPI_processed;
		for (uint64 i = 0; i < nrows; i++)
		{
			bool		isnull;
			char	   *id;
			char	   *plan;
			TimestampTz from;

			old = MemoryContextSwitchTo(rowcxt);
			id = ub_col_text(tuptable->vals[i], tuptable->tupdesc, 1);
			from = DatumGetTimestampTz(SPI_getbinval(tuptable->vals[i], tuptable->tupdesc, 2, &isnull));
			plan = ub_col_text(tuptable->vals[i], tuptable->tupdesc, 3);
			MemoryContextSwitchTo(old);
			ub_cache_preload_history(p, id, from, plan);
			MemoryContextReset(rowcxt);
		}
		SPI_freetuptable(tuptable);
	}

	if (SPI_execute_snapshot(plan_meters_plan, args, NULL, snap, InvalidSnapshot,
							 true, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "plan limit preload failed");
	tuptable = SPI_tuptable;
	nrows = Min(SPI_processed, (uint64) limit);
	for (uint64 i = 0; i < nrows; i++)
	{
		UbPlanMeter pm;
		HeapTuple	tup = tuptable->vals[i];

		old = MemoryContextSwitchTo(rowcxt);
		ub_fill_plan_meter(tup, tuptable->tupdesc, 3, ub_col_text(tup, tuptable->tupdesc, 1),
						   ub_col_text(tup, tuptable->tupdesc, 2), &pm);
		MemoryContextSwitchTo(old);
		ub_cache_preload_plan_meter(p, &pm);
		MemoryContextReset(rowcxt);
	}
	SPI_freetuptable(tuptable);
	UnregisterSnapshot(snap);
	MemoryContextDelete(rowcxt);

	(void) ub_cache_preload_end(p, read_generation);
}

/*
 * On a miss: preloads the catalog if the setting allows it and the cache
 * claims a preload (it is empty and none was tried since the last
 * invalidation).  True when a preload was tried, so the caller looks again;
 * a preload may still have found too many customers or raced with an
 * invalidation.  Must run between SPI_connect and SPI_finish.
 */
bool
ub_preload_catalog(void)
{
	if (ub_catalog_preload_limit <= 0 || !ub_cache_claim_preload())
		return false;
	preload_catalog(ub_cache_generation());
	return true;
}
