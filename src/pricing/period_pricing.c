/*-------------------------------------------------------------------------
 * period_pricing.c
 *	  A billing period priced by the segments its plan changes cut it into.
 *
 * A period [start, end) with no plan change is one segment: its usage is
 * the aggregates' (usage_aggregates with the escrow slots), as before plan
 * history existed.  A period with changes (plan_history.c) has a segment
 * per plan in force during it, and each segment is priced on its own:
 *
 *	 base	the plan's base_price prorated by time:
 *			base_price * (segment length) / (period length), exact numeric
 *			(microseconds, so per second and finer)
 *	 usage	the events attributed to the segment, aggregated with the
 *			meter's aggregation and priced under the segment's plan (its
 *			limits with the customer's overrides, its included quantity
 *			and tiers whole: a segment is priced like a period of its own)
 *
 * An event is attributed by occurred_at; an event the late-event policy
 * moved into this period from an older one (occurred_at before the period)
 * to the segment in force when it was recorded.  Usage read from the ledger
 * (live 'usage' rows and 'adjustment' rows of the period, as the range
 * mode of get_usage_summary reads them) is checked against the aggregates:
 * for sum and count meters a difference (ledger rows dropped by
 * drop_ledger_before) goes to the last segment, so usage is never priced
 * at zero because the plan changed, and never twice.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "period_pricing.h"
#include "num.h"
#include "period_usage.h"
#include "results.h"

static List *segment_ledger_totals(const char *customer_id, TimestampTz start, TimestampTz end,
								   List *segments);

/* The usage total of a meter in a segment, 0 when it has none. */
Numeric
ub_segment_total(const UbPricedSegment *seg, const char *meter)
{
	UbAggregateRow *row = ub_find_aggregate(seg->totals, meter);

	return row != NULL ? row->total : ub_num_zero();
}

/* The customer's limit of a meter in a segment, NULL when the segment's plan has none. */
UbLimit *
ub_segment_limit(const UbPricedSegment *seg, const char *meter)
{
	ListCell   *lc;

	foreach(lc, seg->limits)
	{
		UbLimit    *l = lfirst(lc);

		if (strcmp(l->meter, meter) == 0)
			return l;
	}
	return NULL;
}

/* The segment containing "at", or the first or last when "at" is outside the period. */
UbPricedSegment *
ub_segment_at(List *segments, TimestampTz at)
{
	ListCell   *lc;

	foreach(lc, segments)
	{
		UbPricedSegment *seg = lfirst(lc);

		if (at < seg->end)
			return seg;
	}
	return llast(segments);
}

/* An aggregate row of a meter in a list, created (total 0) when missing. */
static UbAggregateRow *
find_or_add(List **rows, const char *meter)
{
	UbAggregateRow *row = ub_find_aggregate(*rows, meter);

	if (row == NULL)
	{
		row = palloc0(sizeof(UbAggregateRow));
		row->meter = pstrdup(meter);
		row->total = ub_num_zero();
		*rows = lappend(*rows, row);
	}
	return row;
}

/*
 * The usage of each segment from the ledger; returns the per-segment lists
 * of UbAggregateRow (a List of Lists, in segment order).
 */
static List *
segment_ledger_totals(const char *customer_id, TimestampTz start, TimestampTz end, List *segments)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[5] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TIMESTAMPTZARRAYOID,
	TIMESTAMPTZARRAYOID};
	Datum		args[5];
	Datum	   *starts;
	Datum	   *ends;
	int			n = list_length(segments);
	List	   *result = NIL;
	ListCell   *lc;
	int			i = 0;

	ub_prepare_once(&plan,
					"WITH seg AS ("
					"  SELECT s.s_start, s.s_end, s.i"
					"    FROM ROWS FROM (pg_catalog.unnest($4), pg_catalog.unnest($5)) WITH ORDINALITY AS s(s_start, s_end, i)"
					"), ev AS ("
					"  SELECT e.meter, e.kind, e.amount, e.occurred_at, e.event_id, e.properties,"
					"         CASE WHEN e.occurred_at >= $2 AND e.occurred_at < $3 THEN e.occurred_at"
					"              ELSE least(greatest(e.recorded_at, $2), $3 - interval '1 microsecond')"
					"         END AS at"
					"    FROM usage_billing.usage_events e"
					"   WHERE e.customer_id = $1 AND e.period_start = $2"
					"     AND (e.kind = 'adjustment'"
					"          OR (e.kind = 'usage' AND NOT EXISTS ("
					"                SELECT 1 FROM usage_billing.usage_events v"
					"                 WHERE v.customer_id = e.customer_id AND v.meter = e.meter"
					"                   AND v.kind = 'void' AND v.voided_event_id = e.event_id)))"
					")"
					"SELECT s.i, ev.meter,"
					"       CASE m.aggregation"
					"         WHEN 'count' THEN count(*) FILTER (WHERE ev.kind = 'usage')"
					"              + coalesce(sum(ev.amount) FILTER (WHERE ev.kind = 'adjustment'), 0)"
					"         WHEN 'sum' THEN coalesce(sum(ev.amount), 0)"
					"         WHEN 'max' THEN max(ev.amount) FILTER (WHERE ev.kind = 'usage')"
					"         WHEN 'last' THEN (array_agg(ev.amount ORDER BY ev.occurred_at DESC, ev.event_id DESC)"
					"                          FILTER (WHERE ev.kind = 'usage'))[1]"
					"         WHEN 'unique_count' THEN count(DISTINCT ev.properties ->> m.value_property)"
					"                                  FILTER (WHERE ev.kind = 'usage')"
					"       END,"
					"       count(*) FILTER (WHERE ev.kind = 'usage'),"
					"       min(ev.occurred_at) FILTER (WHERE ev.kind = 'usage'),"
					"       max(ev.occurred_at) FILTER (WHERE ev.kind = 'usage')"
					"  FROM ev JOIN seg s ON ev.at >= s.s_start AND ev.at < s.s_end"
					"  JOIN usage_billing.meters m ON m.meter = ev.meter"
					" GROUP BY s.i, ev.meter, m.aggregation, m.value_property"
					" ORDER BY 1, 2", 5, types);

	starts = palloc(n * sizeof(Datum));
	ends = palloc(n * sizeof(Datum));
	foreach(lc, segments)
	{
		UbPricedSegment *seg = lfirst(lc);

		starts[i] = TimestampTzGetDatum(seg->start);
		ends[i] = TimestampTzGetDatum(seg->end);
		result = lappend(result, NIL);
		i++;
	}
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = TimestampTzGetDatum(start);
	args[2] = TimestampTzGetDatum(end);
	args[3] = ub_array(starts, NULL, n, TIMESTAMPTZOID);
	args[4] = ub_array(ends, NULL, n, TIMESTAMPTZOID);
	if (SPI_execute_plan(plan, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "segment usage query failed");
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int64		si = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		UbAggregateRow *row = palloc0(sizeof(UbAggregateRow));
		Datum		d;
		ListCell   *cell = list_nth_cell(result, (int) si - 1);

		row->meter = ub_col_text(tup, desc, 2);
		d = SPI_getbinval(tup, desc, 3, &isnull);
		row->total = isnull ? ub_num_zero() : DatumGetNumericCopy(d);
		d = SPI_getbinval(tup, desc, 4, &isnull);
		row->event_count = isnull ? 0 : DatumGetInt64(d);
		d = SPI_getbinval(tup, desc, 5, &isnull);
		row->has_first = !isnull;
		row->first_usage = isnull ? 0 : DatumGetTimestampTz(d);
		d = SPI_getbinval(tup, desc, 6, &isnull);
		row->has_last = !isnull;
		row->last_usage = isnull ? 0 : DatumGetTimestampTz(d);
		lfirst(cell) = lappend((List *) lfirst(cell), row);
	}
	SPI_freetuptable(SPI_tuptable);
	return result;
}

