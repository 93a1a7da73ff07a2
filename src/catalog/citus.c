/*-------------------------------------------------------------------------
 * citus.c
 *	  Whether the schema is distributed with Citus on this node.
 *
 * usage_billing.distribute_with_citus() (sql/usage_billing--1.4--1.5.sql)
 * distributes the tables by customer_id.  On every node of such a cluster,
 * coordinator and workers alike, usage_billing.customers is then a Citus
 * table, and the relation of that name is only the shell of its shards: what
 * reads it without the executor (the index probes of the catalog and of
 * check_limit, the escrow slots' reads) would see an empty table, and what a
 * backend caches may be changed on another node, where no invalidation of
 * ours reaches.  So, when distributed, every read goes through SQL, which
 * Citus routes to the shard (on the node that holds it, locally), the
 * catalog is read afresh on every call instead of cached, and hot keys take
 * the row path (no escrow slots).
 *
 * The answer is found in pg_dist_partition (present when Citus is installed,
 * synced to the workers with the metadata) and kept until the next relcache
 * invalidation of any relation: distributing a table invalidates it, and
 * every transaction takes the invalidations committed before it starts.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/skey.h"
#include "access/table.h"
#include "fmgr.h"
#include "catalog/namespace.h"
#include "catalog/pg_namespace.h"
#include "executor/spi.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "citus.h"
#include "relations.h"

static bool known = false;
static bool distributed = false;
static bool callback_registered = false;

/* Relcache callback: a table may have been distributed (or the extension dropped). */
static void
forget_distributed(Datum arg, Oid relid)
{
	known = false;
}

/* Is usage_billing.customers in pg_dist_partition?  (Its first column is logicalrelid.) */
static bool
customers_distributed(void)
{
	Oid			customers = ub_schema_relation("customers");
	Oid			dist_partition;
	Relation	rel;
	SysScanDesc scan;
	ScanKeyData key;
	bool		found;

	dist_partition = get_relname_relid("pg_dist_partition", PG_CATALOG_NAMESPACE);
	if (!OidIsValid(customers) || !OidIsValid(dist_partition))
		return false;
	rel = table_open(dist_partition, AccessShareLock);
	ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(customers));
	scan = systable_beginscan(rel, InvalidOid, false, NULL, 1, &key);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return found;
}

/* Is the schema distributed with Citus on this node? */
bool
ub_distributed(void)
{
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(forget_distributed, (Datum) 0);
		callback_registered = true;
	}
	if (!known)
	{
		distributed = customers_distributed();
		known = true;
	}
	return distributed;
}

PG_FUNCTION_INFO_V1(ub_citus_distributed);

/* SQL: usage_billing.citus_distributed() */
Datum
ub_citus_distributed(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(ub_distributed());
}

/*
 * Is this node the coordinator of its Citus cluster?  In a transaction;
 * false when Citus is not installed.
 */
bool
ub_citus_coordinator(void)
{
	bool		coordinator = false;

	if (!OidIsValid(get_relname_relid("pg_dist_partition", PG_CATALOG_NAMESPACE)))
		return false;
	SPI_connect();
	if (SPI_execute("SELECT pg_catalog.citus_is_coordinator()", true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		coordinator = !isnull && DatumGetBool(d);
	}
	SPI_finish();
	return coordinator;
}
