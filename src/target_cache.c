/*-------------------------------------------------------------------------
 * target_cache.c
 *	  A per-backend cache of usage targets, and the aggregate read by index.
 *
 * A "usage target" is what ub_lookup_usage_target returns for a customer
 * and a meter: the customer with its plan, the meter, and the effective
 * limit.  The catalog tables behind it (meters, plans, plan_limits,
 * customers, customer_limits) change rarely, while check_limit asks for
 * the same targets all the time, so we keep them in backend memory.
 *
 * Invalidation: every catalog table has a statement trigger
 * (usage_billing.catalog_changed) that queues a relcache invalidation of the
 * table.  PostgreSQL delivers it to the writing backend at the end of the
 * statement (and again, undone, on rollback) and to every other backend
 * after commit; our relcache callback then empties the whole cache.  We
 * take any relcache invalidation as a reason to empty it: they are rare,
 * and refilling is one lookup per target.
 *
 * Filling follows the rules of PostgreSQL's catalog snapshot: pending
 * invalidations are processed first, the lookup then reads with a fresh
 * snapshot (so it sees every commit whose invalidation we have processed),
 * and the result is stored only if no invalidation arrived meanwhile.
 *
 * The aggregate read goes straight to usage_aggregates' primary key index,
 * without SPI or the executor: it is the only per-call read of check_limit.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "catalog.h"
#include "pricing.h"
#include "reading.h"
#include "usage_billing.h"

PG_FUNCTION_INFO_V1(ub_catalog_changed);

/* beyond this many entries we start over rather than grow without bound */
#define TARGET_CACHE_MAX_ENTRIES	100000

typedef struct CachedTargetKey
{
	char		customer_id[UB_MAX_NAME_LEN + 1];
	char		meter[UB_MAX_NAME_LEN + 1];
} CachedTargetKey;

typedef struct CachedTarget
{
	CachedTargetKey	key;			/* hash key, must be first */
	UbCustomer	customer;
	UbMeter		meter;
	bool		meter_found;
	UbLimit		limit;
} CachedTarget;

static MemoryContext cache_context = NULL;
static HTAB *target_cache = NULL;
static uint64 cache_generation = 0;
static bool callback_registered = false;

/* where the aggregates live; looked up once, forgotten with the cache */
static Oid	aggregates_relid = InvalidOid;
static Oid	aggregates_pkey = InvalidOid;
static AttrNumber aggregates_total_attnum = InvalidAttrNumber;

static void TargetCacheInvalidate(Datum arg, Oid relid);
static void EnsureCache(void);
static char *CopyString(const char *s);
static Numeric CopyNumeric(Numeric n);
static void CopyTarget(const UbCustomer *c, const UbMeter *m, bool meter_found,
					   const UbLimit *l, UbCustomer *dc, UbMeter *dm, UbLimit *dl);

/* Relcache callback: any invalidation may concern our catalog, so forget everything. */
static void
TargetCacheInvalidate(Datum arg, Oid relid)
{
	if (cache_context != NULL)
		MemoryContextReset(cache_context);
	target_cache = NULL;
	aggregates_relid = InvalidOid;
	aggregates_pkey = InvalidOid;
	aggregates_total_attnum = InvalidAttrNumber;
	cache_generation++;
}

