/*-------------------------------------------------------------------------
 * period_usage.c
 *	  The usage of a customer's billing period, meter by meter, as the
 *	  pricing paths and the summaries read it.
 *
 * Vocabulary
 *	 aggregate row	one (customer, meter, period) of aggregate_totals: the
 *					total (row plus its escrow slots), the event count and
 *					the first and last usage
 *
 * Reads aggregate_totals with SQL (ub_totals_plan), so the escrow slots of a
 * hot key are counted whatever their state.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "escrow.h"
#include "num.h"
#include "period_usage.h"

static SPIPlanPtr aggregates_plans[2];	/* per schema: ub_totals_plan */

/* Builds an aggregate row from (meter, total, event_count, first_usage, last_usage). */
UbAggregateRow *
ub_aggregate_row(HeapTuple tup, TupleDesc desc)
{
	UbAggregateRow *row = palloc0(sizeof(UbAggregateRow));
	bool		isnull;
	Datum		d;

	row->meter = TextDatumGetCString(SPI_getbinval(tup, desc, 1, &isnull));
	d = SPI_getbinval(tup, desc, 2, &isnull);
	row->total = isnull ? ub_num_zero() : DatumGetNumericCopy(d);
	d = SPI_getbinval(tup, desc, 3, &isnull);
	row->event_count = isnull ? 0 : DatumGetInt64(d);
	d = SPI_getbinval(tup, desc, 4, &isnull);
	row->has_first = !isnull;
	row->first_usage = isnull ? 0 : DatumGetTimestampTz(d);
	d = SPI_getbinval(tup, desc, 5, &isnull);
	row->has_last = !isnull;
	row->last_usage = isnull ? 0 : DatumGetTimestampTz(d);
	return row;
}

/* Every aggregate row of a customer's billing period, for the pricing paths. */
List *
ub_period_aggregates(const char *customer_id, TimestampTz period_start)
{
	Datum		args[2];
	int			ret;
	List	   *rows = NIL;
	Oid			types[2] = {TEXTOID, TIMESTAMPTZOID};

	args[0] = CStringGetTextDatum(customer_id);
	args[1] = TimestampTzGetDatum(period_start);
	ret = SPI_execute_plan(ub_totals_plan(aggregates_plans,
										  "SELECT a.meter, a.total, a.event_count, a.first_usage, a.last_usage"
										  "  FROM %1$s a"
										  " WHERE a.customer_id = $1 AND a.period_start = $2",
										  2, types),
						   args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "aggregate lookup failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
		rows = lappend(rows, ub_aggregate_row(SPI_tuptable->vals[i], SPI_tuptable->tupdesc));
	SPI_freetuptable(SPI_tuptable);
	return rows;
}

/* The row of one meter in a list of aggregate rows, NULL when it has none. */
UbAggregateRow *
ub_find_aggregate(List *rows, const char *meter)
{
	ListCell   *lc;

	foreach(lc, rows)
	{
		UbAggregateRow *row = lfirst(lc);

		if (strcmp(row->meter, meter) == 0)
			return row;
	}
	return NULL;
}
