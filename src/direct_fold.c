/*-------------------------------------------------------------------------
 * direct_fold.c
 *	  Folding usage into an aggregate row through table and index access.
 *
 * The aggregate side of direct_write.c's writer (which opens the tables and
 * appends to the ledger; direct_write_int.h is what the two share).  An
 * "aggregate" is the usage_aggregates row of one (customer, meter, period);
 * a "delta" (UbAggregateDelta) is what one call, or one group of a batch,
 * adds to it.  Folding follows INSERT ... ON CONFLICT DO UPDATE:
 *
 *	 find the row through the primary key with a dirty snapshot (waiting for
 *	 an in-progress inserter) and update the version found; the update waits
 *	 for a concurrent updater and fails if that one committed, and then we
 *	 read again.  When there is no row, insert it speculatively and go back
 *	 to the lookup if a concurrent insert won.  The updated row stays locked
 *	 to commit, so callers on one aggregate are serialized and the hard-cap
 *	 check after the update stays exact.  ON CONFLICT DO UPDATE locks the row
 *	 before updating it, a second WAL record that this path does without.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "executor/executor.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "direct_write_int.h"
#include "pricing.h"

static bool find_aggregate(Relation rel, Relation pkey, Datum customer, Datum meter,
						   TimestampTz period_start, TupleTableSlot *out);
static bool update_aggregate(EState *estate, ResultRelInfo *rri, TupleTableSlot *old,
							 TupleTableSlot *row);

/*
 * Looks the aggregate up through its primary key with a dirty snapshot, which
 * also sees rows of transactions in progress.  A row being inserted by one is
 * waited for: its commit or abort decides whether there is a row.  A row
 * being updated by one is returned as is; update_aggregate waits for that
 * transaction.
 */
static bool
find_aggregate(Relation rel, Relation pkey, Datum customer, Datum meter,
			   TimestampTz period_start, TupleTableSlot *out)
{
	SnapshotData dirty;
	ScanKeyData keys[3];
	IndexScanDesc scan;
	bool		found;

	InitDirtySnapshot(dirty);
	ScanKeyEntryInitialize(&keys[0], 0, 1, BTEqualStrategyNumber, InvalidOid,
						   pkey->rd_indcollation[0], F_TEXTEQ, customer);
	ScanKeyEntryInitialize(&keys[1], 0, 2, BTEqualStrategyNumber, InvalidOid,
						   pkey->rd_indcollation[1], F_TEXTEQ, meter);
	ScanKeyEntryInitialize(&keys[2], 0, 3, BTEqualStrategyNumber, InvalidOid,
						   pkey->rd_indcollation[2], F_TIMESTAMPTZ_EQ,
						   TimestampTzGetDatum(period_start));
	scan = index_beginscan(rel, pkey, &dirty, 3, 0);
	for (;;)
	{
		index_rescan(scan, keys, 3, NULL, 0);
		found = index_getnext_slot(scan, ForwardScanDirection, out);
		if (found && TransactionIdIsValid(dirty.xmin))
		{
			XactLockTableWait(dirty.xmin, rel, &out->tts_tid, XLTW_None);
			continue;
		}
		break;
	}
	if (found)
		ExecMaterializeSlot(out);
	index_endscan(scan);
	return found;
}

/*
 * Replaces the version of the aggregate we read by row.  heap_update waits
 * for a transaction that is updating or locking it; returns false when the
 * version is no longer the latest (someone committed an update first), and
 * the caller reads again.  No separate row lock: the update is the lock, and
 * it is held to commit, which is what serializes callers and keeps the
 * hard-cap check exact.
 */
static bool
update_aggregate(EState *estate, ResultRelInfo *rri, TupleTableSlot *old, TupleTableSlot *row)
{
	Relation	rel = rri->ri_RelationDesc;
	TM_FailureData tmfd;
	LockTupleMode lockmode;
	bool		update_indexes;
	TM_Result	res;

	CheckCmdReplicaIdentity(rel, CMD_UPDATE);
	res = table_tuple_update(rel, &old->tts_tid, row, estate->es_output_cid,
							 estate->es_snapshot, InvalidSnapshot, true,
							 &tmfd, &lockmode, &update_indexes);
	switch (res)
	{
		case TM_Ok:
			if (update_indexes && rri->ri_NumIndices > 0)
				list_free(ExecInsertIndexTuples(rri, row, estate, true, false, NULL, NIL));
			return true;
		case TM_Updated:
		case TM_Deleted:
			return false;
		case TM_SelfModified:
			/* we increment the command counter before every call: cannot happen */
			elog(ERROR, "aggregate row already modified by this command");
			break;
		default:
			elog(ERROR, "unexpected result %d updating an aggregate row", (int) res);
			break;
	}
	return false;
}

/*
 * Folds a delta into its aggregate, INSERT ... ON CONFLICT DO UPDATE as in
 * record.c's SQL: returns the new total and the one before (NULL for a new
 * row), in the caller's memory context.
 */
