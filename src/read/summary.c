/*-------------------------------------------------------------------------
 * summary.c
 *	  get_usage_summary: usage per meter of a billing period or any range.
 *
 * Words used here:
 *   period mode  [period_start, period_end) is exactly one billing period of
 *                the customer: totals, event counts and first/last usage come
 *                from usage_aggregates (one index range read, independent of
 *                the number of events) and the limit columns (included,
 *                usage_percent, overage_quantity, overage_cost) are filled
 *                from the limits of the plan in force now (a past period:
 *                at its end); overage_cost sums the period's plan
 *                segments, each priced under its plan (period_pricing.c).
 *   range mode   any other range: totals are recomputed from the ledger
 *                (usage_events, by occurred_at) with each meter's
 *                aggregation, and the limit columns are NULL because a limit
 *                only means something for one billing period.
 *
 * Which range is meant:
 *   both bounds NULL            the current billing period
 *   only period_start given     the billing period containing period_start
 *   only period_end given       the billing period that ends at or contains
 *                               period_end (the one containing the instant
 *                               just before it)
 *   both given                  [period_start, period_end); an empty or
 *                               reversed range raises 22023
 *
 * Ledger arithmetic in range mode: a 'usage' event that has a 'void' row
 * pointing at it (voided_event_id) does not count at all; 'adjustment' rows
 * add their amount (a delta) to sum and count meters.  event_count is the
 * number of non-voided 'usage' events (corrections are not events), and
 * first_usage/last_usage their earliest and latest occurred_at.  max is the
 * largest amount, last the amount with the latest occurred_at (ties: the
 * later recorded), unique_count the distinct values of the meter's
 * value_property.
 *
 * usage_percent is 100 * total / included rounded to 2 decimals, NULL when
 * included is NULL or 0.  Rows: every meter with usage in the range or with
 * an effective limit, ordered by meter (the database's collation).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "escrow.h"
#include "period_pricing.h"
#include "periods.h"
#include "pricing.h"
#include "period_usage.h"
#include "results.h"
#include "errors.h"

PG_FUNCTION_INFO_V1(ub_get_usage_summary);

#define SUMMARY_COLS 9

static SPIPlanPtr period_rows_plans[2];
static SPIPlanPtr range_rows_plan = NULL;

static SPIPlanPtr KeepPlan(const char *sql, int nargs, Oid *types);
static UbLimit *FindLimit(List *limits, const char *meter);
static List *PeriodRows(const char *customer_id, TimestampTz period_start);
static List *RangeRows(const char *customer_id, TimestampTz from, TimestampTz to);
static Numeric UsagePercent(Numeric total, Numeric included);
static void EmitSummaryRow(ReturnSetInfo *rsinfo, const UbAggregateRow *row,
						   const UbLimit *limit, bool with_limits, List *segments);
static Numeric SegmentsCost(List *segments, const char *meter);

/* Prepares a statement once per backend and keeps it. */
static SPIPlanPtr
KeepPlan(const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/* The effective limit of one meter in a list of limits, NULL when it has none. */
static UbLimit *
FindLimit(List *limits, const char *meter)
{
	ListCell   *lc;

	foreach(lc, limits)
	{
		UbLimit    *l = lfirst(lc);

		if (strcmp(l->meter, meter) == 0)
			return l;
	}
	return NULL;
}

/* 100 * total / included to 2 decimals; NULL when there is no positive limit. */
static Numeric
UsagePercent(Numeric total, Numeric included)
{
	Numeric		pct;

	if (included == NULL || ub_num_cmp(included, ub_num_zero()) == 0)
		return NULL;
	pct = ub_num_div(ub_num_mul(ub_num_int(100), total), included);
	return DatumGetNumeric(DirectFunctionCall2(numeric_round, NumericGetDatum(pct),
											   Int32GetDatum(2)));
}

/*
 * The exact usage cost of a meter over a period's plan segments: each
 * segment's usage priced under its plan; NULL when no segment bills it.
 */
static Numeric
SegmentsCost(List *segments, const char *meter)
{
	Numeric		cost = NULL;
	ListCell   *lc;

	foreach(lc, segments)
	{
		UbPricedSegment *seg = lfirst(lc);
		UbLimit    *l = ub_segment_limit(seg, meter);
		Numeric		c;

		if (l == NULL || (c = ub_usage_cost(l, ub_segment_total(seg, meter))) == NULL)
			continue;
		cost = cost == NULL ? c : ub_num_add(cost, c);
	}
	return cost;
}

/*
 * Appends one summary row; the limit columns only in period mode, the cost
 * over the period's segments when it has several.
 */
static void
EmitSummaryRow(ReturnSetInfo *rsinfo, const UbAggregateRow *row, const UbLimit *limit,
			   bool with_limits, List *segments)
{
	Datum		values[SUMMARY_COLS];
	bool		nulls[SUMMARY_COLS];
	Numeric		v;

	memset(nulls, true, sizeof(nulls));
	values[0] = CStringGetTextDatum(row->meter);
	nulls[0] = false;
	values[1] = NumericGetDatum(row->total);
	nulls[1] = false;
	values[2] = Int64GetDatum(row->event_count);
	nulls[2] = false;

	if (with_limits && limit != NULL)
	{
		if (limit->included != NULL)
		{
			values[3] = NumericGetDatum(limit->included);
			nulls[3] = false;
		}
		if ((v = UsagePercent(row->total, limit->included)) != NULL)
		{
			values[4] = NumericGetDatum(v);
			nulls[4] = false;
		}
		if ((v = ub_overage_quantity(limit, row->total)) != NULL)
		{
			values[5] = NumericGetDatum(v);
			nulls[5] = false;
		}
		v = list_length(segments) > 1 ? SegmentsCost(segments, row->meter) :
			ub_usage_cost(limit, row->total);
		if (v != NULL)
		{
			values[6] = NumericGetDatum(v);
			nulls[6] = false;
		}
	}
	if (row->has_first)
	{
		values[7] = TimestampTzGetDatum(row->first_usage);
		nulls[7] = false;
	}
	if (row->has_last)
	{
		values[8] = TimestampTzGetDatum(row->last_usage);
		nulls[8] = false;
	}
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/* Rows of one billing period: its aggregates joined with the meters that have a limit. */
static List *
PeriodRows(const char *customer_id, TimestampTz period_start)
{
	Datum		args[2];
	int			ret;
	List	   *rows = NIL;
	Oid			types[2] = {TEXTOID, TIMESTAMPTZOID};

	args[0] = CStringGetTextDatum(customer_id);
	args[1] = TimestampTzGetDatum(period_start);
	ret = SPI_execute_plan(ub_totals_plan(period_rows_plans,
										  "SELECT coalesce(a.meter, l.meter), a.total, a.event_count,"
										  "       a.first_usage, a.last_usage"
										  "  FROM (SELECT * FROM %1$s"
										  "         WHERE customer_id = $1 AND period_start = $2) a"
										  "  FULL JOIN (SELECT DISTINCT el.meter FROM usage_billing.effective_limits el"
										  "              WHERE el.customer_id = $1) l ON l.meter = a.meter"
										  " ORDER BY 1", 2, types),
						   args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "period summary failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
		rows = lappend(rows, ub_aggregate_row(SPI_tuptable->vals[i], SPI_tuptable->tupdesc));
	SPI_freetuptable(SPI_tuptable);
	return rows;
}

/* Rows of an arbitrary range, recomputed from the ledger with each meter's aggregation. */
static List *
RangeRows(const char *customer_id, TimestampTz from, TimestampTz to)
{
	Datum		args[3];
	int			ret;
	List	   *rows = NIL;

	if (range_rows_plan == NULL)
	{
		Oid			types[3] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID};

		range_rows_plan = KeepPlan(
			"WITH ev AS ("
			"  SELECT e.meter, e.kind, e.amount, e.occurred_at, e.event_id, e.properties"
			"    FROM usage_billing.usage_events e"
			"   WHERE e.customer_id = $1 AND e.occurred_at >= $2 AND e.occurred_at < $3"
			"     AND (e.kind = 'adjustment'"
			"          OR (e.kind = 'usage' AND NOT EXISTS ("
			"                SELECT 1 FROM usage_billing.usage_events v"
			"                 WHERE v.customer_id = e.customer_id AND v.meter = e.meter"
			"                   AND v.kind = 'void' AND v.voided_event_id = e.event_id)))"
			"), per AS ("
			"  SELECT ev.meter,"
			"         CASE m.aggregation"
			"           WHEN 'count' THEN count(*) FILTER (WHERE ev.kind = 'usage')"
			"                + coalesce(sum(ev.amount) FILTER (WHERE ev.kind = 'adjustment'), 0)"
			"           WHEN 'sum' THEN coalesce(sum(ev.amount) FILTER (WHERE ev.kind = 'usage'), 0)"
			"                + coalesce(sum(ev.amount) FILTER (WHERE ev.kind = 'adjustment'), 0)"
			"           WHEN 'max' THEN max(ev.amount) FILTER (WHERE ev.kind = 'usage')"
			"           WHEN 'last' THEN (array_agg(ev.amount ORDER BY ev.occurred_at DESC, ev.event_id DESC)"
			"                            FILTER (WHERE ev.kind = 'usage'))[1]"
			"           WHEN 'unique_count' THEN count(DISTINCT ev.properties ->> m.value_property)"
			"                                    FILTER (WHERE ev.kind = 'usage')"
			"         END AS total,"
			"         count(*) FILTER (WHERE ev.kind = 'usage') AS event_count,"
			"         min(ev.occurred_at) FILTER (WHERE ev.kind = 'usage') AS first_usage,"
			"         max(ev.occurred_at) FILTER (WHERE ev.kind = 'usage') AS last_usage"
			"    FROM ev JOIN usage_billing.meters m ON m.meter = ev.meter"
			"   GROUP BY ev.meter, m.aggregation, m.value_property"
			")"
			"SELECT coalesce(p.meter, l.meter), p.total, p.event_count,"
			"       p.first_usage, p.last_usage"
			"  FROM per p"
			"  FULL JOIN (SELECT DISTINCT el.meter FROM usage_billing.effective_limits el"
			"              WHERE el.customer_id = $1) l ON l.meter = p.meter"
			" ORDER BY 1", 3, types);
	}
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = TimestampTzGetDatum(from);
	args[2] = TimestampTzGetDatum(to);
	ret = SPI_execute_plan(range_rows_plan, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "range summary failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
		rows = lappend(rows, ub_aggregate_row(SPI_tuptable->vals[i], SPI_tuptable->tupdesc));
	SPI_freetuptable(SPI_tuptable);
	return rows;
}

/* SQL: get_usage_summary(customer_id, period_start, period_end), one row per meter. */
Datum
ub_get_usage_summary(PG_FUNCTION_ARGS)
{
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	ReturnSetInfo *rsinfo;
	UbCustomer	customer;
	TimestampTz from;
	TimestampTz to;
	TimestampTz ps;
	TimestampTz pe;
	bool		period_mode;
	List	   *rows;
	List	   *limits = NIL;
	List	   *segments = NIL;
	ListCell   *lc;

	ub_init_srf(fcinfo);
	rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_require_customer(customer_id, &customer);

	if (PG_ARGISNULL(1) && PG_ARGISNULL(2))
		ub_period_containing(customer.billing_anchor, &customer.period,
							 GetCurrentTransactionStartTimestamp(), &from, &to);
	else if (PG_ARGISNULL(2))
		ub_period_containing(customer.billing_anchor, &customer.period,
							 PG_GETARG_TIMESTAMPTZ(1), &from, &to);
	else if (PG_ARGISNULL(1))
	{
		TimestampTz end = PG_GETARG_TIMESTAMPTZ(2);

		if (TIMESTAMP_NOT_FINITE(end))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("period_end must be finite when period_start is NULL"),
					 errdetail("Without period_start the range is the billing period ending at period_end.")));
		ub_period_containing(customer.billing_anchor, &customer.period, end - 1, &from, &to);
	}
	else
	{
		from = PG_GETARG_TIMESTAMPTZ(1);
		to = PG_GETARG_TIMESTAMPTZ(2);
		if (to <= from)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid usage summary range"),
					 errdetail("period_end (%s) must be later than period_start (%s).",
							   pstrdup(timestamptz_to_str(to)),
							   pstrdup(timestamptz_to_str(from)))));
	}

	/* a range is a billing period when it starts and ends exactly where one does */
	period_mode = false;
	if (!TIMESTAMP_NOT_FINITE(from) && !TIMESTAMP_NOT_FINITE(to))
	{
		ub_period_containing(customer.billing_anchor, &customer.period, from, &ps, &pe);
		period_mode = (ps == from && pe == to);
	}

	if (period_mode)
	{
		TimestampTz now = GetCurrentTransactionStartTimestamp();

		/* the limits of the plan in force now, or at the end of a past period */
		rows = PeriodRows(customer_id, from);
		segments = ub_price_period(&customer, from, to);
		limits = ub_segment_at(segments, Min(now, to - 1))->limits;
	}
	else
		rows = RangeRows(customer_id, from, to);

	foreach(lc, rows)
	{
		UbAggregateRow *row = lfirst(lc);

		EmitSummaryRow(rsinfo, row, period_mode ? FindLimit(limits, row->meter) : NULL,
					   period_mode, segments);
	}

	SPI_finish();
	return (Datum) 0;
}
