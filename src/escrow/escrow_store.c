/*-------------------------------------------------------------------------
 * escrow_store.c
 *	  The escrow slots table: every read and write of usage_aggregate_slots.
 *
 * The rules live in escrow.c; this file holds the statements that apply
 * them, all through SPI with saved plans, so that whatever a DBA adds to
 * the slots or the aggregates (triggers, generated columns, constraints,
 * replica identity, publications) behaves as with plain SQL.  Words:
 *
 *	 slot       the usage_aggregate_slots row of one key that belongs to one
 *				backend (its "slot" column is the backend id)
 *	 read       a key's aggregate row and slots through their primary
 *				keys, without the executor, under one snapshot taken now: what
 *				the key holds and what it may still take (UbEscrowProbe); the
 *				spend's check and, under the row's lock, the row path's.
 *	 escrowed   every slot's total plus budget: spending moves budget into
 *				total, so only grants and folds change it
 *	 fold       delete a key's slots and add what they held to its row
 *	 give       add a budget to this backend's slot, creating it if needed
 *
 * The fold and give run inside the caller's SPI connection; the
 * functions that stand alone (fold of one key or of all, the SQL function
 * fold_escrow_slots) connect themselves.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/backendid.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "escrow.h"
#include "num.h"
#include "relations.h"

PG_FUNCTION_INFO_V1(ub_fold_escrow_slots);

static Oid	key_types[4] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, INT4OID};

/* Fills the first three statement arguments with the key. */
static void
key_args(Datum *args, const char *customer_id, const char *meter, TimestampTz period_start)
{
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
}

/* A numeric column of the first result row, copied; NULL for SQL NULL. */
static Numeric
result_numeric(int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col, &isnull);

	return isnull ? NULL : DatumGetNumericCopy(d);
}

/*
 * Under the aggregate row's lock: deletes every slot of the key, which waits
 * for a caller spending one, and adds what they held to the row.  Inside
 * the caller's SPI connection; returns the total the slots held (0 when
 * there were none) in the caller's memory context.
 */
Numeric
ub_escrow_fold_locked(const char *customer_id, const char *meter, TimestampTz period_start)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[3];
	int			ret;

	key_args(args, customer_id, meter, period_start);
	ret = SPI_execute_plan(ub_prepare_once(&plan,
										   "WITH gone AS ("
										   "  DELETE FROM usage_billing.usage_aggregate_slots"
										   "   WHERE customer_id = $1 AND meter = $2 AND period_start = $3"
										   "  RETURNING total, event_count, first_usage, last_usage)"
										   " UPDATE usage_billing.usage_aggregates a"
										   "    SET total = a.total + g.total,"
										   "        event_count = a.event_count + g.event_count,"
										   "        first_usage = least(a.first_usage, g.first_usage),"
										   "        last_usage = greatest(a.last_usage, g.last_usage),"
										   "        slotted = false"
										   "   FROM (SELECT coalesce(sum(total), 0) AS total,"
										   "                coalesce(sum(event_count), 0)::bigint AS event_count,"
										   "                min(first_usage) AS first_usage,"
										   "                max(last_usage) AS last_usage FROM gone) g"
										   "  WHERE a.customer_id = $1 AND a.meter = $2 AND a.period_start = $3"
										   " RETURNING g.total",
										   3, key_types),
						   args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE_RETURNING || SPI_processed != 1)
		elog(ERROR, "escrow fold failed: %s", SPI_result_code_string(ret));
	return result_numeric(1);
}

/*
 * Under the aggregate row's lock: adds budget (NULL: no limit) to this
 * backend's slot, granted at floor_total below budget_limit, creating the
 * slot if needed, and marks the row as having slots.  Inside the caller's
 * SPI connection.
 */
