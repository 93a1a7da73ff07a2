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
 *
 * A contended sum or count key also has escrow slots (escrow.c explains the
 * rules): a call that fits its backend's slot takes it and leaves the row
 * alone; a call on the row of a key with slots locks the row first, folds
 * the slots when a limit decision may be near, and may grant its slot a
 * budget after its update.
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
#include "escrow.h"
#include "pricing.h"
#include "row_hint.h"

static bool find_aggregate(UbDirectWriter *w, Datum customer, Datum meter,
						   TimestampTz period_start, TupleTableSlot *out, bool *contended);
static bool lock_aggregate(UbDirectWriter *w, TupleTableSlot *old);
static bool row_slotted(UbDirectWriter *w, TupleTableSlot *row);

/*
 * Looks the aggregate up through its primary key (row_hint.c: where it was
 * last found first) with a dirty snapshot, which also sees rows of
 * transactions in progress.  A row being inserted by one is
 * waited for: its commit or abort decides whether there is a row.  A row
 * being updated by one is returned as is (*contended); ub_direct_update_row
 * waits for that transaction.
 */
static bool
find_aggregate(UbDirectWriter *w, Datum customer, Datum meter, TimestampTz period_start,
			   TupleTableSlot *out, bool *contended)
{
	Relation	rel = w->rri[1]->ri_RelationDesc;
	SnapshotData dirty;
	ScanKeyData keys[3];
	bool		found;

	InitDirtySnapshot(dirty);
	ub_key_scankeys(w->pkey, customer, meter, period_start, keys);
	for (;;)
	{
		found = ub_row_fetch(rel, w->pkey, keys, 3, &dirty, out, &w->agg_nblocks);
		if (found && TransactionIdIsValid(dirty.xmin))
		{
			XactLockTableWait(dirty.xmin, rel, &out->tts_tid, XLTW_None);
			continue;
		}
		break;
	}
	*contended = found && TransactionIdIsValid(dirty.xmax);
	if (found)
		ExecMaterializeSlot(out);
	return found;
}

/* Does this version of the aggregate row say the key has escrow slots (never before 1.3)? */
static bool
row_slotted(UbDirectWriter *w, TupleTableSlot *row)
{
	bool		isnull;
	Datum		d;

	if (w->rri[2] == NULL)
		return false;
	d = slot_getattr(row, w->agg_table->attnums[AGG_SLOTTED], &isnull);
	return !isnull && DatumGetBool(d);
}

/*
 * Locks the latest version of the aggregate row into old, before its escrow
 * slots are read or folded: they may only change under this lock.  False
 * when the row was deleted; the caller looks it up again.
 */
static bool
lock_aggregate(UbDirectWriter *w, TupleTableSlot *old)
{
	TM_FailureData tmfd;

	return table_tuple_lock(w->rri[1]->ri_RelationDesc, &old->tts_tid, w->estate->es_snapshot,
							old, w->estate->es_output_cid, LockTupleNoKeyExclusive,
							LockWaitBlock, TUPLE_LOCK_FLAG_FIND_LAST_VERSION, &tmfd) == TM_Ok;
}

/*
 * Replaces the version of an aggregate (or escrow slot) we read by row.
 * heap_update waits for a transaction that is updating or locking it;
 * returns false when the version is no longer the latest (someone committed
 * an update first), and the caller reads again.  No separate row lock: the
 * update is the lock, and it is held to commit, which is what serializes
 * callers and keeps the hard-cap check exact.
 */
bool
ub_direct_update_row(EState *estate, ResultRelInfo *rri, TupleTableSlot *old, TupleTableSlot *row)
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
			elog(ERROR, "row already modified by this command");
			break;
		default:
			elog(ERROR, "unexpected result %d updating a row", (int) res);
			break;
	}
	return false;
}

/*
 * Widens the first and last usage of a row (attribute indexes first and
 * last) to take [f, l]; like least() and greatest(), a NULL gives way.
 */
void
ub_direct_widen_usage(Datum *v, bool *n, int first, int last, TimestampTz f, TimestampTz l)
{
	if (n[first] || f < DatumGetTimestampTz(v[first]))
		v[first] = TimestampTzGetDatum(f);
	if (n[last] || l > DatumGetTimestampTz(v[last]))
		v[last] = TimestampTzGetDatum(l);
	n[first] = n[last] = false;
}