/* Creates the cache's memory context and hash table on first use and after a reset. */
static void
EnsureCache(void)
{
	HASHCTL		ctl;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(TargetCacheInvalidate, (Datum) 0);
		callback_registered = true;
	}
	if (cache_context == NULL)
		cache_context = AllocSetContextCreate(CacheMemoryContext,
											  "usage_billing target cache",
											  ALLOCSET_DEFAULT_SIZES);
	if (target_cache != NULL)
		return;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(CachedTargetKey);
	ctl.entrysize = sizeof(CachedTarget);
	ctl.hcxt = cache_context;
	target_cache = hash_create("usage_billing targets", 256, &ctl,
							   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

/* pstrdup that keeps NULL. */
static char *
CopyString(const char *s)
{
	return s == NULL ? NULL : pstrdup(s);
}

/* A numeric copy that keeps NULL. */
static Numeric
CopyNumeric(Numeric n)
{
	return n == NULL ? NULL : DatumGetNumeric(datumCopy(NumericGetDatum(n), false, -1));
}

/* Deep-copies a usage target into CurrentMemoryContext. */
static void
CopyTarget(const UbCustomer *c, const UbMeter *m, bool meter_found, const UbLimit *l,
		   UbCustomer *dc, UbMeter *dm, UbLimit *dl)
{
	dc->customer_id = CopyString(c->customer_id);
	dc->plan = CopyString(c->plan);
	dc->billing_anchor = c->billing_anchor;
	dc->period = c->period;
	dc->status = CopyString(c->status);
	dc->stripe_customer_id = CopyString(c->stripe_customer_id);
	dc->base_price = CopyNumeric(c->base_price);
	dc->currency = CopyString(c->currency);

	memset(dm, 0, sizeof(UbMeter));
	memset(dl, 0, sizeof(UbLimit));
	if (!meter_found)
		return;
	dm->meter = CopyString(m->meter);
	dm->aggregation = m->aggregation;
	dm->value_property = CopyString(m->value_property);
	dm->stripe_event_name = CopyString(m->stripe_event_name);

	dl->meter = dm->meter;
	dl->exists = l->exists;
	dl->included = CopyNumeric(l->included);
	dl->hard_cap = l->hard_cap;
	dl->overage_price = CopyNumeric(l->overage_price);
	dl->overage_unit = CopyNumeric(l->overage_unit);
	dl->soft_threshold = CopyNumeric(l->soft_threshold);
	dl->aggregation = l->aggregation;
	dl->tiers = NULL;
	if (l->tiers != NULL)
	{
		const UbTiers *t = l->tiers;
		UbTiers    *nt = palloc(offsetof(UbTiers, tiers) + t->ntiers * sizeof(UbTier));

		nt->volume = t->volume;
		nt->ntiers = t->ntiers;
		for (int i = 0; i < t->ntiers; i++)
		{
			nt->tiers[i].up_to = CopyNumeric(t->tiers[i].up_to);
			nt->tiers[i].unit_price = CopyNumeric(t->tiers[i].unit_price);
			nt->tiers[i].flat_fee = CopyNumeric(t->tiers[i].flat_fee);
		}
		dl->tiers = nt;
	}
}

/*
 * ub_lookup_usage_target through the cache: the same answer, without SPI on
 * a hit.  Needs no SPI connection; the result is palloc'd in the caller's
 * memory context.  Unknown customers (false) are not cached.
 */
bool
ub_cached_usage_target(const char *customer_id, const char *meter,
					   UbCustomer *customer, UbMeter *m, bool *meter_found,
					   UbLimit *limit)
{
	MemoryContext caller = CurrentMemoryContext;
	CachedTargetKey	key;
	CachedTarget *entry;
	bool		cacheable;
	bool		found;
	uint64		generation;
	UbCustomer	c;
	UbMeter		mm;
	UbLimit		l;
	bool		mf = false;
	int			guc_level;

	/* see every committed catalog change before trusting the cache */
	AcceptInvalidationMessages();
	EnsureCache();

	cacheable = strlen(customer_id) <= UB_MAX_NAME_LEN && strlen(meter) <= UB_MAX_NAME_LEN;
	if (cacheable)
	{
		memset(&key, 0, sizeof(key));
		strlcpy(key.customer_id, customer_id, sizeof(key.customer_id));
		strlcpy(key.meter, meter, sizeof(key.meter));
		entry = hash_search(target_cache, &key, HASH_FIND, NULL);
		if (entry != NULL)
		{
			CopyTarget(&entry->customer, &entry->meter, entry->meter_found, &entry->limit,
					   customer, m, limit);
			*meter_found = entry->meter_found;
			return true;
		}
	}

	/* miss: read with a snapshot taken after the invalidations we processed */
	generation = cache_generation;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	/*
	 * check_limit is declared without SET search_path so that hits pay no
	 * GUC work; the SQL of a miss still runs with a safe search_path.
	 */
	guc_level = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	PushActiveSnapshot(GetLatestSnapshot());
	found = ub_lookup_usage_target(customer_id, meter, &c, &mm, &mf, &l);
	PopActiveSnapshot();
	AtEOXact_GUC(true, guc_level);

	if (found)
	{
		MemoryContextSwitchTo(caller);
		CopyTarget(&c, &mm, mf, &l, customer, m, limit);
		*meter_found = mf;

		/* store it unless an invalidation arrived while we read */
		if (cacheable && generation == cache_generation && target_cache != NULL)
		{
			if (hash_get_num_entries(target_cache) >= TARGET_CACHE_MAX_ENTRIES)
			{
				TargetCacheInvalidate((Datum) 0, InvalidOid);
				EnsureCache();
			}
			entry = hash_search(target_cache, &key, HASH_ENTER, NULL);
			MemoryContextSwitchTo(cache_context);
			CopyTarget(&c, &mm, mf, &l, &entry->customer, &entry->meter, &entry->limit);
			entry->meter_found = mf;
			MemoryContextSwitchTo(caller);
		}
	}
	SPI_finish();
	MemoryContextSwitchTo(caller);
	return found;
}

/* Finds usage_aggregates, its primary key and its total column. */
static void
LookupAggregatesRelation(void)
{
	Oid			nsp;

	if (OidIsValid(aggregates_relid))
		return;
	nsp = get_namespace_oid("usage_billing", false);
	aggregates_relid = get_relname_relid("usage_aggregates", nsp);
	aggregates_pkey = get_relname_relid("usage_aggregates_pkey", nsp);
	if (!OidIsValid(aggregates_relid) || !OidIsValid(aggregates_pkey))
		elog(ERROR, "usage_billing.usage_aggregates or its primary key is missing");
	aggregates_total_attnum = get_attnum(aggregates_relid, "total");
	if (aggregates_total_attnum == InvalidAttrNumber)
		elog(ERROR, "usage_billing.usage_aggregates has no column \"total\"");
}

/*
 * The meter's aggregate total in one period, 0 when nothing was recorded:
 * one probe of the primary key (customer_id, meter, period_start) with the
 * statement's snapshot.
 */
Numeric
ub_current_total(const char *customer_id, const char *meter, TimestampTz period_start)
{
	Relation	rel;
	Relation	idx;
	Oid			relid;
	Oid			pkey;
	AttrNumber	total_attnum;
	ScanKeyData keys[3];
	IndexScanDesc scan;
	TupleTableSlot *slot;
	Numeric		total = NULL;

	EnsureCache();
	LookupAggregatesRelation();
	/* keep our own copies: opening a relation may process an invalidation */
	relid = aggregates_relid;
	pkey = aggregates_pkey;
	total_attnum = aggregates_total_attnum;
	rel = table_open(relid, AccessShareLock);
	idx = index_open(pkey, AccessShareLock);

	/* compare in the index's own collations, as the planner would */
	ScanKeyEntryInitialize(&keys[0], 0, 1, BTEqualStrategyNumber, InvalidOid,
						   idx->rd_indcollation[0], F_TEXTEQ,
						   CStringGetTextDatum(customer_id));
	ScanKeyEntryInitialize(&keys[1], 0, 2, BTEqualStrategyNumber, InvalidOid,
						   idx->rd_indcollation[1], F_TEXTEQ,
						   CStringGetTextDatum(meter));
	ScanKeyEntryInitialize(&keys[2], 0, 3, BTEqualStrategyNumber, InvalidOid,
						   idx->rd_indcollation[2], F_TIMESTAMPTZ_EQ,
						   TimestampTzGetDatum(period_start));

	scan = index_beginscan(rel, idx, GetActiveSnapshot(), 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	slot = table_slot_create(rel, NULL);
	if (index_getnext_slot(scan, ForwardScanDirection, slot))
	{
		bool		isnull;
		Datum		d = slot_getattr(slot, total_attnum, &isnull);

		if (!isnull)
			total = DatumGetNumericCopy(d);
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(idx, AccessShareLock);
	table_close(rel, AccessShareLock);

	return total != NULL ? total : ub_num_zero();
}

/* Trigger on the catalog tables: tell every backend to forget its cached targets. */
Datum
ub_catalog_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "catalog_changed must be called as a trigger");
	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}