void
ub_escrow_give(const char *customer_id, const char *meter, TimestampTz period_start,
			   Numeric floor_total, Numeric budget, Numeric budget_limit)
{
	static SPIPlanPtr plan = NULL;
	static Oid	types[7] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, INT4OID, NUMERICOID,
	NUMERICOID, NUMERICOID};
	Datum		args[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			ret;

	key_args(args, customer_id, meter, period_start);
	args[3] = Int32GetDatum(MyBackendId);
	args[4] = budget ? NumericGetDatum(budget) : (Datum) 0;
	nulls[4] = budget ? ' ' : 'n';
	args[5] = NumericGetDatum(floor_total);
	args[6] = budget_limit ? NumericGetDatum(budget_limit) : (Datum) 0;
	nulls[6] = budget_limit ? ' ' : 'n';
	ret = SPI_execute_plan(ub_prepare_once(&plan,
										   "WITH given AS ("
										   "  INSERT INTO usage_billing.usage_aggregate_slots AS s"
										   "         (customer_id, meter, period_start, slot, total, event_count,"
										   "          budget, floor_total, budget_limit, updated_at)"
										   "  VALUES ($1, $2, $3, $4, 0, 0, $5, $6, $7, pg_catalog.now())"
										   "  ON CONFLICT (customer_id, meter, period_start, slot) DO UPDATE"
										   "     SET budget = CASE WHEN EXCLUDED.budget IS NULL OR s.budget IS NULL"
										   "                       THEN EXCLUDED.budget"
										   "                       ELSE s.budget + EXCLUDED.budget END,"
										   "         floor_total = EXCLUDED.floor_total,"
										   "         budget_limit = EXCLUDED.budget_limit,"
										   "         updated_at = EXCLUDED.updated_at"
										   "  RETURNING 1)"
										   " UPDATE usage_billing.usage_aggregates a SET slotted = true"
										   "  WHERE a.customer_id = $1 AND a.meter = $2 AND a.period_start = $3"
										   "    AND NOT a.slotted AND EXISTS (SELECT FROM given)",
										   7, types),
						   args, nulls, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "escrow grant failed: %s", SPI_result_code_string(ret));
}

/*
 * Folds one key's slots into its aggregate row: locks the row first (the
 * order every writer takes), then folds.  For the writers that did not lock
 * the row themselves: corrections, the worker.  Returns the total the slots
 * held (0 when the key had none), in the caller's memory context.
 */
Numeric
ub_escrow_fold_key(const char *customer_id, const char *meter, TimestampTz period_start)
{
	static SPIPlanPtr lock_plan = NULL;
	MemoryContext caller = CurrentMemoryContext;
	Numeric		folded = NULL;
	Datum		args[3];
	int			ret;

	if (!ub_escrow_installed())
		return ub_num_zero();

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();
	key_args(args, customer_id, meter, period_start);
	ret = SPI_execute_plan(ub_prepare_once(&lock_plan,
										   "SELECT 1 FROM usage_billing.usage_aggregates"
										   " WHERE customer_id = $1 AND meter = $2 AND period_start = $3"
										   "   AND slotted FOR NO KEY UPDATE", 3, key_types),
						   args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "aggregate lock failed: %s", SPI_result_code_string(ret));
	if (SPI_processed > 0)
	{
		Numeric		n = ub_escrow_fold_locked(customer_id, meter, period_start);
		MemoryContext spi = MemoryContextSwitchTo(caller);

		folded = DatumGetNumericCopy(NumericGetDatum(n));
		MemoryContextSwitchTo(spi);
	}
	PopOverrideSearchPath();
	SPI_finish();
	return folded != NULL ? folded : ub_num_zero();
}

/*
 * Folds the slots of every slotted aggregate, or of one customer's
 * (customer_id not NULL), one key at a time; returns how many keys.  It
 * reads the slots table, which is small, not the aggregates.  With
 * idle_seconds > 0, only keys whose slots nobody wrote for that long: the
 * export worker runs it every cycle so that slots do not pile up, and
 * leaves the keys that are hot right now alone.
 */
