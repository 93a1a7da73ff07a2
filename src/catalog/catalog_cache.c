/*-------------------------------------------------------------------------
 * catalog_cache.c
 *	  Backend-local cache of usage targets: customer, meter, effective limit.
 *
 * The hot path needs, for every call, the customer with its plan, the meter
 * and the limit in force.  Reading them through SPI costs an executor start
 * per call, so each backend keeps what it read in two hash tables:
 *
 *	customers		customer_id -> the customers row and all its overrides
 *					(customer_limits rows)
 *	plan meters		(plan, meter) -> the plan, the meter and the plan's
 *					limit row for it; few, shared by all customers of a plan
 *
 * A "target" is the two combined: a hit hashes the customer id, then (plan,
 * meter) unless the customer's entry remembers the plan meter it used last,
 * and applies the customer's override for the meter, if any.  Building the
 * target and every copy of a cached row handed out are in catalog_target.c;
 * here live the hash tables, their invalidation and the preload.
 *
 * "Preload": a backend that misses with an empty cache may load every
 * customer, override and plan meter in one pass (catalog_preload.c reads
 * them, and the setting usage_billing.catalog_preload_limit lives there); the
 * cache is then "complete" and a customer not in it does not exist.  Here
 * live the claim of a preload and its building: in a context of its own,
 * which replaces the cache only when no invalidation arrived while it was
 * read.
 *
 * A customer row carries its plan history: the plan of a target is the one
 * in force at the call's time (now()), so a change scheduled for a period's
 * end applies at the boundary with nothing written then.
 *
 * Invalidation rides on PostgreSQL's own machinery: statement triggers on
 * the catalog tables (meters, plans, plan_limits, customers,
 * customer_limits, customer_plans) call ub_catalog_changed(), which queues a relcache
 * invalidation of the changed table.  At commit it reaches every backend; our
 * relcache callback then drops the whole cache.  Each lookup first accepts
 * pending invalidation messages, so a committed change (a new plan, a
 * suspension) applies to the very next call everywhere.  A generation
 * counter keeps a lookup or a preload that raced with an invalidation from
 * caching what it read before the change.  The own transaction's changes
 * reach the callback at its next command, and on abort PostgreSQL replays
 * them locally, so nothing uncommitted survives.
 *
 * On a Citus cluster (citus.c) none of this holds: a change on one node
 * queues no invalidation on the others, and Citus refuses the triggers.
 * There nothing is cached: every lookup misses and reads with SQL.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"

#include "catalog/namespace.h"
#include "common/hashfn.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "storage/sinval.h"
#include "utils/datum.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"

#include "catalog_cache.h"
#include "errors.h"
#include "relations.h"
#include "citus.h"

PG_FUNCTION_INFO_V1(ub_catalog_changed);

/* a bound on memory when reading key by key: past this many entries we start over */
#define UB_CACHE_MAX_ENTRIES	200000

typedef struct PlanMeterKey
{
	const char *plan;
	const char *meter;
} PlanMeterKey;

typedef struct PlanMeterEntry
{
	PlanMeterKey key;			/* points into pm */
	UbPlanMeter pm;
} PlanMeterEntry;

typedef struct CustomerEntry
{
	const char *customer_id;	/* hash key; points into row */
	UbCustomerRow row;
	PlanMeterEntry *last;		/* the plan meter of the last hit, or NULL */
} CustomerEntry;

struct UbCachePreload
{
	MemoryContext cxt;			/* becomes the cache's context when complete */
	HTAB	   *customers;
	HTAB	   *plan_meters;
};

static HTAB *customer_cache = NULL;
static HTAB *static_cache = NULL;	/* (plan, meter) -> UbPlanMeter */
static MemoryContext target_cxt = NULL;
static uint64 generation = 0;
static bool complete = false;	/* every customer is in customer_cache */
static bool preload_tried = false;	/* a preload ran in this generation */
static uint64 preload_generation = 0;
static bool callback_registered = false;

/* the catalog tables whose changes invalidate the cache; resolved lazily */
#define UB_CATALOG_TABLES 6
static const char *const catalog_table_names[UB_CATALOG_TABLES] = {
	"meters", "plans", "plan_limits", "customers", "customer_limits", "customer_plans"
};
static Oid	catalog_table_oids[UB_CATALOG_TABLES];
static bool catalog_oids_valid = false;

/* Drops every cached target; entries' memory goes with the context. */
static void
reset_cache(void)
{
	generation++;
	complete = false;
	catalog_oids_valid = false;
	if (target_cxt != NULL)
		MemoryContextReset(target_cxt);
	customer_cache = NULL;
	static_cache = NULL;
}