void
ub_direct_fold(UbDirectWriter *w, const UbAggregateDelta *d, Numeric *total,
			   Numeric *previous_total)
{
	ResultRelInfo *rri = w->rri[1];
	const TargetTable *aggregates = w->agg_table;
	EState	   *estate = w->estate;
	Relation	rel = rri->ri_RelationDesc;
	TupleDesc	desc = RelationGetDescr(rel);
	TupleTableSlot *old = w->agg_old;
	TupleTableSlot *row = w->agg_row;
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	Datum		customer = CStringGetTextDatum(d->customer_id);
	Datum		meter = CStringGetTextDatum(d->meter);
	int			i;

	estate->es_output_cid = GetCurrentCommandId(true);

#define A(col) (aggregates->attnums[col] - 1)
	for (;;)
	{
		Datum	   *v = row->tts_values;
		bool	   *n = row->tts_isnull;

		ExecClearTuple(row);
		if (find_aggregate(rel, w->pkey, customer, meter, d->period_start, old))
		{
			Numeric		old_total;
			TimestampTz t;

			/* every other column keeps its value */
			slot_getallattrs(old);
			memcpy(v, old->tts_values, sizeof(Datum) * desc->natts);
			memcpy(n, old->tts_isnull, sizeof(bool) * desc->natts);
			if (n[A(AGG_TOTAL)])
				elog(ERROR, "usage_billing.usage_aggregates has a NULL total");
			old_total = DatumGetNumeric(v[A(AGG_TOTAL)]);

			switch (d->aggregation)
			{
				case UB_AGG_MAX:
					*total = ub_num_max(old_total, d->contribution);
					break;
				case UB_AGG_LAST:
					/* the latest occurred_at wins; on a tie the later call does */
					*total = (!n[A(AGG_LAST)] &&
							  d->last_usage >= DatumGetTimestampTz(v[A(AGG_LAST)])) ?
						d->contribution : old_total;
					break;
				default:
					*total = ub_num_add(old_total, d->contribution);
					break;
			}
			/* both outlive the slots: copy */
			*total = DatumGetNumericCopy(NumericGetDatum(*total));
			*previous_total = DatumGetNumericCopy(NumericGetDatum(old_total));
			v[A(AGG_TOTAL)] = NumericGetDatum(*total);
			v[A(AGG_PREVIOUS)] = NumericGetDatum(*previous_total);
			n[A(AGG_PREVIOUS)] = false;
			v[A(AGG_COUNT)] = Int64GetDatum((n[A(AGG_COUNT)] ? 0 : DatumGetInt64(v[A(AGG_COUNT)])) + d->count);
			n[A(AGG_COUNT)] = false;
			/* least() and greatest() ignore NULLs */
			t = DatumGetTimestampTz(v[A(AGG_FIRST)]);
			if (n[A(AGG_FIRST)] || d->first_usage < t)
				v[A(AGG_FIRST)] = TimestampTzGetDatum(d->first_usage);
			n[A(AGG_FIRST)] = false;
			t = DatumGetTimestampTz(v[A(AGG_LAST)]);
			if (n[A(AGG_LAST)] || d->last_usage > t)
				v[A(AGG_LAST)] = TimestampTzGetDatum(d->last_usage);
			n[A(AGG_LAST)] = false;
			v[A(AGG_UPDATED)] = TimestampTzGetDatum(now);
			n[A(AGG_UPDATED)] = false;
			ExecStoreVirtualTuple(row);
			if (rel->rd_att->constr)
				ExecConstraints(rri, row, estate);
			if (update_aggregate(estate, rri, old, row))
				return;
			/* updated by a transaction that committed meanwhile: start over */
			continue;
		}

		/* no row yet: insert one, unless a concurrent caller does first */
		for (i = 0; i < desc->natts; i++)
		{
			if (aggregates->defaults[i] != NULL)
				v[i] = ub_direct_eval_default(estate, aggregates->defaults[i], TupleDescAttr(desc, i), &n[i]);
			else
			{
				v[i] = (Datum) 0;
				n[i] = true;
			}
		}
		v[A(AGG_CUSTOMER)] = customer;
		v[A(AGG_METER)] = meter;
		v[A(AGG_PERIOD_START)] = TimestampTzGetDatum(d->period_start);
		v[A(AGG_PERIOD_END)] = TimestampTzGetDatum(d->period_end);
		v[A(AGG_TOTAL)] = NumericGetDatum(d->contribution);
		v[A(AGG_COUNT)] = Int64GetDatum(d->count);
		v[A(AGG_FIRST)] = TimestampTzGetDatum(d->first_usage);
		v[A(AGG_LAST)] = TimestampTzGetDatum(d->last_usage);
		v[A(AGG_UPDATED)] = TimestampTzGetDatum(now);
		n[A(AGG_CUSTOMER)] = n[A(AGG_METER)] = n[A(AGG_PERIOD_START)] = false;
		n[A(AGG_PERIOD_END)] = n[A(AGG_TOTAL)] = n[A(AGG_COUNT)] = false;
		n[A(AGG_FIRST)] = n[A(AGG_LAST)] = n[A(AGG_UPDATED)] = false;
		v[A(AGG_PREVIOUS)] = (Datum) 0;
		n[A(AGG_PREVIOUS)] = true;
		ExecStoreVirtualTuple(row);
		if (rel->rd_att->constr)
			ExecConstraints(rri, row, estate);
		if (ub_direct_speculative_insert(estate, rri, row, list_make1_oid(aggregates->arbiter)))
		{
			*total = d->contribution;
			*previous_total = NULL;
			return;
		}
	}
#undef A
}