int64
ub_escrow_fold_all(const char *customer_id, int idle_seconds)
{
	static SPIPlanPtr keys_plan = NULL;
	Oid			types[2] = {TEXTOID, INT4OID};
	Datum		args[2];
	char		nulls[2];
	SPITupleTable *keys;
	uint64		n;
	uint64		i;

	if (!ub_escrow_installed())
		return 0;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();
	args[0] = customer_id ? CStringGetTextDatum(customer_id) : (Datum) 0;
	nulls[0] = customer_id ? ' ' : 'n';
	args[1] = Int32GetDatum(idle_seconds);
	nulls[1] = ' ';
	if (SPI_execute_plan(ub_prepare_once(&keys_plan,
										 "SELECT customer_id, meter, period_start"
										 "  FROM usage_billing.usage_aggregate_slots"
										 " WHERE $1 IS NULL OR customer_id = $1"
										 " GROUP BY 1, 2, 3"
										 " HAVING max(updated_at) <= pg_catalog.now()"
										 "       - pg_catalog.make_interval(secs => $2)"
										 " ORDER BY 1, 2, 3", 2, types),
						 args, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "slotted aggregates lookup failed");
	keys = SPI_tuptable;
	n = SPI_processed;
	for (i = 0; i < n; i++)
	{
		HeapTuple	t = keys->vals[i];
		bool		isnull;
		char	   *customer = TextDatumGetCString(SPI_getbinval(t, keys->tupdesc, 1, &isnull));
		char	   *meter = TextDatumGetCString(SPI_getbinval(t, keys->tupdesc, 2, &isnull));
		TimestampTz period_start = DatumGetTimestampTz(SPI_getbinval(t, keys->tupdesc, 3, &isnull));

		CHECK_FOR_INTERRUPTS();
		(void) ub_escrow_fold_key(customer, meter, period_start);
	}
	PopOverrideSearchPath();
	SPI_finish();
	return (int64) n;
}

/* SQL: fold_escrow_slots(customer_id DEFAULT NULL), the number of aggregates folded. */
Datum
ub_fold_escrow_slots(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(ub_escrow_fold_all(PG_ARGISNULL(0) ? NULL :
									   text_to_cstring(PG_GETARG_TEXT_PP(0)), 0));
}

/*
 * Scan keys for the aggregate key (customer, meter, period_start) on an
 * index that starts with those columns (the aggregates' and the slots'
 * primary keys), compared in the index's own collations as the planner would.
 */
void
ub_key_scankeys(Relation index, Datum customer, Datum meter, TimestampTz period_start,
				ScanKeyData *keys)
{
	ScanKeyEntryInitialize(&keys[0], 0, 1, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[0], F_TEXTEQ, customer);
	ScanKeyEntryInitialize(&keys[1], 0, 2, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[1], F_TEXTEQ, meter);
	ScanKeyEntryInitialize(&keys[2], 0, 3, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[2], F_TIMESTAMPTZ_EQ,
						   TimestampTzGetDatum(period_start));
}

/*
 * Adds up a key's slots visible to snapshot (total, events): the read of
 * check_limit's direct probe.  The caller has the table and its primary key
 * open.
 */
void
ub_escrow_slot_sum(Relation slots, Relation pkey, Datum customer, Datum meter,
				   TimestampTz period_start, Snapshot snapshot, Numeric *total,
				   int64 *event_count)
{
	Oid			relid = RelationGetRelid(slots);
	AttrNumber	total_att = get_attnum(relid, "total");
	AttrNumber	count_att = get_attnum(relid, "event_count");
	ScanKeyData keys[3];
	IndexScanDesc scan;
	TupleTableSlot *tuple;

	if (total_att == InvalidAttrNumber || count_att == InvalidAttrNumber)
		elog(ERROR, "usage_billing.usage_aggregate_slots is missing a column");
	*total = ub_num_zero();
	*event_count = 0;
	ub_key_scankeys(pkey, customer, meter, period_start, keys);
	tuple = table_slot_create(slots, NULL);
	scan = index_beginscan(slots, pkey, snapshot, 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	while (index_getnext_slot(scan, ForwardScanDirection, tuple))
	{
		bool		isnull;

		*total = ub_num_add(*total, DatumGetNumeric(slot_getattr(tuple, total_att, &isnull)));
		*event_count += DatumGetInt64(slot_getattr(tuple, count_att, &isnull));
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(tuple);
}

/*
 * Reads a key without the executor: its aggregate row (total, reserved) and
 * every slot (totals, budgets, this backend's), through the tables' primary
 * keys under a snapshot taken now, which also sees what this transaction
 * wrote before.  Only reads: the writes are statements.  Returns false when
 * the key has no aggregate row.  Numbers in the caller's memory context.
 */
bool
ub_escrow_read(const char *customer_id, const char *meter, TimestampTz period_start,
			   UbEscrowProbe *p)
{
	const UbRelations *rels = ub_relations();
	Relation	aggs = table_open(rels->aggregates, AccessShareLock);
	Relation	slots = table_open(rels->slots, AccessShareLock);
	Relation	index;
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	Datum		customer = CStringGetTextDatum(customer_id);
	Datum		meter_d = CStringGetTextDatum(meter);
	AttrNumber	total_att = rels->agg_total;
	AttrNumber	reserved_att = rels->agg_reserved;
	AttrNumber	slot_att = rels->slot_slot;
	AttrNumber	stotal_att = rels->slot_total;
	AttrNumber	budget_att = rels->slot_budget;
	Oid			aggs_pkey = rels->aggregates_pkey;
	Oid			slots_pkey = rels->slots_pkey;
	ScanKeyData keys[3];
	IndexScanDesc scan;
	TupleTableSlot *tuple;
	bool		isnull;
	Datum		d;

	memset(p, 0, sizeof(*p));
	p->row_total = p->reserved = p->slots_total = p->others_total = ub_num_zero();
	p->escrowed = ub_num_zero();

	/* the row */
	index = index_open(aggs_pkey, AccessShareLock);
	ub_key_scankeys(index, customer, meter_d, period_start, keys);
	tuple = table_slot_create(aggs, NULL);
	scan = index_beginscan(aggs, index, snapshot, 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	if (index_getnext_slot(scan, ForwardScanDirection, tuple))
	{
		p->row_found = true;
		d = slot_getattr(tuple, total_att, &isnull);
		if (!isnull)
			p->row_total = DatumGetNumericCopy(d);
		if (reserved_att != InvalidAttrNumber)
		{
			d = slot_getattr(tuple, reserved_att, &isnull);
			if (!isnull)
				p->reserved = DatumGetNumericCopy(d);
		}
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(tuple);
	index_close(index, AccessShareLock);

	/* the slots */
	index = index_open(slots_pkey, AccessShareLock);
	ub_key_scankeys(index, customer, meter_d, period_start, keys);
	tuple = table_slot_create(slots, NULL);
	scan = index_beginscan(slots, index, snapshot, 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	while (p->row_found && index_getnext_slot(scan, ForwardScanDirection, tuple))
	{
		Numeric		total = DatumGetNumeric(slot_getattr(tuple, stotal_att, &isnull));
		bool		own = DatumGetInt32(slot_getattr(tuple, slot_att, &isnull)) == MyBackendId;

		d = slot_getattr(tuple, budget_att, &isnull);
		p->slots_total = ub_num_add(p->slots_total, total);
		if (own)
		{
			p->own_found = true;
			p->own_budget = isnull ? NULL : DatumGetNumericCopy(d);
		}
		else
			p->others_total = ub_num_add(p->others_total, total);
		if (isnull)
			p->unbounded = true;
		else
			p->escrowed = ub_num_add(p->escrowed, ub_num_add(total, DatumGetNumeric(d)));
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(tuple);
	index_close(index, AccessShareLock);

	UnregisterSnapshot(snapshot);
	table_close(slots, AccessShareLock);
	table_close(aggs, AccessShareLock);
	if (p->unbounded)
		p->escrowed = NULL;
	return p->row_found;
}