/* Finds the OIDs of our catalog tables (outside of any invalidation callback). */
static void
resolve_catalog_oids(void)
{
	Oid			nsp;

	if (catalog_oids_valid)
		return;
	nsp = ub_schema_oid();
	for (int i = 0; i < UB_CATALOG_TABLES; i++)
		catalog_table_oids[i] = OidIsValid(nsp) ?
			get_relname_relid(catalog_table_names[i], nsp) : InvalidOid;
	catalog_oids_valid = OidIsValid(nsp);
}

/*
 * Relcache callback.  Only invalidations of our catalog tables (sent by their
 * triggers, or by DDL on them) and "everything" resets matter: autovacuum's
 * ANALYZE of the ledger, for one, invalidates the ledger's relcache entry all
 * the time and must not empty the cache.
 */
static void
relcache_callback(Datum arg, Oid relid)
{
	bool		ours = !catalog_oids_valid || !OidIsValid(relid);

	for (int i = 0; !ours && i < UB_CATALOG_TABLES; i++)
		ours = (catalog_table_oids[i] == relid);
	if (!ours)
		return;
	if (customer_cache != NULL)
		reset_cache();
	else
	{
		generation++;
		complete = false;
		catalog_oids_valid = false;
	}
}

/* Hashes a customer id key (a pointer to the string). */
static uint32
customer_key_hash(const void *key, Size keysize)
{
	const char *s = *(const char *const *) key;

	return hash_bytes((const unsigned char *) s, strlen(s));
}

/* Compares two customer id keys as strings; 0 means equal. */
static int
customer_key_match(const void *key1, const void *key2, Size keysize)
{
	return strcmp(*(const char *const *) key1, *(const char *const *) key2);
}

/* Hashes a (plan, meter) key. */
static uint32
plan_meter_key_hash(const void *key, Size keysize)
{
	const PlanMeterKey *k = (const PlanMeterKey *) key;
	uint32		h = hash_bytes((const unsigned char *) k->plan, strlen(k->plan));

	return hash_combine(h, hash_bytes((const unsigned char *) k->meter, strlen(k->meter)));
}

/* Compares two (plan, meter) keys as strings; 0 means equal. */
static int
plan_meter_key_match(const void *key1, const void *key2, Size keysize)
{
	const PlanMeterKey *a = (const PlanMeterKey *) key1;
	const PlanMeterKey *b = (const PlanMeterKey *) key2;

	if (strcmp(a->plan, b->plan) != 0)
		return 1;
	return strcmp(a->meter, b->meter) != 0;
}

/* Creates the customer table in cxt, sized for nelem entries. */
static HTAB *
create_customer_table(MemoryContext cxt, long nelem)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(const char *);
	ctl.entrysize = sizeof(CustomerEntry);
	ctl.hash = customer_key_hash;
	ctl.match = customer_key_match;
	ctl.hcxt = cxt;
	return hash_create("usage_billing customers", Max(nelem, 1024), &ctl,
					   HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
}

/* Creates the plan meter table in cxt. */
static HTAB *
create_plan_meter_table(MemoryContext cxt)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(PlanMeterKey);
	ctl.entrysize = sizeof(PlanMeterEntry);
	ctl.hash = plan_meter_key_hash;
	ctl.match = plan_meter_key_match;
	ctl.hcxt = cxt;
	return hash_create("usage_billing plan meters", 64, &ctl,
					   HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
}

/* Creates the hash tables on first use and after a reset. */
static void
ensure_cache(void)
{
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(relcache_callback, (Datum) 0);
		callback_registered = true;
	}
	if (target_cxt == NULL)
		target_cxt = AllocSetContextCreate(CacheMemoryContext, "usage_billing target cache",
										   ALLOCSET_DEFAULT_SIZES);
	if (customer_cache != NULL)
		return;
	resolve_catalog_oids();
	customer_cache = create_customer_table(target_cxt, 1024);
	static_cache = create_plan_meter_table(target_cxt);
}

/* Appends a copy of an override to a customer row that lives in cxt. */
static void
add_override(UbCustomerRow *row, MemoryContext cxt, const UbOverride *o)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	UbOverride *dst;

	if (row->overrides == NULL)
		row->overrides = palloc(sizeof(UbOverride));
	else
		row->overrides = repalloc(row->overrides, (row->noverrides + 1) * sizeof(UbOverride));
	dst = &row->overrides[row->noverrides];
	ub_copy_override(o, dst);
	row->noverrides++;
	MemoryContextSwitchTo(old);
}

/*
 * Stores a customer row in a table of cxt.  Its strings share one chunk, and
 * are copied before the entry is made, so that an entry never points to the
 * caller's memory.
 */
