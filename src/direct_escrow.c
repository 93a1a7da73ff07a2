/*-------------------------------------------------------------------------
 * direct_escrow.c
 *	  The direct writer's side of the escrow slots (the rules are in escrow.c).
 *
 * A backend's slot of a key is the usage_aggregate_slots row numbered with
 * its backend id: no other live backend writes it, so spending it waits
 * only for a writer that is folding the key.  What lives here:
 *
 *	 spend      the fast path: find our slot, check its budget and that it
 *				is still valid under the limit in force, add the delta to it.
 *	 scan       under the aggregate row's lock: what the slots hold in total
 *				and budget, and where our own slot is.
 *	 fold       under the aggregate row's lock: delete every slot (waiting
 *				for a caller spending one) and return what they held.
 *	 give       under the aggregate row's lock: a new budget for our slot.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "storage/backendid.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "direct_write_int.h"
#include "escrow.h"
#include "pricing.h"
#include "row_hint.h"

static void delta_keys(Relation index, const UbAggregateDelta *d, ScanKeyData *keys);
static Numeric row_total(UbDirectWriter *w, const UbAggregateDelta *d, Snapshot snapshot);

#define S(col) (w->slot_table->attnums[col] - 1)

/* Scan keys for the delta's aggregate key on index (the slots' or the aggregates' primary key). */
static void
delta_keys(Relation index, const UbAggregateDelta *d, ScanKeyData *keys)
{
	ub_key_scankeys(index, CStringGetTextDatum(d->customer_id),
					CStringGetTextDatum(d->meter), d->period_start, keys);
}

/*
 * The fast path: adds the delta to our slot if its budget covers it and the
 * limits it was granted under still allow it.  On success *total is the
 * key's total as this call leaves it: the committed aggregate and slots and
 * our own.  False: nothing was written, take the aggregate row.
 */
