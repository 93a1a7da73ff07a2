/*-------------------------------------------------------------------------
 * catalog_cache.c
 *	  Backend-local cache of usage targets: customer, meter, effective limit.
 *
 * The hot path needs, for every call, the customer with its plan, the meter
 * and the limit in force.  Reading them through SPI costs an executor start
 * per call, so each backend keeps what it read in a hash table keyed by
 * (customer_id, meter).
 *
 * Invalidation rides on PostgreSQL's own machinery: statement triggers on
 * the catalog tables (meters, plans, plan_limits, customers,
 * customer_limits) call ub_catalog_changed(), which queues a relcache
 * invalidation of the changed table.  At commit it reaches every backend; our
 * relcache callback then drops the whole cache.  Each lookup first accepts
 * pending invalidation messages, so a committed change (a new plan, a
 * suspension) applies to the very next call everywhere.  A generation
 * counter keeps a lookup that raced with an invalidation from caching what
 * it read before the change.  On abort, PostgreSQL replays the aborted
 * transaction's invalidations locally, so nothing uncommitted survives.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

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
#include "pricing.h"
#include "usage_billing.h"

PG_FUNCTION_INFO_V1(ub_catalog_changed);

/* a bound on memory: past this many entries we start over */
#define UB_CACHE_MAX_ENTRIES	200000

typedef struct UbTargetKey
{
	char		customer_id[UB_MAX_NAME_LEN + 1];
	char		meter[UB_MAX_NAME_LEN + 1];
} UbTargetKey;

typedef struct UbTargetEntry
{
	UbTargetKey	key;
	UbCustomer	customer;
	UbMeter		meter;
	bool		meter_found;
	UbLimit		limit;
} UbTargetEntry;

static HTAB *target_cache = NULL;
static HTAB *static_cache = NULL;	/* (plan, meter) -> plan, meter and plan limit */
static MemoryContext target_cxt = NULL;
static uint64 generation = 0;
static bool callback_registered = false;

/* the catalog tables whose changes invalidate the cache; resolved lazily */
#define UB_CATALOG_TABLES 5
static const char *const catalog_table_names[UB_CATALOG_TABLES] = {
	"meters", "plans", "plan_limits", "customers", "customer_limits"
};
static Oid	catalog_table_oids[UB_CATALOG_TABLES];
static bool catalog_oids_valid = false;

/* Drops every cached target; entries' memory goes with the context. */
static void
reset_cache(void)
{
	generation++;
	catalog_oids_valid = false;
	if (target_cxt != NULL)
		MemoryContextReset(target_cxt);
	target_cache = NULL;
	static_cache = NULL;
}

/* Finds the OIDs of our catalog tables (outside of any invalidation callback). */
static void
resolve_catalog_oids(void)
{
	Oid			nsp;

	if (catalog_oids_valid)
		return;
	nsp = get_namespace_oid("usage_billing", true);
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
	if (target_cache != NULL)
		reset_cache();
	else
	{
		generation++;
		catalog_oids_valid = false;
	}
}

/* Hashes only the used bytes of the key, not its 402-byte padding. */
static uint32
target_key_hash(const void *key, Size keysize)
{
	const UbTargetKey *k = (const UbTargetKey *) key;
	uint32		h = hash_bytes((const unsigned char *) k->customer_id, strlen(k->customer_id));

	return hash_combine(h, hash_bytes((const unsigned char *) k->meter, strlen(k->meter)));
}

/* Compares two keys as the strings they hold; 0 means equal. */
static int
target_key_match(const void *key1, const void *key2, Size keysize)
{
	const UbTargetKey *a = (const UbTargetKey *) key1;
	const UbTargetKey *b = (const UbTargetKey *) key2;

	if (strcmp(a->customer_id, b->customer_id) != 0)
		return 1;
	return strcmp(a->meter, b->meter) != 0;
}

/* Creates a hash table of targets in the cache's context. */
static HTAB *
create_table(const char *name)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(UbTargetKey);
	ctl.entrysize = sizeof(UbTargetEntry);
	ctl.hash = target_key_hash;
	ctl.match = target_key_match;
	ctl.hcxt = target_cxt;
	return hash_create(name, 1024, &ctl,
					   HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
}

/* Creates the hash tables on first use. */
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
	if (target_cache != NULL)
		return;
	resolve_catalog_oids();
	target_cache = create_table("usage_billing targets");
	static_cache = create_table("usage_billing plan targets");
}

/* Builds a zero-padded key; false when the names are too long to cache. */
static bool
make_key(const char *customer_id, const char *meter, UbTargetKey *key)
{
	size_t		cl = strlen(customer_id);
	size_t		ml = strlen(meter);

	if (cl > UB_MAX_NAME_LEN || ml > UB_MAX_NAME_LEN)
		return false;
	memcpy(key->customer_id, customer_id, cl + 1);
	memcpy(key->meter, meter, ml + 1);
	return true;
}

