/*-------------------------------------------------------------------------
 * direct_write.c
 *	  increment_usage's writes through table and index access, not SQL: the
 *	  writer and the ledger.
 *
 * Recording an event is two writes: append the event to the ledger
 * (usage_events) unless its idempotency key was recorded before, and fold it
 * into its (customer, meter, period) aggregate.  As SQL that is one statement
 * with two ModifyTable nodes, and the profile of a call is dominated by the
 * executor: plan revalidation, executor start and end, expression setup for
 * ON CONFLICT.  Here the same protocol runs on the table AM and the
 * executor's index routines directly, the way logical replication's apply
 * worker writes rows.  This file resolves the tables (the ledger, the
 * aggregates and, from 1.3, their escrow slots), opens and closes the
 * "writer" (the tables, their indexes and tuple slots) and appends to the
 * ledger; the aggregate side is direct_fold.c, and direct_write_int.h is
 * what the two share.
 *
 *	 ledger     speculative insertion with the idempotency index as arbiter,
 *				exactly what INSERT ... ON CONFLICT DO NOTHING does: a
 *				pre-check that waits for an in-progress inserter of the same
 *				key, then insert, then a recheck that backs the row out and
 *				starts over if a concurrent insert won.  Without a key there
 *				is no arbiter and a plain insert.
 *	 aggregate  a lookup through the primary key and an update of the version
 *				found, or a speculative insert (direct_fold.c); on a
 *				contended sum or count key, this backend's escrow slot
 *				(direct_escrow.c, escrow.c).
 *
 * Without escrow slots the result is the SQL path's, row for row: the same
 * column values, the same serialization, the same waits; with them, the
 * same totals, limits and alerts, with the key's total split between its
 * row and its slots.  Columns we do not set (the
 * ledger's event_id identity, kind, recorded_by, recorded_at) take their
 * declared defaults, evaluated here.
 *
 * It is only used where it is equivalent: not for unique_count meters (their
 * contribution depends on a third table; record.c), read committed (the SQL path's
 * ON CONFLICT would raise serialization failures under repeatable read),
 * a read-write transaction, plain tables without row triggers (triggers and
 * partitions are what the executor would add), a caller for whom neither
 * permissions nor row-level security would stop the SQL, and not when
 * usage_billing.direct_writes is off (tables distributed with Citus are
 * written on the shards, which only SQL reaches).  Everything else takes the
 * SQL path in record.c.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "parser/parsetree.h"
#include "rewrite/rewriteHandler.h"
#include "storage/lmgr.h"
#include "storage/procarray.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"

#include "direct_write_int.h"
#include "usage_billing.h"

bool		ub_direct_writes = true;

/* Ledger columns we write; the rest take their defaults. */
enum
{
	LEDGER_CUSTOMER, LEDGER_METER, LEDGER_PERIOD_START, LEDGER_OCCURRED_AT, LEDGER_AMOUNT,
	LEDGER_KEY, LEDGER_PROPERTIES, LEDGER_NCOLS
};
static const char *const ledger_columns[LEDGER_NCOLS] = {
	"customer_id", "meter", "period_start", "occurred_at", "amount",
	"idempotency_key", "properties"
};

/* Names of the aggregates' columns we write, in the order of AGG_* (direct_write_int.h). */
static const char *const agg_columns[AGG_NCOLS] = {
	"customer_id", "meter", "period_start", "period_end", "total", "previous_total",
	"event_count", "first_usage", "last_usage", "updated_at", "slotted"
};

/* Names of the escrow slots' columns, in the order of SLOT_* (direct_write_int.h). */
static const char *const slot_columns[SLOT_NCOLS] = {
	"customer_id", "meter", "period_start", "slot", "total", "event_count",
	"budget", "floor_total", "budget_limit", "first_usage", "last_usage", "updated_at"
};

static TargetTable ledger;
static TargetTable aggregates;
static TargetTable slots;
static bool tables_valid = false;
static uint64 invalidations = 0;
static bool callback_registered = false;
static MemoryContext tables_cxt = NULL;

static void forget_tables(Datum arg, Oid relid);
static void resolve_table(TargetTable *t, Oid nsp, const char *relname, const char *arbiter,
						  const char *const *columns, int ncols, int nrequired);
static void resolve_tables(void);
static ResultRelInfo *open_target(EState *estate, const TargetTable *t, Index rti);

/* Relcache callback: our tables were altered, dropped or created again (or everything was reset). */
static void
forget_tables(Datum arg, Oid relid)
{
	if (relid != InvalidOid && tables_valid &&
		relid != ledger.relid && relid != aggregates.relid && relid != slots.relid)
		return;
	tables_valid = false;
	invalidations++;
}