/*
 * Prices the billing period [start, end) of a customer by segments: a List
 * of UbPricedSegment in time order (one when the plan did not change).
 */
List *
ub_price_period(const UbCustomer *customer, TimestampTz start, TimestampTz end)
{
	static SPIPlanPtr plan_plan = NULL;
	Oid			types[1] = {TEXTOID};
	List	   *plan_segments = ub_plan_segments(customer->customer_id, customer->plan, start, end);
	List	   *segments = NIL;
	Numeric		period_len = ub_num_int(end - start);
	ListCell   *lc;

	ub_prepare_once(&plan_plan,
					"SELECT base_price, currency FROM usage_billing.plans WHERE plan = $1", 1, types);
	foreach(lc, plan_segments)
	{
		UbSegment  *s = lfirst(lc);
		UbPricedSegment *seg = palloc0(sizeof(UbPricedSegment));
		Datum		args[1];
		bool		isnull;

		seg->start = s->start;
		seg->end = s->end;
		seg->plan = s->plan;
		args[0] = CStringGetTextDatum(s->plan);
		if (SPI_execute_plan(plan_plan, args, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "plan \"%s\" of customer \"%s\" does not exist", s->plan, customer->customer_id);
		seg->base_price = DatumGetNumericCopy(SPI_getbinval(SPI_tuptable->vals[0],
															SPI_tuptable->tupdesc, 1, &isnull));
		seg->currency = ub_col_text(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
		SPI_freetuptable(SPI_tuptable);
		if (s->start == start && s->end == end)
			seg->base_amount = seg->base_price;
		else
			seg->base_amount = ub_num_div(ub_num_mul(seg->base_price, ub_num_int(s->end - s->start)),
										  period_len);
		seg->limits = ub_customer_plan_limits(customer->customer_id, s->plan);
		segments = lappend(segments, seg);
	}

	if (list_length(segments) == 1)
		((UbPricedSegment *) linitial(segments))->totals =
			ub_period_aggregates(customer->customer_id, start);
	else
	{
		List	   *per_segment = segment_ledger_totals(customer->customer_id, start, end, segments);
		List	   *aggregates = ub_period_aggregates(customer->customer_id, start);
		UbPricedSegment *last = llast(segments);
		ListCell   *sc;
		int			i = 0;

		foreach(sc, segments)
			((UbPricedSegment *) lfirst(sc))->totals = list_nth(per_segment, i++);

		/* what the ledger no longer has of an additive meter goes to the last segment */
		foreach(sc, aggregates)
		{
			UbAggregateRow *agg = lfirst(sc);
			Numeric		seen = ub_num_zero();
			ListCell   *gc;
			bool		additive = true;

			foreach(gc, segments)
			{
				UbPricedSegment *seg = lfirst(gc);
				UbLimit    *l = ub_segment_limit(seg, agg->meter);

				if (l != NULL && l->aggregation != UB_AGG_SUM && l->aggregation != UB_AGG_COUNT)
					additive = false;
				seen = ub_num_add(seen, ub_segment_total(seg, agg->meter));
			}
			if (additive && ub_num_cmp(seen, agg->total) != 0)
			{
				UbAggregateRow *row = find_or_add(&last->totals, agg->meter);

				row->total = ub_num_add(row->total, ub_num_sub(agg->total, seen));
			}
		}
	}
	return segments;
}