bool
ub_escrow_try_spend(UbDirectWriter *w, const UbAggregateDelta *d, uint64 key, Numeric *total)
{
	ResultRelInfo *rri = w->rri[2];
	Relation	rel = rri->ri_RelationDesc;
	TupleTableSlot *old = w->slot_old;
	TupleTableSlot *row = w->slot_row;
	Snapshot	snapshot = GetLatestSnapshot();
	ScanKeyData keys[3];
	IndexScanDesc scan;
	bool		found = false;
	ItemPointerData own_tid;
	Numeric		others = ub_num_zero();
	Datum	   *v = row->tts_values;
	bool	   *n = row->tts_isnull;
	Numeric		budget;
	Numeric		slot_total;

	/*
	 * One pass over the key's slots: ours, and what the others hold as
	 * committed, for the total we report.  Nobody else updates our slot, so
	 * the version this snapshot sees is the latest, unless a writer is
	 * folding the key: then the update below waits for it and fails.
	 */
	delta_keys(w->slot_pkey, d, keys);
	scan = index_beginscan(rel, w->slot_pkey, snapshot, 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	while (index_getnext_slot(scan, ForwardScanDirection, old))
	{
		bool		isnull;

		if (DatumGetInt32(slot_getattr(old, w->slot_table->attnums[SLOT_SLOT], &isnull)) == MyBackendId)
		{
			ExecCopySlot(row, old);
			ItemPointerCopy(&old->tts_tid, &own_tid);
			found = true;
			continue;
		}
		others = ub_num_add(others,
							DatumGetNumeric(slot_getattr(old, w->slot_table->attnums[SLOT_TOTAL],
														 &isnull)));
	}
	index_endscan(scan);
	if (!found)
	{
		ub_escrow_remember(key, false);
		return false;
	}

	slot_getallattrs(row);
	if (!ub_escrow_slot_valid(d->limit, DatumGetNumeric(v[S(SLOT_FLOOR)]),
							  n[S(SLOT_LIMIT)] ? NULL : DatumGetNumeric(v[S(SLOT_LIMIT)])))
		return false;
	budget = n[S(SLOT_BUDGET)] ? NULL : DatumGetNumeric(v[S(SLOT_BUDGET)]);
	/* spending moves budget into the slot's total: upper, and the invariant, stay as they are */
	if (budget != NULL && ub_num_cmp(d->contribution, budget) > 0)
		return false;

	slot_total = ub_num_add(DatumGetNumeric(v[S(SLOT_TOTAL)]), d->contribution);
	v[S(SLOT_TOTAL)] = NumericGetDatum(slot_total);
	v[S(SLOT_COUNT)] = Int64GetDatum(DatumGetInt64(v[S(SLOT_COUNT)]) + d->count);
	if (budget != NULL)
		v[S(SLOT_BUDGET)] = NumericGetDatum(ub_num_sub(budget, d->contribution));
	ub_direct_widen_usage(v, n, S(SLOT_FIRST), S(SLOT_LAST), d->first_usage, d->last_usage);
	v[S(SLOT_UPDATED)] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	n[S(SLOT_UPDATED)] = false;
	ExecStoreVirtualTuple(row);
	if (rel->rd_att->constr)
		ExecConstraints(rri, row, w->estate);
	old->tts_tid = own_tid;
	if (!ub_direct_update_row(w->estate, rri, old, row))
		return false;

	*total = ub_num_add(ub_num_add(row_total(w, d, snapshot), others), slot_total);
	*total = DatumGetNumericCopy(NumericGetDatum(*total));
	return true;
}

/* The total of the key's aggregate row under snapshot (0 when there is none). */
static Numeric
row_total(UbDirectWriter *w, const UbAggregateDelta *d, Snapshot snapshot)
{
	ScanKeyData keys[3];
	Numeric		total = ub_num_zero();

	delta_keys(w->pkey, d, keys);
	if (ub_row_fetch(w->rri[1]->ri_RelationDesc, w->pkey, keys, 3, snapshot, w->agg_old,
					 &w->agg_nblocks))
	{
		bool		isnull;
		Datum		t = slot_getattr(w->agg_old, w->agg_table->attnums[AGG_TOTAL], &isnull);

		if (!isnull)
			total = DatumGetNumeric(t);
	}
	return total;
}

/* What the key's slots hold under a new snapshot, leaving out skip_slot (-1: none). */
Numeric
ub_escrow_slots_total(UbDirectWriter *w, const UbAggregateDelta *d, int skip_slot)
{
	Numeric		total;
	int64		count;

	ub_escrow_slot_sum(w->rri[2]->ri_RelationDesc, w->slot_pkey, w->slot_table->attnums,
					   CStringGetTextDatum(d->customer_id), CStringGetTextDatum(d->meter),
					   d->period_start, GetLatestSnapshot(), skip_slot, &total, &count);
	return total;
}

/*
 * Under the aggregate row's lock: what the key's slots hold, totals and
 * budgets together (*escrowed; NULL when one has no limit), and our own
 * slot's tid if we have one.  Spending moves budget into total, so the sum
 * does not depend on which version of a slot we see.
 */
void
ub_escrow_scan(UbDirectWriter *w, const UbAggregateDelta *d, Numeric *escrowed,
			   bool *own_found, ItemPointer own_tid)
{
	Relation	rel = w->rri[2]->ri_RelationDesc;
	TupleTableSlot *old = w->slot_old;
	SnapshotData dirty;
	ScanKeyData keys[3];
	IndexScanDesc scan;

	*escrowed = ub_num_zero();
	*own_found = false;
	InitDirtySnapshot(dirty);
	delta_keys(w->slot_pkey, d, keys);
	scan = index_beginscan(rel, w->slot_pkey, &dirty, 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	while (index_getnext_slot(scan, ForwardScanDirection, old))
	{
		bool		isnull;
		Datum		budget;

		if (DatumGetInt32(slot_getattr(old, w->slot_table->attnums[SLOT_SLOT], &isnull)) == MyBackendId)
		{
			*own_found = true;
			ItemPointerCopy(&old->tts_tid, own_tid);
		}
		budget = slot_getattr(old, w->slot_table->attnums[SLOT_BUDGET], &isnull);
		if (isnull)
			*escrowed = NULL;
		if (*escrowed == NULL)
			continue;
		*escrowed = ub_num_add(*escrowed, DatumGetNumeric(budget));
		*escrowed = ub_num_add(*escrowed,
							   DatumGetNumeric(slot_getattr(old, w->slot_table->attnums[SLOT_TOTAL],
															&isnull)));
	}
	index_endscan(scan);
}

/*
 * Under the aggregate row's lock: deletes every slot of the key and returns
 * what they held.  Deleting a slot waits for a caller spending it; if that
 * caller committed, we read the slot again.
 */
void
ub_escrow_fold(UbDirectWriter *w, const UbAggregateDelta *d, Numeric *total,
			   int64 *event_count, TimestampTz *first_usage, TimestampTz *last_usage,
			   bool *have_usage)
{
	Relation	rel = w->rri[2]->ri_RelationDesc;
	TupleTableSlot *old = w->slot_old;
	ScanKeyData keys[3];
	bool		again = true;

	*total = ub_num_zero();
	*event_count = 0;
	*have_usage = false;
	delta_keys(w->slot_pkey, d, keys);
	while (again)
	{
		SnapshotData dirty;
		IndexScanDesc scan;

		again = false;
		InitDirtySnapshot(dirty);
		scan = index_beginscan(rel, w->slot_pkey, &dirty, 3, 0);
		index_rescan(scan, keys, 3, NULL, 0);
		while (index_getnext_slot(scan, ForwardScanDirection, old))
		{
			TM_FailureData tmfd;
			TM_Result	res;
			bool		isnull;
			Datum		t;

			res = table_tuple_delete(rel, &old->tts_tid, w->estate->es_output_cid,
									 w->estate->es_snapshot, InvalidSnapshot, true,
									 &tmfd, false);
			if (res == TM_Updated || res == TM_Deleted)
			{
				/* spent meanwhile: read it again (slots we deleted are gone for us) */
				again = true;
				break;
			}
			if (res != TM_Ok)
				elog(ERROR, "unexpected result %d deleting an escrow slot", (int) res);
			*total = ub_num_add(*total,
								DatumGetNumeric(slot_getattr(old, w->slot_table->attnums[SLOT_TOTAL],
															 &isnull)));
			*event_count += DatumGetInt64(slot_getattr(old, w->slot_table->attnums[SLOT_COUNT],
													   &isnull));
			t = slot_getattr(old, w->slot_table->attnums[SLOT_FIRST], &isnull);
			if (!isnull && (!*have_usage || DatumGetTimestampTz(t) < *first_usage))
				*first_usage = DatumGetTimestampTz(t);
			t = slot_getattr(old, w->slot_table->attnums[SLOT_LAST], &isnull);
			if (!isnull)
			{
				if (!*have_usage || DatumGetTimestampTz(t) > *last_usage)
					*last_usage = DatumGetTimestampTz(t);
				*have_usage = true;
			}
		}
		index_endscan(scan);
	}
}

/*
 * Under the aggregate row's lock: adds budget (NULL: no limit) to our slot,
 * granted at floor_total below budget_limit, creating the slot if needed.
 */
void
ub_escrow_give(UbDirectWriter *w, const UbAggregateDelta *d, bool own_found,
			   ItemPointer own_tid, Numeric floor_total, Numeric budget, Numeric budget_limit)
{
	ResultRelInfo *rri = w->rri[2];
	Relation	rel = rri->ri_RelationDesc;
	TupleDesc	desc = RelationGetDescr(rel);
	TupleTableSlot *old = w->slot_old;
	TupleTableSlot *row = w->slot_row;
	Datum	   *v = row->tts_values;
	bool	   *n = row->tts_isnull;
	int			i;

	ExecClearTuple(row);
	if (own_found)
	{
		if (!table_tuple_fetch_row_version(rel, own_tid, SnapshotAny, old))
			elog(ERROR, "escrow slot disappeared");
		slot_getallattrs(old);
		memcpy(v, old->tts_values, sizeof(Datum) * desc->natts);
		memcpy(n, old->tts_isnull, sizeof(bool) * desc->natts);
		if (budget != NULL && !n[S(SLOT_BUDGET)])
			budget = ub_num_add(budget, DatumGetNumeric(v[S(SLOT_BUDGET)]));
	}
	else
	{
		for (i = 0; i < desc->natts; i++)
		{
			if (w->slot_table->defaults[i] != NULL)
				v[i] = ub_direct_eval_default(w->estate, w->slot_table->defaults[i],
											  TupleDescAttr(desc, i), &n[i]);
			else
			{
				v[i] = (Datum) 0;
				n[i] = true;
			}
		}
		v[S(SLOT_CUSTOMER)] = CStringGetTextDatum(d->customer_id);
		v[S(SLOT_METER)] = CStringGetTextDatum(d->meter);
		v[S(SLOT_PERIOD_START)] = TimestampTzGetDatum(d->period_start);
		v[S(SLOT_SLOT)] = Int32GetDatum(MyBackendId);
		v[S(SLOT_TOTAL)] = NumericGetDatum(ub_num_zero());
		v[S(SLOT_COUNT)] = Int64GetDatum(0);
		n[S(SLOT_CUSTOMER)] = n[S(SLOT_METER)] = n[S(SLOT_PERIOD_START)] = false;
		n[S(SLOT_SLOT)] = n[S(SLOT_TOTAL)] = n[S(SLOT_COUNT)] = false;
		n[S(SLOT_FIRST)] = n[S(SLOT_LAST)] = true;
	}
	v[S(SLOT_BUDGET)] = budget ? NumericGetDatum(budget) : (Datum) 0;
	n[S(SLOT_BUDGET)] = (budget == NULL);
	v[S(SLOT_FLOOR)] = NumericGetDatum(floor_total);
	n[S(SLOT_FLOOR)] = false;
	v[S(SLOT_LIMIT)] = budget_limit ? NumericGetDatum(budget_limit) : (Datum) 0;
	n[S(SLOT_LIMIT)] = (budget_limit == NULL);
	v[S(SLOT_UPDATED)] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	n[S(SLOT_UPDATED)] = false;
	ExecStoreVirtualTuple(row);
	if (rel->rd_att->constr)
		ExecConstraints(rri, row, w->estate);
	if (own_found)
	{
		if (!ub_direct_update_row(w->estate, rri, old, row))
			elog(ERROR, "escrow slot changed under the aggregate row's lock");
		return;
	}
	table_tuple_insert(rel, row, w->estate->es_output_cid, 0, NULL);
	list_free(ExecInsertIndexTuples(rri, row, w->estate, false, false, NULL, NIL));
}