/* Finds one table, its arbiter index, the attribute numbers of our columns and its defaults. */
static void
resolve_table(TargetTable *t, Oid nsp, const char *relname, const char *arbiter,
			  const char *const *columns, int ncols, int nrequired)
{
	Relation	rel;
	TupleDesc	desc;
	int			i;

	t->relid = get_relname_relid(relname, nsp);
	t->arbiter = get_relname_relid(arbiter, nsp);
	if (nrequired == 0 && !OidIsValid(t->relid))
		return;
	if (!OidIsValid(t->relid) || !OidIsValid(t->arbiter))
		elog(ERROR, "usage_billing.%s or its index %s is missing", relname, arbiter);

	rel = table_open(t->relid, AccessShareLock);
	desc = RelationGetDescr(rel);
	t->natts = desc->natts;
	t->attnums = palloc(sizeof(AttrNumber) * ncols);
	for (i = 0; i < ncols; i++)
	{
		t->attnums[i] = get_attnum(t->relid, columns[i]);
		if (t->attnums[i] == InvalidAttrNumber && i < nrequired)
			elog(ERROR, "usage_billing.%s has no column \"%s\"", relname, columns[i]);
	}
	t->defaults = palloc0(sizeof(ExprState *) * desc->natts);
	t->volatile_default = palloc0(sizeof(bool) * desc->natts);
	for (i = 0; i < desc->natts; i++)
	{
		Node	   *def;

		if (TupleDescAttr(desc, i)->attisdropped)
			continue;
		def = build_column_default(rel, i + 1);
		if (def != NULL)
		{
			Expr	   *expr = expression_planner((Expr *) def);

			t->defaults[i] = ExecInitExpr(expr, NULL);
			t->volatile_default[i] = contain_volatile_functions((Node *) expr);
		}
	}
	table_close(rel, AccessShareLock);
}

/* Finds the ledger and the aggregates, their arbiter indexes, columns and defaults. */
static void
resolve_tables(void)
{
	MemoryContext old;
	Oid			nsp;
	uint64		seen;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(forget_tables, (Datum) 0);
		callback_registered = true;
	}
	if (tables_valid)
		return;
	if (tables_cxt == NULL)
		tables_cxt = AllocSetContextCreate(TopMemoryContext, "usage_billing direct writes",
										   ALLOCSET_SMALL_SIZES);
	MemoryContextReset(tables_cxt);
	old = MemoryContextSwitchTo(tables_cxt);
	nsp = get_namespace_oid("usage_billing", false);
	seen = invalidations;
	resolve_table(&ledger, nsp, "usage_events", "usage_events_idempotency_idx",
				  ledger_columns, LEDGER_NCOLS, LEDGER_NCOLS);
	/* slotted and the escrow slots came with 1.3; an older schema has neither */
	resolve_table(&aggregates, nsp, "usage_aggregates", "usage_aggregates_pkey",
				  agg_columns, AGG_NCOLS, AGG_SLOTTED);
	resolve_table(&slots, nsp, "usage_aggregate_slots", "usage_aggregate_slots_pkey",
				  slot_columns, SLOT_NCOLS, 0);
	if (!OidIsValid(slots.relid) || aggregates.attnums[AGG_SLOTTED] == InvalidAttrNumber)
		slots.relid = InvalidOid;
	MemoryContextSwitchTo(old);
	/* an invalidation while we read makes the next call read again */
	tables_valid = (invalidations == seen);
}

/* A column default, evaluated into the current memory context. */
Datum
ub_direct_eval_default(EState *estate, ExprState *state, Form_pg_attribute att, bool *isnull)
{
	Datum		value = ExecEvalExprSwitchContext(state, GetPerTupleExprContext(estate), isnull);

	return *isnull ? (Datum) 0 : datumCopy(value, att->attbyval, att->attlen);
}

/* Opens a target table for writing as range table entry rti, with its indexes. */
static ResultRelInfo *
open_target(EState *estate, const TargetTable *t, Index rti)
{
	Relation	rel = table_open(t->relid, RowExclusiveLock);
	ResultRelInfo *rri = makeNode(ResultRelInfo);

	InitResultRelInfo(rri, rel, rti, NULL, 0);
	ExecOpenIndices(rri, true);
	return rri;
}

/*
 * INSERT ... ON CONFLICT DO NOTHING for one row: false when the arbiter found
 * a conflicting row (after waiting for its inserter, if in progress).
 */
