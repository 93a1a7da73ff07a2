/*-------------------------------------------------------------------------
 * plan_history.c
 *	  A customer's plan history: the plan in force at an instant, and the
 *	  segments a billing period is cut into by plan changes.
 *
 * usage_billing.customer_plans holds one row per change: the plan is in
 * force from effective_from until the next row's (the first row starts at
 * -infinity).  change_plan (SQL) writes it; everything here only reads.
 * A schema before 1.4 has no history, and a customer written without one
 * (by hand) has none: then customers.plan is in force from the beginning.
 *
 * The hot path keeps the history in its cached customer row
 * (catalog_cache.c) and asks ub_row_plan_at for the plan at the call's time,
 * so a change scheduled for a period's end takes effect at the boundary
 * without anything being written then.
 *
 * A "segment" is a part [start, end) of a billing period with one plan in
 * force; a period without a change is one segment.  Pricing by segments is
 * in period_pricing.c.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "catalog_cache.h"
#include "relations.h"

/* Whether the schema has a plan history (1.4 and later). */
bool
ub_have_plan_history(void)
{
	return OidIsValid(ub_schema_relation("customer_plans"));
}

/* Appends a history row to a customer row, in CurrentMemoryContext; rows come in order. */
void
ub_row_add_plan(UbCustomerRow *row, TimestampTz effective_from, const char *plan)
{
	if (row->nplans == 0)
	{
		row->plan_from = palloc(sizeof(TimestampTz));
		row->plan_names = palloc(sizeof(char *));
	}
	else
	{
		row->plan_from = repalloc(row->plan_from, (row->nplans + 1) * sizeof(TimestampTz));
		row->plan_names = repalloc(row->plan_names, (row->nplans + 1) * sizeof(char *));
	}
	row->plan_from[row->nplans] = effective_from;
	row->plan_names[row->nplans] = pstrdup(plan);
	row->nplans++;
}

/* The plan of a customer row in force at "at": the last history row from at or before it. */
const char *
ub_row_plan_at(const UbCustomerRow *row, TimestampTz at)
{
	const char *plan = row->plan;

	for (int i = 0; i < row->nplans; i++)
	{
		if (row->plan_from[i] > at)
			break;
		plan = row->plan_names[i];
	}
	return plan;
}

/* Reads a customer's history into its row with SQL (for distributed tables), in order. */
void
ub_read_plan_history(const char *customer_id, Snapshot snap, UbCustomerRow *row)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		args[1];

	row->nplans = 0;
	row->plan_from = NULL;
	row->plan_names = NULL;
	if (!ub_have_plan_history())
		return;
	ub_prepare_routable(&plan,
						"SELECT effective_from, plan FROM usage_billing.customer_plans"
						" WHERE customer_id = $1 ORDER BY effective_from", 1, types);
	args[0] = CStringGetTextDatum(customer_id);
	if (SPI_execute_snapshot(plan, args, NULL, snap, InvalidSnapshot, true, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "plan history lookup failed");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		TimestampTz from = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[i],
															 SPI_tuptable->tupdesc, 1, &isnull));

		ub_row_add_plan(row, from, ub_col_text(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2));
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * The segments of [start, end) by plan, in time order, as a List of
 * UbSegment: one per history row in force during the range, cut to it.
 * Without history, one segment of fallback_plan.  Must run between
 * SPI_connect and SPI_finish.
 */
List *
ub_plan_segments(const char *customer_id, const char *fallback_plan, TimestampTz start,
				 TimestampTz end)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		args[3];
	List	   *segments = NIL;

	if (ub_have_plan_history())
	{
		ub_prepare_once(&plan,
						"SELECT h.effective_from, h.effective_to, h.plan"
						"  FROM (SELECT effective_from, plan,"
						"               lead(effective_from) OVER (ORDER BY effective_from) AS effective_to"
						"          FROM usage_billing.customer_plans WHERE customer_id = $1) h"
						" WHERE h.effective_from < $3 AND (h.effective_to IS NULL OR h.effective_to > $2)"
						" ORDER BY h.effective_from", 3, types);
		args[0] = CStringGetTextDatum(customer_id);
		args[1] = TimestampTzGetDatum(start);
		args[2] = TimestampTzGetDatum(end);
		if (SPI_execute_plan(plan, args, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "plan history lookup failed");
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			UbSegment  *seg = palloc0(sizeof(UbSegment));
			bool		isnull;
			TimestampTz from = DatumGetTimestampTz(SPI_getbinval(tup, desc, 1, &isnull));
			Datum		to = SPI_getbinval(tup, desc, 2, &isnull);

			/* the first row is from -infinity; one written by hand may not be */
			seg->start = (i == 0) ? start : Max(from, start);
			seg->end = isnull ? end : Min(DatumGetTimestampTz(to), end);
			seg->plan = ub_col_text(tup, desc, 3);
			segments = lappend(segments, seg);
		}
		SPI_freetuptable(SPI_tuptable);
	}
	if (segments == NIL)
	{
		UbSegment  *seg = palloc0(sizeof(UbSegment));

		seg->start = start;
		seg->end = end;
		seg->plan = pstrdup(fallback_plan);
		segments = lappend(segments, seg);
	}
	return segments;
}
