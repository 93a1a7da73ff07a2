/*-------------------------------------------------------------------------
 * direct_write_int.h
 *	  What direct_write.c (the writer, the ledger) shares with direct_fold.c
 *	  (the aggregates): the writer, the resolved tables and the insert
 *	  protocol.  Not for use outside those two files.
 *-------------------------------------------------------------------------
 */
#ifndef UB_DIRECT_WRITE_INT_H
#define UB_DIRECT_WRITE_INT_H

#include "access/tupdesc.h"
#include "executor/tuptable.h"
#include "nodes/execnodes.h"
#include "nodes/pg_list.h"
#include "storage/block.h"

#include "direct_write.h"
#include "escrow.h"

/*
 * Columns of the aggregates we write; the rest keep their values.  Their
 * names are agg_columns in direct_write.c, in this order.
 */
enum
{
	AGG_CUSTOMER, AGG_METER, AGG_PERIOD_START, AGG_PERIOD_END, AGG_TOTAL, AGG_PREVIOUS,
	AGG_COUNT, AGG_FIRST, AGG_LAST, AGG_UPDATED, AGG_SLOTTED, AGG_NCOLS
};


/* A table we write, resolved once per backend and forgotten on any relcache invalidation. */
typedef struct TargetTable
{
	Oid			relid;
	Oid			arbiter;		/* ledger: idempotency index; aggregate: primary key */
	int			natts;
	AttrNumber *attnums;		/* of the columns above */
	ExprState **defaults;		/* per attribute; NULL: none.  Kept across calls:
								 * evaluation state lives in the ExprContext */
	bool	   *volatile_default;	/* evaluated per row; the others once per writer */
} TargetTable;

/* An open pair of tables and the slots we write with. */
struct UbDirectWriter
{
	EState	   *estate;
	ResultRelInfo *rri[3];		/* ledger, aggregates, escrow slots */
	const TargetTable *agg_table;	/* the aggregates as resolved at open */
	const TargetTable *slot_table;	/* the escrow slots as resolved at open */
	Relation	pkey;			/* the aggregates' primary key, among rri[1]'s indexes */
	BlockNumber agg_nblocks;	/* the aggregates' size, for row_hint.c (locked: kept) */
	Relation	slot_pkey;		/* the slots' primary key, among rri[2]'s indexes */
	TupleTableSlot *ledger_row;
	TupleTableSlot **ledger_rows;	/* for multi-row inserts, grown on demand */
	int			nledger_rows;
	Datum	   *ledger_defaults;	/* the ledger's stable defaults, evaluated at open */
	bool	   *ledger_default_nulls;
	TupleTableSlot *agg_old;
	TupleTableSlot *agg_row;
	TupleTableSlot *slot_old;
	TupleTableSlot *slot_row;
};

extern Datum ub_direct_eval_default(EState *estate, ExprState *state, Form_pg_attribute att,
									bool *isnull);
extern bool ub_direct_speculative_insert(EState *estate, ResultRelInfo *rri,
										 TupleTableSlot *slot, List *arbiters);
extern bool ub_direct_update_row(EState *estate, ResultRelInfo *rri, TupleTableSlot *old,
								 TupleTableSlot *row);
extern void ub_direct_widen_usage(Datum *v, bool *n, int first, int last, TimestampTz f,
								  TimestampTz l);

/* direct_escrow.c */
extern bool ub_escrow_try_spend(UbDirectWriter *w, const UbAggregateDelta *d, uint64 key,
								Numeric *total);
extern void ub_escrow_scan(UbDirectWriter *w, const UbAggregateDelta *d, Numeric *escrowed,
						   bool *own_found, ItemPointer own_tid);
extern void ub_escrow_fold(UbDirectWriter *w, const UbAggregateDelta *d, Numeric *total,
						   int64 *event_count, TimestampTz *first_usage, TimestampTz *last_usage,
						   bool *have_usage);
extern void ub_escrow_give(UbDirectWriter *w, const UbAggregateDelta *d, bool own_found,
						   ItemPointer own_tid, Numeric floor_total, Numeric budget,
						   Numeric budget_limit);
extern Numeric ub_escrow_slots_total(UbDirectWriter *w, const UbAggregateDelta *d, int skip_slot);

#endif							/* UB_DIRECT_WRITE_INT_H */