static CustomerEntry *
store_customer(HTAB *table, MemoryContext cxt, const UbCustomerRow *row)
{
	size_t		lid = strlen(row->customer_id) + 1;
	size_t		lplan = strlen(row->plan) + 1;
	size_t		lstatus = strlen(row->status) + 1;
	size_t		lstripe = row->stripe_customer_id ? strlen(row->stripe_customer_id) + 1 : 0;
	char	   *buf = MemoryContextAlloc(cxt, lid + lplan + lstatus + lstripe);
	const char *key = buf;
	CustomerEntry *entry;
	bool		found;

	memcpy(buf, row->customer_id, lid);
	memcpy(buf + lid, row->plan, lplan);
	memcpy(buf + lid + lplan, row->status, lstatus);
	if (lstripe > 0)
		memcpy(buf + lid + lplan + lstatus, row->stripe_customer_id, lstripe);

	entry = hash_search(table, &key, HASH_ENTER, &found);
	if (found)
		return entry;
	entry->row.customer_id = buf;
	entry->row.plan = buf + lid;
	entry->row.billing_anchor = row->billing_anchor;
	entry->row.status = buf + lid + lplan;
	entry->row.stripe_customer_id = lstripe > 0 ? buf + lid + lplan + lstatus : NULL;
	entry->row.noverrides = 0;
	entry->row.overrides = NULL;
	entry->row.nplans = 0;
	entry->row.plan_from = NULL;
	entry->row.plan_names = NULL;
	entry->last = NULL;
	for (int i = 0; i < row->noverrides; i++)
		add_override(&entry->row, cxt, &row->overrides[i]);
	if (row->nplans > 0)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		for (int i = 0; i < row->nplans; i++)
			ub_row_add_plan(&entry->row, row->plan_from[i], row->plan_names[i]);
		MemoryContextSwitchTo(old);
	}
	return entry;
}

/* Stores a plan meter in a table of cxt; its key points into the copy. */
static PlanMeterEntry *
store_plan_meter(HTAB *table, MemoryContext cxt, const UbPlanMeter *pm)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	UbPlanMeter copy;
	PlanMeterKey key;
	PlanMeterEntry *entry;
	bool		found;

	ub_copy_plan_meter(pm, &copy);
	MemoryContextSwitchTo(old);
	key.plan = copy.plan_part.plan;
	key.meter = copy.meter.meter;
	entry = hash_search(table, &key, HASH_ENTER, &found);
	if (!found)
	{
		entry->pm = copy;
		if (entry->pm.meter_found)
			entry->pm.limit.meter = entry->pm.meter.meter;
	}
	return entry;
}

/* The current generation; take it before reading what you will put. */
uint64
ub_cache_generation(void)
{
	ensure_cache();
	/* let committed catalog changes of other backends reach us first */
	AcceptInvalidationMessages();
	ensure_cache();
	return generation;
}

/* Finds a customer's entry, after accepting pending invalidations. */
static CustomerEntry *
find_customer(const char *customer_id)
{
	(void) ub_cache_generation();
	/* distributed: the catalog may change on another node, so it is read on every call */
	if (ub_distributed())
		return NULL;
	return hash_search(customer_cache, &customer_id, HASH_FIND, NULL);
}

/* Finds the plan meter of (plan, meter), or NULL. */
static PlanMeterEntry *
find_plan_meter(const char *plan, const char *meter)
{
	PlanMeterKey key;

	if (ub_distributed())
		return NULL;
	key.plan = plan;
	key.meter = meter;
	return hash_search(static_cache, &key, HASH_FIND, NULL);
}

/* Fills the target of (customer, meter) from the cache; false on a miss. */
bool
ub_cache_get(const char *customer_id, const char *meter,
			 UbCustomer *customer, UbMeter *m, bool *meter_found, UbLimit *limit)
{
	CustomerEntry *entry = find_customer(customer_id);
	PlanMeterEntry *pme;
	const char *plan;

	if (entry == NULL)
		return false;
	/* the plan in force at the call: a scheduled change needs no write to apply */
	plan = ub_row_plan_at(&entry->row, GetCurrentTransactionStartTimestamp());
	/* most customers use one meter: skip the second hash then */
	pme = entry->last;
	if (pme == NULL || strcmp(pme->key.meter, meter) != 0 || strcmp(pme->key.plan, plan) != 0)
	{
		pme = find_plan_meter(plan, meter);
		if (pme == NULL)
			return false;
		entry->last = pme;
	}
	ub_build_target(&entry->row, &pme->pm, customer, m, meter_found, limit);
	return true;
}

/*
 * Copies a cached customer row into CurrentMemoryContext; false on a miss.
 * *absent says that the miss is an answer: the cache is complete, so there
 * is no such customer.
 */
bool
ub_cache_get_customer(const char *customer_id, UbCustomerRow *row, bool *absent)
{
	CustomerEntry *entry = find_customer(customer_id);

	*absent = (entry == NULL && complete);
	if (entry == NULL)
		return false;
	ub_copy_customer_row(&entry->row, row);
	return true;
}