bool
ub_direct_speculative_insert(EState *estate, ResultRelInfo *rri, TupleTableSlot *slot, List *arbiters)
{
	Relation	rel = rri->ri_RelationDesc;

	for (;;)
	{
		ItemPointerData conflict_tid;
		uint32		token;
		bool		conflict = false;
		List	   *recheck;

		if (!ExecCheckIndexConstraints(rri, slot, estate, &conflict_tid, arbiters))
			return false;

		token = SpeculativeInsertionLockAcquire(GetCurrentTransactionId());
		table_tuple_insert_speculative(rel, slot, estate->es_output_cid, 0, NULL, token);
		recheck = ExecInsertIndexTuples(rri, slot, estate, false, true, &conflict, arbiters);
		table_tuple_complete_speculative(rel, slot, token, !conflict);
		SpeculativeInsertionLockRelease(GetCurrentTransactionId());
		list_free(recheck);
		if (!conflict)
			return true;
		/* a concurrent insert of the same key won the race: look again */
	}
}

/* Fills slot with the ledger row of an event; columns we do not set take their defaults. */
static void
fill_ledger_row(UbDirectWriter *w, TupleTableSlot *slot, const UbEventInput *in,
				TimestampTz period_start)
{
	Datum	   *values = slot->tts_values;
	bool	   *nulls = slot->tts_isnull;
	int			i;

	ExecClearTuple(slot);
	for (i = 0; i < ledger.natts; i++)
	{
		if (ledger.defaults[i] != NULL && ledger.volatile_default[i])
			values[i] = ub_direct_eval_default(w->estate, ledger.defaults[i],
									 TupleDescAttr(slot->tts_tupleDescriptor, i), &nulls[i]);
		else
		{
			values[i] = w->ledger_defaults[i];
			nulls[i] = w->ledger_default_nulls[i];
		}
	}
#define SET_COL(col, isnull, value) \
	do { \
		int			a_ = ledger.attnums[col] - 1; \
		nulls[a_] = (isnull); \
		values[a_] = (isnull) ? (Datum) 0 : (value); \
	} while (0)
	SET_COL(LEDGER_CUSTOMER, false, CStringGetTextDatum(in->customer_id));
	SET_COL(LEDGER_METER, false, CStringGetTextDatum(in->meter));
	SET_COL(LEDGER_PERIOD_START, false, TimestampTzGetDatum(period_start));
	SET_COL(LEDGER_OCCURRED_AT, false, TimestampTzGetDatum(in->occurred_at));
	SET_COL(LEDGER_AMOUNT, false, NumericGetDatum(in->amount));
	SET_COL(LEDGER_KEY, in->idempotency_key == NULL,
			in->idempotency_key ? CStringGetTextDatum(in->idempotency_key) : (Datum) 0);
	SET_COL(LEDGER_PROPERTIES, in->properties == NULL, JsonbPGetDatum(in->properties));
#undef SET_COL
	ExecStoreVirtualTuple(slot);

	if (w->rri[0]->ri_RelationDesc->rd_att->constr)
		ExecConstraints(w->rri[0], slot, w->estate);
}

/* Appends an event to the ledger; false when its idempotency key was recorded before. */
bool
ub_direct_insert_event(UbDirectWriter *w, const UbEventInput *in, TimestampTz period_start)
{
	ResultRelInfo *rri = w->rri[0];
	TupleTableSlot *slot = w->ledger_row;

	w->estate->es_output_cid = GetCurrentCommandId(true);
	fill_ledger_row(w, slot, in, period_start);

	if (in->idempotency_key != NULL)
		return ub_direct_speculative_insert(w->estate, rri, slot, list_make1_oid(ledger.arbiter));

	/* no key, nothing to conflict on: the idempotency index is partial and skips the row */
	simple_table_tuple_insert(rri->ri_RelationDesc, slot);
	list_free(ExecInsertIndexTuples(rri, slot, w->estate, false, false, NULL, NIL));
	return true;
}

/* Orders positions of keyed events (in arg, the events) by customer, then idempotency key. */
static int
key_order_cmp(const void *a, const void *b, void *arg)
{
	const UbEventInput *const *ins = arg;
	const UbEventInput *x = ins[*(const int *) a];
	const UbEventInput *y = ins[*(const int *) b];
	int			c = strcmp(x->customer_id, y->customer_id);

	return c != 0 ? c : strcmp(x->idempotency_key, y->idempotency_key);
}