/*
 * Folds a delta into its aggregate, INSERT ... ON CONFLICT DO UPDATE as in
 * record.c's SQL: returns the new total and the one before (NULL for a new
 * row), in the caller's memory context.  A sum or count key may also take
 * the delta into this backend's escrow slot (escrow.c): then, and whenever
 * the key has slots that no decision needs folded, the previous total
 * returned equals the new one, as no point was crossed.
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
	bool		escrow = ub_hot_key_slots != UB_SLOTS_OFF && w->rri[2] != NULL &&
		(d->aggregation == UB_AGG_SUM || d->aggregation == UB_AGG_COUNT);
	uint64		key = escrow ? ub_escrow_key_hash(d->customer_id, d->meter, d->period_start) : 0;
	int			i;

	estate->es_output_cid = GetCurrentCommandId(true);
	if (escrow && ub_escrow_has_slot(key) && ub_escrow_try_spend(w, d, key, total))
	{
		*previous_total = *total;
		return;
	}

#define A(col) (aggregates->attnums[col] - 1)
	for (;;)
	{
		Datum	   *v = row->tts_values;
		bool	   *n = row->tts_isnull;
		bool		contended;

		ExecClearTuple(row);
		if (find_aggregate(w, customer, meter, d->period_start, old, &contended))
		{
			Numeric		old_total;
			bool		slotted;
			bool		want_slot = false;
			bool		kept_slots = false;
			bool		granted = false;
			bool		own_found = false;
			ItemPointerData own_tid;
			Numeric		escrowed = NULL;
			Numeric		budget = NULL;
			Numeric		budget_limit = NULL;

			slotted = row_slotted(w, old);
			if (escrow)
			{
				if (contended)
					ub_escrow_note_contention(key);
				want_slot = ub_hot_key_slots == UB_SLOTS_ALWAYS ||
					ub_escrow_has_slot(key) || ub_escrow_is_hot(key);
			}
			/*
			 * Slots change only under the row's lock: take it before reading
			 * them.  A key without slots needs no lock first, even to grant
			 * one: a grant by someone else updates the row, and then our
			 * update below fails and we read again.
			 */
			if (slotted)
			{
				if (!lock_aggregate(w, old))
					continue;
				slotted = row_slotted(w, old);
			}

			/* every other column keeps its value */
			slot_getallattrs(old);
			memcpy(v, old->tts_values, sizeof(Datum) * desc->natts);
			memcpy(n, old->tts_isnull, sizeof(bool) * desc->natts);
			if (n[A(AGG_TOTAL)])
				elog(ERROR, "usage_billing.usage_aggregates has a NULL total");
			old_total = DatumGetNumeric(v[A(AGG_TOTAL)]);
			if (n[A(AGG_COUNT)])
			{
				v[A(AGG_COUNT)] = Int64GetDatum(0);
				n[A(AGG_COUNT)] = false;
			}

			if (slotted)
			{
				ub_escrow_scan(w, d, &escrowed, &own_found, &own_tid);
				kept_slots = escrow &&
					!ub_escrow_near(d->limit, old_total,
									escrowed == NULL ? NULL :
									ub_num_add(ub_num_add(old_total, escrowed), d->contribution));
				if (!kept_slots)
				{
					Numeric		folded;
					int64		folded_count;
					TimestampTz first;
					TimestampTz last;
					bool		have_usage;

					/* a decision may be near: fold, and decide on the exact total */
					ub_escrow_fold(w, d, &folded, &folded_count, &first, &last, &have_usage);
					old_total = ub_num_add(old_total, folded);
					v[A(AGG_COUNT)] = Int64GetDatum(DatumGetInt64(v[A(AGG_COUNT)]) + folded_count);
					if (have_usage)
					{
						ub_direct_widen_usage(v, n, A(AGG_FIRST), A(AGG_LAST), first, last);
					}
					escrowed = ub_num_zero();
					own_found = false;
					ub_escrow_remember(key, false);
				}
			}
			else
				escrowed = ub_num_zero();

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

			/* a budget for our slot, if what is left below the next point allows one */
			if (want_slot)
				granted = ub_escrow_grant(d->limit, *total,
										  escrowed == NULL ? NULL : ub_num_add(*total, escrowed),
										  &budget, &budget_limit);

			v[A(AGG_TOTAL)] = NumericGetDatum(*total);
			v[A(AGG_PREVIOUS)] = NumericGetDatum(*previous_total);
			n[A(AGG_PREVIOUS)] = false;
			v[A(AGG_COUNT)] = Int64GetDatum(DatumGetInt64(v[A(AGG_COUNT)]) + d->count);
			ub_direct_widen_usage(v, n, A(AGG_FIRST), A(AGG_LAST), d->first_usage, d->last_usage);
			v[A(AGG_UPDATED)] = TimestampTzGetDatum(now);
			n[A(AGG_UPDATED)] = false;
			if (w->rri[2] != NULL)
			{
				v[A(AGG_SLOTTED)] = BoolGetDatum(kept_slots || granted);
				n[A(AGG_SLOTTED)] = false;
			}
			ExecStoreVirtualTuple(row);
			if (rel->rd_att->constr)
				ExecConstraints(rri, row, estate);
			if (!ub_direct_update_row(estate, rri, old, row))
			{
				/* updated by a transaction that committed meanwhile: start over */
				continue;
			}
			if (granted)
			{
				ub_escrow_give(w, d, own_found, &own_tid, *total, budget, budget_limit);
				ub_escrow_remember(key, true);
			}
			if (kept_slots)
			{
				/* no point within reach: report the key's total, decide nothing */
				*total = ub_num_add(*total, ub_escrow_slots_total(w, d, -1));
				*total = DatumGetNumericCopy(NumericGetDatum(*total));
				*previous_total = *total;
			}
			return;
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