static char *
copy_str(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

static Numeric
copy_num(Numeric n)
{
	return n ? DatumGetNumericCopy(NumericGetDatum(n)) : NULL;
}

/* Deep-copies a target into CurrentMemoryContext. */
static void
copy_target(const UbCustomer *sc, const UbMeter *sm, bool meter_found, const UbLimit *sl,
			UbCustomer *c, UbMeter *m, UbLimit *l)
{
	c->customer_id = copy_str(sc->customer_id);
	c->plan = copy_str(sc->plan);
	c->billing_anchor = sc->billing_anchor;
	c->period = sc->period;
	c->status = copy_str(sc->status);
	c->stripe_customer_id = copy_str(sc->stripe_customer_id);
	c->base_price = copy_num(sc->base_price);
	c->currency = copy_str(sc->currency);

	memset(l, 0, sizeof(UbLimit));
	if (!meter_found)
		return;
	m->meter = copy_str(sm->meter);
	m->aggregation = sm->aggregation;
	m->value_property = copy_str(sm->value_property);
	m->stripe_event_name = copy_str(sm->stripe_event_name);

	l->meter = m->meter;
	l->exists = sl->exists;
	l->aggregation = sl->aggregation;
	l->included = copy_num(sl->included);
	l->hard_cap = sl->hard_cap;
	l->overage_price = copy_num(sl->overage_price);
	l->overage_unit = copy_num(sl->overage_unit);
	l->soft_threshold = copy_num(sl->soft_threshold);
	if (sl->tiers != NULL)
	{
		const UbTiers *st = sl->tiers;
		UbTiers    *t = palloc0(offsetof(UbTiers, tiers) + st->ntiers * sizeof(UbTier));

		t->volume = st->volume;
		t->ntiers = st->ntiers;
		for (int i = 0; i < st->ntiers; i++)
		{
			t->tiers[i].up_to = copy_num(st->tiers[i].up_to);
			t->tiers[i].unit_price = copy_num(st->tiers[i].unit_price);
			t->tiers[i].flat_fee = copy_num(st->tiers[i].flat_fee);
		}
		l->tiers = t;
	}
}

/* The current generation; take it before reading what you will put. */
uint64
ub_cache_generation(void)
{
	ensure_cache();
	/* let committed catalog changes of other backends reach us first */
	AcceptInvalidationMessages();
	return generation;
}

/* Looks a key up in one of the tables; false on a miss. */
static bool
cache_get(bool statics, const char *name, const char *meter,
		  UbCustomer *customer, UbMeter *m, bool *meter_found, UbLimit *limit)
{
	UbTargetKey key;
	UbTargetEntry *entry;

	ensure_cache();
	AcceptInvalidationMessages();
	if (target_cache == NULL)
		ensure_cache();
	if (!make_key(name, meter, &key))
		return false;
	entry = hash_search(statics ? static_cache : target_cache, &key, HASH_FIND, NULL);
	if (entry == NULL)
		return false;
	*meter_found = entry->meter_found;
	copy_target(&entry->customer, &entry->meter, entry->meter_found, &entry->limit,
				customer, m, limit);
	return true;
}

/* Stores a key read under the given generation, unless the catalog changed since. */
static void
cache_put(bool statics, uint64 read_generation, const char *name, const char *meter,
		  const UbCustomer *customer, const UbMeter *m, bool meter_found,
		  const UbLimit *limit)
{
	UbTargetKey key;
	UbTargetEntry *entry;
	MemoryContext old;
	HTAB	   *table;

	if (read_generation != generation || !make_key(name, meter, &key))
		return;
	ensure_cache();
	table = statics ? static_cache : target_cache;
	if (hash_get_num_entries(table) >= UB_CACHE_MAX_ENTRIES)
	{
		reset_cache();
		ensure_cache();
		table = statics ? static_cache : target_cache;
	}
	entry = hash_search(table, &key, HASH_ENTER, NULL);
	old = MemoryContextSwitchTo(target_cxt);
	entry->meter_found = meter_found;
	copy_target(customer, m, meter_found, limit, &entry->customer, &entry->meter, &entry->limit);
	MemoryContextSwitchTo(old);
}

/* Fills the target of (customer, meter) from the cache; false on a miss. */
bool
ub_cache_get(const char *customer_id, const char *meter,
			 UbCustomer *customer, UbMeter *m, bool *meter_found, UbLimit *limit)
{
	return cache_get(false, customer_id, meter, customer, m, meter_found, limit);
}

/* Remembers the target of (customer, meter). */
void
ub_cache_put(uint64 read_generation, const char *customer_id, const char *meter,
			 const UbCustomer *customer, const UbMeter *m, bool meter_found,
			 const UbLimit *limit)
{
	cache_put(false, read_generation, customer_id, meter, customer, m, meter_found, limit);
}

/*
 * The same for what does not depend on the customer: a plan (in the customer
 * fields), a meter and the plan's own limit row for it, keyed (plan, meter).
 */
bool
ub_static_cache_get(const char *plan, const char *meter,
					UbCustomer *plan_part, UbMeter *m, bool *meter_found, UbLimit *limit)
{
	return cache_get(true, plan, meter, plan_part, m, meter_found, limit);
}

/* Remembers the plan part of (plan, meter). */
void
ub_static_cache_put(uint64 read_generation, const char *plan, const char *meter,
					const UbCustomer *plan_part, const UbMeter *m, bool meter_found,
					const UbLimit *limit)
{
	cache_put(true, read_generation, plan, meter, plan_part, m, meter_found, limit);
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