/*
 * Appends n events to the ledger, setting accepted[i] to whether event i was
 * written (false: its key was recorded before).  Keyed events go one by one
 * through the arbiter; the keyless ones, which cannot conflict, as one
 * multi-row heap insert (one WAL record per page instead of one per row), as
 * COPY does.
 */
void
ub_direct_insert_events(UbDirectWriter *w, const UbEventInput *const *ins,
						const TimestampTz *period_starts, int n, bool *accepted)
{
	ResultRelInfo *rri = w->rri[0];
	int			nplain = 0;
	int			nkeyed = 0;
	int		   *keyed;
	int			i;

	w->estate->es_output_cid = GetCurrentCommandId(true);
	if (w->nledger_rows < n)
	{
		MemoryContext old = MemoryContextSwitchTo(w->estate->es_query_cxt);
		TupleDesc	desc = RelationGetDescr(rri->ri_RelationDesc);

		w->ledger_rows = w->ledger_rows == NULL ?
			palloc(sizeof(TupleTableSlot *) * n) :
			repalloc(w->ledger_rows, sizeof(TupleTableSlot *) * n);
		for (i = w->nledger_rows; i < n; i++)
			w->ledger_rows[i] = ExecInitExtraTupleSlot(w->estate, desc, &TTSOpsVirtual);
		w->nledger_rows = n;
		MemoryContextSwitchTo(old);
	}

	/*
	 * Keyed rows in (customer, key) order: a concurrent batch that shares
	 * keys with this one waits for us on its first shared key instead of
	 * holding one we need next, so two batches never deadlock on keys.
	 */
	keyed = palloc(sizeof(int) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		if (ins[i]->idempotency_key != NULL)
		{
			keyed[nkeyed++] = i;
			continue;
		}
		fill_ledger_row(w, w->ledger_rows[nplain++], ins[i], period_starts[i]);
		accepted[i] = true;
	}
	qsort_arg(keyed, nkeyed, sizeof(int), key_order_cmp, (void *) ins);
	for (i = 0; i < nkeyed; i++)
		accepted[keyed[i]] = ub_direct_insert_event(w, ins[keyed[i]], period_starts[keyed[i]]);
	pfree(keyed);
	if (nplain == 0)
		return;

	table_multi_insert(rri->ri_RelationDesc, w->ledger_rows, nplain,
					   w->estate->es_output_cid, 0, NULL);
	for (i = 0; i < nplain; i++)
		list_free(ExecInsertIndexTuples(rri, w->ledger_rows[i], w->estate,
										false, false, NULL, NIL));
}


/*
 * Can events of this transaction take the direct path?  Checks what does not
 * need the tables open; ub_direct_open checks the rest.
 */
bool
ub_direct_writes_usable(void)
{
	return ub_direct_writes &&
		!IsolationUsesXactSnapshot() &&
		!XactReadOnly &&
		!IsInParallelMode();
}

/*
 * Opens the ledger and the aggregates for writing.  NULL when the tables
 * need what only the executor does (row triggers, partitions): then nothing
 * was written and the caller takes the SQL path.
 */