/* Makes room for one more entry read key by key; false when the read is stale. */
static bool
make_room(uint64 read_generation)
{
	if (read_generation != generation || ub_distributed())
		return false;
	ensure_cache();
	if (hash_get_num_entries(customer_cache) + hash_get_num_entries(static_cache) >=
		UB_CACHE_MAX_ENTRIES)
	{
		reset_cache();
		ensure_cache();
	}
	return true;
}

/* Remembers a customer row read under the given generation, unless the catalog changed since. */
void
ub_cache_put_customer(uint64 read_generation, const UbCustomerRow *row)
{
	if (make_room(read_generation))
		store_customer(customer_cache, target_cxt, row);
}

/* Copies the cached plan meter of (plan, meter) into CurrentMemoryContext; false on a miss. */
bool
ub_static_cache_get(const char *plan, const char *meter, UbPlanMeter *pm)
{
	PlanMeterEntry *entry;

	(void) ub_cache_generation();
	entry = find_plan_meter(plan, meter);
	if (entry == NULL)
		return false;
	ub_copy_plan_meter(&entry->pm, pm);
	return true;
}

/* Remembers a plan meter read under the given generation. */
void
ub_static_cache_put(uint64 read_generation, const UbPlanMeter *pm)
{
	if (make_room(read_generation))
		store_plan_meter(static_cache, target_cxt, pm);
}

/*
 * Whether this miss should preload (the caller has checked that preloading
 * is on): the cache holds no customer, and no preload was tried since the
 * last invalidation; a true answer counts as the try, so that a preload that
 * finds too many customers is not repeated on every miss.
 */
bool
ub_cache_claim_preload(void)
{
	(void) ub_cache_generation();
	if (complete || ub_distributed() ||
		(preload_tried && preload_generation == generation) ||
		hash_get_num_entries(customer_cache) > 0)
		return false;
	preload_tried = true;
	preload_generation = generation;
	return true;
}

/*
 * Starts a preload of about ncustomers customers.  It is built in a context
 * below the caller's, so that an error on the way frees it, and moves under
 * CacheMemoryContext only when ub_cache_preload_end installs it.
 */
UbCachePreload *
ub_cache_preload_begin(long ncustomers)
{
	UbCachePreload *p = palloc0(sizeof(UbCachePreload));

	p->cxt = AllocSetContextCreate(CurrentMemoryContext, "usage_billing target cache",
								   ALLOCSET_DEFAULT_SIZES);
	p->customers = create_customer_table(p->cxt, ncustomers);
	p->plan_meters = create_plan_meter_table(p->cxt);
	return p;
}

/* Adds a customer (its overrides come with ub_cache_preload_override). */
void
ub_cache_preload_customer(UbCachePreload *p, const UbCustomerRow *row)
{
	store_customer(p->customers, p->cxt, row);
}

/* Adds an override to a customer already added; others are ignored. */
void
ub_cache_preload_override(UbCachePreload *p, const char *customer_id, const UbOverride *o)
{
	CustomerEntry *entry = hash_search(p->customers, &customer_id, HASH_FIND, NULL);

	if (entry != NULL)
		add_override(&entry->row, p->cxt, o);
}

/* Adds a plan meter. */
void
ub_cache_preload_plan_meter(UbCachePreload *p, const UbPlanMeter *pm)
{
	store_plan_meter(p->plan_meters, p->cxt, pm);
}

/* Adds a plan history row (in effective_from order) to a customer already added. */
void
ub_cache_preload_history(UbCachePreload *p, const char *customer_id, TimestampTz effective_from,
						 const char *plan)
{
	CustomerEntry *entry = hash_search(p->customers, &customer_id, HASH_FIND, NULL);

	if (entry != NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(p->cxt);

		ub_row_add_plan(&entry->row, effective_from, plan);
		MemoryContextSwitchTo(old);
	}
}

/*
 * Installs the preload as the complete cache, unless an invalidation arrived
 * since read_generation was taken: then what was read may be stale and is
 * dropped.  Frees the preload either way; true when installed.
 */
bool
ub_cache_preload_end(UbCachePreload *p, uint64 read_generation)
{
	(void) ub_cache_generation();
	if (read_generation != generation)
	{
		MemoryContextDelete(p->cxt);
		pfree(p);
		return false;
	}
	MemoryContextSetParent(p->cxt, CacheMemoryContext);
	if (target_cxt != NULL)
		MemoryContextDelete(target_cxt);
	target_cxt = p->cxt;
	customer_cache = p->customers;
	static_cache = p->plan_meters;
	complete = true;
	pfree(p);
	return true;
}

/* Trigger: a catalog table changed; every backend drops its cache at commit. */
Datum
ub_catalog_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("ub_catalog_changed must be called as a trigger")));
	CacheInvalidateRelcache(trigdata->tg_relation);
	PG_RETURN_POINTER(NULL);
}
