/*-------------------------------------------------------------------------
 * relations.c
 *	  The schema's relations that C code reads directly, resolved once.
 *
 * check_limit's probe and the escrow spend read the aggregates and the
 * escrow slots through their primary keys without the executor.  Looking
 * the relations, indexes and columns up by name on every call costs a
 * dozen catalog cache probes; here they are resolved once per backend and
 * forgotten on any relcache invalidation (the extension may be dropped and
 * created again, a table rewritten, an index renamed or rebuilt).  Indexes
 * are found as the tables' primary keys, not by name, so renaming one
 * changes nothing.  The library serves schemas of earlier versions too: what
 * a schema lacks is InvalidOid or InvalidAttrNumber.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "catalog/namespace.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/relcache.h"

#include "relations.h"

static UbRelations relations;
static bool resolved = false;
static Oid	schema = InvalidOid;	/* usage_billing's namespace, when known */
static uint64 invalidations = 0;
static bool callback_registered = false;

/* Relcache callback: anything may have changed. */
static void
forget_relations(Datum arg, Oid relid)
{
	resolved = false;
	schema = InvalidOid;
	invalidations++;
}

/* Registers the relcache callback once per backend. */
static void
register_callback(void)
{
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(forget_relations, (Datum) 0);
		callback_registered = true;
	}
}

/*
 * The usage_billing schema's OID, or InvalidOid in a database without the
 * extension (the preload and the worker may run in one).  Remembered until
 * the next relcache invalidation (dropping the extension drops its tables).
 */
Oid
ub_schema_oid(void)
{
	register_callback();
	if (!OidIsValid(schema))
		schema = get_namespace_oid("usage_billing", true);
	return schema;
}

/* A relation of the usage_billing schema by name, or InvalidOid when it has none. */
Oid
ub_schema_relation(const char *relname)
{
	Oid			nsp = ub_schema_oid();

	return OidIsValid(nsp) ? get_relname_relid(relname, nsp) : InvalidOid;
}

/* The primary key of a table, or InvalidOid. */
static Oid
primary_key(Oid relid)
{
	Relation	rel;
	Oid			pkey;

	if (!OidIsValid(relid))
		return InvalidOid;
	rel = table_open(relid, AccessShareLock);
	pkey = RelationGetPrimaryKeyIndex(rel);
	table_close(rel, AccessShareLock);
	return pkey;
}

/*
 * The relations of the usage_billing schema, resolved on first use after
 * an invalidation.  Errors when the schema has no aggregates.
 */
const UbRelations *
ub_relations(void)
{
	Oid			nsp;
	UbRelations r;
	uint64		seen;

	register_callback();
	if (resolved)
		return &relations;

	/* opening the tables may process an invalidation: then read again */
again:
	seen = invalidations;
	memset(&r, 0, sizeof(r));
	nsp = get_namespace_oid("usage_billing", false);
	r.aggregates = get_relname_relid("usage_aggregates", nsp);
	r.aggregates_pkey = primary_key(r.aggregates);
	if (!OidIsValid(r.aggregates) || !OidIsValid(r.aggregates_pkey))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("usage_billing.usage_aggregates or its primary key is missing"),
				 errhint("Reinstall the extension: DROP EXTENSION usage_billing; CREATE EXTENSION usage_billing.")));
	r.agg_total = get_attnum(r.aggregates, "total");
	r.agg_slotted = get_attnum(r.aggregates, "slotted");
	r.agg_reserved = get_attnum(r.aggregates, "reserved");
	r.slots = get_relname_relid("usage_aggregate_slots", nsp);
	r.slots_pkey = primary_key(r.slots);
	if (OidIsValid(r.slots))
	{
		r.slot_slot = get_attnum(r.slots, "slot");
		r.slot_total = get_attnum(r.slots, "total");
		r.slot_budget = get_attnum(r.slots, "budget");
	}
	r.reservations = get_relname_relid("reservations", nsp);
	if (r.agg_total == InvalidAttrNumber)
		elog(ERROR, "usage_billing.usage_aggregates has no column \"total\"");

	if (seen != invalidations)
		goto again;
	relations = r;
	resolved = true;
	return &relations;
}