UbDirectWriter *
ub_direct_open(void)
{
	MemoryContext caller = CurrentMemoryContext;
	const TargetTable *targets[3];
	UbDirectWriter *w;
	EState	   *estate;
	List	   *rtable = NIL;
	int			ntargets;
	int			i;

	resolve_tables();
	targets[0] = &ledger;
	targets[1] = &aggregates;
	targets[2] = &slots;
	/* a schema before 1.3 has no escrow slots: rri[2] stays NULL */
	ntargets = OidIsValid(slots.relid) ? 3 : 2;

	/* writes of earlier calls in this statement must be visible to our lookups */
	CommandCounterIncrement();

	estate = CreateExecutorState();
	for (i = 0; i < ntargets; i++)
	{
		RangeTblEntry *rte = makeNode(RangeTblEntry);

		rte->rtekind = RTE_RELATION;
		rte->relid = targets[i]->relid;
		rte->relkind = RELKIND_RELATION;
		rte->rellockmode = RowExclusiveLock;
		rtable = lappend(rtable, rte);
	}
	ExecInitRangeTable(estate, rtable);
	estate->es_output_cid = GetCurrentCommandId(true);
	estate->es_snapshot = ActiveSnapshotSet() ? GetActiveSnapshot() : InvalidSnapshot;
	MemoryContextSwitchTo(caller);

	w = palloc0(sizeof(UbDirectWriter));
	w->estate = estate;
	w->agg_table = &aggregates;
	w->slot_table = &slots;
	for (i = 0; i < ntargets; i++)
		w->rri[i] = open_target(estate, targets[i], i + 1);

	for (i = 0; i < ntargets; i++)
	{
		static const AclMode modes[3] = {ACL_INSERT, ACL_INSERT | ACL_UPDATE,
		ACL_INSERT | ACL_UPDATE | ACL_DELETE};
		Relation	rel = w->rri[i]->ri_RelationDesc;

		/*
		 * What the executor would add to these writes, we do not: leave it
		 * to SQL.  That includes its permission checks and row-level
		 * security: increment_usage runs as the tables' owner (SECURITY
		 * DEFINER), for whom both pass, but should a role without them ever
		 * get here, SQL refuses or filters as it must.  Triggers are read
		 * from the trigger descriptor: pg_class.relhastriggers stays set
		 * after DROP TRIGGER until the next VACUUM.
		 */
		if (rel->trigdesc != NULL || rel->rd_rel->relkind != RELKIND_RELATION ||
			RelationGetDescr(rel)->natts != targets[i]->natts ||
			pg_class_aclcheck(targets[i]->relid, GetUserId(), modes[i]) != ACLCHECK_OK ||
			check_enable_rls(targets[i]->relid, InvalidOid, true) == RLS_ENABLED)
		{
			ub_direct_close(w);
			return NULL;
		}
	}

	for (i = 0; i < w->rri[1]->ri_NumIndices; i++)
		if (RelationGetRelid(w->rri[1]->ri_IndexRelationDescs[i]) == aggregates.arbiter)
			w->pkey = w->rri[1]->ri_IndexRelationDescs[i];
	if (w->pkey == NULL)
		elog(ERROR, "usage_billing.usage_aggregates_pkey is not open");
	if (w->rri[2] != NULL)
	{
		for (i = 0; i < w->rri[2]->ri_NumIndices; i++)
			if (RelationGetRelid(w->rri[2]->ri_IndexRelationDescs[i]) == slots.arbiter)
				w->slot_pkey = w->rri[2]->ri_IndexRelationDescs[i];
		if (w->slot_pkey == NULL)
			elog(ERROR, "usage_billing.usage_aggregate_slots_pkey is not open");
	}

	w->ledger_row = ExecInitExtraTupleSlot(estate, RelationGetDescr(w->rri[0]->ri_RelationDesc),
										   &TTSOpsVirtual);
	/* now(), session_user, constants: the same for every row of the statement */
	w->ledger_defaults = palloc0(sizeof(Datum) * ledger.natts);
	w->ledger_default_nulls = palloc(sizeof(bool) * ledger.natts);
	for (i = 0; i < ledger.natts; i++)
	{
		w->ledger_default_nulls[i] = true;
		if (ledger.defaults[i] != NULL && !ledger.volatile_default[i])
			w->ledger_defaults[i] = ub_direct_eval_default(estate, ledger.defaults[i],
												 TupleDescAttr(RelationGetDescr(w->rri[0]->ri_RelationDesc), i),
												 &w->ledger_default_nulls[i]);
	}
	w->agg_nblocks = InvalidBlockNumber;
	w->agg_old = ExecInitExtraTupleSlot(estate, RelationGetDescr(w->rri[1]->ri_RelationDesc),
										table_slot_callbacks(w->rri[1]->ri_RelationDesc));
	w->agg_row = ExecInitExtraTupleSlot(estate, RelationGetDescr(w->rri[1]->ri_RelationDesc),
										&TTSOpsVirtual);
	if (w->rri[2] != NULL)
	{
		w->slot_old = ExecInitExtraTupleSlot(estate, RelationGetDescr(w->rri[2]->ri_RelationDesc),
											 table_slot_callbacks(w->rri[2]->ri_RelationDesc));
		w->slot_row = ExecInitExtraTupleSlot(estate, RelationGetDescr(w->rri[2]->ri_RelationDesc),
											 &TTSOpsVirtual);
	}
	return w;
}

/* Closes the tables, keeping their locks to the end of the transaction as the executor does. */
void
ub_direct_close(UbDirectWriter *w)
{
	int			i;

	/* what runs after us (alerts, the next call) sees our writes */
	CommandCounterIncrement();
	for (i = 0; i < 3; i++)
	{
		if (w->rri[i] == NULL)
			continue;
		ExecCloseIndices(w->rri[i]);
		table_close(w->rri[i]->ri_RelationDesc, NoLock);
	}
	ExecResetTupleTable(w->estate->es_tupleTable, false);
	FreeExecutorState(w->estate);
	pfree(w);
}
