/*-------------------------------------------------------------------------
 * insight.c
 *	  Analytics: usage_history, usage_forecast, recommend_plan, usage_report.
 *
 * Vocabulary
 *	 bucket		[origin + k * bucket, origin + (k+1) * bucket) in UTC calendar
 *				arithmetic (as billing periods), the last one cut at "until";
 *				the first bucket is the one that contains "since" and counts
 *				from its own start
 *	 origin		where buckets are aligned, in UTC: buckets of days, hours,
 *				minutes... (no months) start at UB_HISTORY_TIME_ORIGIN + j *
 *				bucket (midnight for '1 day', the hour for '1 hour', Monday
 *				for '1 week'); buckets of whole months at UB_HISTORY_MONTH_ORIGIN
 *				+ j * bucket (the 1st of a month, quarters for '3 months',
 *				1 January for '1 year'); a bucket mixing months with days or
 *				time has no natural grid and starts at "since", as in 1.3
 *	 live event	a ledger row of kind 'usage' that no 'void' row names;
 *				history reads live events and adjustments, by occurred_at
 *	 current	the aggregate total of the billing period containing now()
 *	 projected	for sum and count meters the current total extrapolated over
 *				the whole period by elapsed time, rounded half away from zero
 *				to the meter's decimals; the current total otherwise
 *	 complete	a billing period that ended before the current one started
 *
 * usage_report, which formats the same numbers for psql, lives in report.c.
 *
 * History reads the ledger (a chart range need not be a billing period);
 * everything else reads the aggregates, which corrections keep current.
 * Prices come from pricing.c: these functions only decide which totals to
 * price with which limits.  recommend_plan compares plans over the
 * customer's own billing periods, charging each plan's base price once per
 * period and ignoring customer overrides, like an invoice on that plan.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/int.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/datum.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "catalog.h"
#include "escrow.h"
#include "insight.h"
#include "periods.h"
#include "pricing.h"
#include "errors.h"
#include "citus.h"

PG_FUNCTION_INFO_V1(ub_usage_history);
PG_FUNCTION_INFO_V1(ub_usage_forecast);
PG_FUNCTION_INFO_V1(ub_recommend_plan);

#define UB_MAX_BUCKETS		100000

/* 2000-01-03 00:00 UTC, a Monday, and 2000-01-01 00:00 UTC, in microseconds since 2000-01-01 */
#define UB_HISTORY_TIME_ORIGIN	(2 * USECS_PER_DAY)
#define UB_HISTORY_MONTH_ORIGIN	INT64CONST(0)
#define UB_MAX_PERIODS		1000

static SPIPlanPtr history_plans[5] = {NULL, NULL, NULL, NULL, NULL};
static SPIPlanPtr distributed_plans[5] = {NULL, NULL, NULL, NULL, NULL};
static SPIPlanPtr meter_usage_plans[2];	/* per schema: ub_totals_plan */
static SPIPlanPtr period_totals_plans[2];
static SPIPlanPtr plans_plan = NULL;


/* Looks the customer up or raises P0002, as the other reading functions do. */
void
ub_insight_customer(const char *customer_id, UbCustomer *customer)
{
	ub_check_name("customer id", customer_id, UB_MAX_NAME_LEN);
	if (!ub_lookup_customer(customer_id, customer))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("customer \"%s\" does not exist", customer_id)));
}

/* Raises 22023 unless a bucket is a positive interval of one sign. */
static void
check_bucket(const Interval *bucket)
{
	if (bucket->month < 0 || bucket->day < 0 || bucket->time < 0 ||
		(bucket->month == 0 && bucket->day == 0 && bucket->time == 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid bucket"),
				 errdetail("A bucket must be a positive interval and must not mix signs."),
				 errhint("For example bucket => '1 day' or '1 hour'.")));
}

/*
 * The start of the aligned bucket that contains "since" (see origin above),
 * or "since" itself when the bucket mixes months with days or time or when
 * the aligned start would be out of range.
 */
static TimestampTz
aligned_bucket_start(TimestampTz since, const Interval *bucket)
{
	if (bucket->month == 0)
	{
		int64		width;
		int64		offset;
		int64		q;
		TimestampTz start;

		if (pg_mul_s64_overflow((int64) bucket->day, USECS_PER_DAY, &width) ||
			pg_add_s64_overflow(width, bucket->time, &width) ||
			pg_sub_s64_overflow(since, UB_HISTORY_TIME_ORIGIN, &offset))
			return since;
		q = offset / width;
		if (offset % width < 0)
			q--;				/* floor, also before the origin */
		/* |start - since| < width, and since is a valid timestamp */
		start = UB_HISTORY_TIME_ORIGIN + q * width;
		return IS_VALID_TIMESTAMP(start) ? start : since;
	}
	if (bucket->day == 0 && bucket->time == 0)
	{
		struct pg_tm tm;
		fsec_t		fsec;
		int64		months;
		int64		q;
		TimestampTz start;

		if (timestamp2tm(since, NULL, &tm, &fsec, NULL, NULL) != 0)
			return since;
		months = ((int64) tm.tm_year - 2000) * MONTHS_PER_YEAR + (tm.tm_mon - 1);
		q = months / bucket->month;
		if (months % bucket->month < 0)
			q--;
		start = ub_period_start_k(UB_HISTORY_MONTH_ORIGIN, bucket, q);
		return IS_VALID_TIMESTAMP(start) && start <= since ? start : since;
	}
	return since;
}

/* The ledger expression that aggregates a bucket, per aggregation. */
static const char *
history_expression(UbAggregation agg)
{
	switch (agg)
	{
		case UB_AGG_COUNT:
			return "sum(CASE WHEN e.kind = 'adjustment' THEN e.amount ELSE 1 END)";
		case UB_AGG_SUM:
			return "sum(e.amount)";
		case UB_AGG_MAX:
			return "max(e.amount) FILTER (WHERE e.kind = 'usage')";
		case UB_AGG_LAST:
			return "(pg_catalog.array_agg(e.amount ORDER BY e.occurred_at DESC, e.event_id DESC)"
				" FILTER (WHERE e.kind = 'usage'))[1]";
		case UB_AGG_UNIQUE_COUNT:
			return "count(DISTINCT e.properties ->> $5) FILTER (WHERE e.kind = 'usage')";
	}
	return NULL;
}

/* SQL: usage_history(customer_id, meter, since, until, bucket) -> (bucket_start, usage) */
Datum
ub_usage_history(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext caller_cxt = CurrentMemoryContext;
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *meter_name = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	TimestampTz since;
	TimestampTz until;
	TimestampTz first;
	Interval   *bucket;
	UbCustomer	customer;
	UbMeter		meter;
	UbLimit		limit;
	Datum	   *starts;
	Datum	   *ends;
	int			n = 0;
	int			capacity;
	Datum		args[5];
	Oid			types[5] = {TEXTOID, TEXTOID, TIMESTAMPTZARRAYOID, TIMESTAMPTZARRAYOID, TEXTOID};
	SPIPlanPtr	plan;

	InitMaterializedSRF(fcinfo, 0);
	ub_check_name("customer id", customer_id, UB_MAX_NAME_LEN);
	ub_check_name("meter name", meter_name, UB_MAX_NAME_LEN);
	if (PG_ARGISNULL(2) || PG_ARGISNULL(3) ||
		TIMESTAMP_NOT_FINITE(PG_GETARG_TIMESTAMPTZ(2)) || TIMESTAMP_NOT_FINITE(PG_GETARG_TIMESTAMPTZ(3)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("since and until must be finite timestamps")));
	if (PG_ARGISNULL(4))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid bucket"),
				 errdetail("The bucket given was NULL.")));
	since = PG_GETARG_TIMESTAMPTZ(2);
	until = PG_GETARG_TIMESTAMPTZ(3);
	bucket = PG_GETARG_INTERVAL_P(4);
	check_bucket(bucket);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_require_usage_target(customer_id, meter_name, &customer, &meter, &limit);

	/*
	 * every start origin + k * bucket below until, from the aligned bucket
	 * that contains since; each computed from that first start, so months do
	 * not drift
	 */
	first = aligned_bucket_start(since, bucket);
	capacity = 64;
	starts = palloc(sizeof(Datum) * capacity);
	ends = palloc(sizeof(Datum) * capacity);
	for (int64 k = 0;; k++)
	{
		TimestampTz s = ub_period_start_k(first, bucket, k);
		TimestampTz e;

		if (s >= until)
			break;
		if (n >= UB_MAX_BUCKETS)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("too many buckets"),
					 errdetail("The range and bucket give more than %d buckets.", UB_MAX_BUCKETS),
					 errhint("Use a larger bucket or a shorter range.")));
		e = ub_period_start_k(first, bucket, k + 1);
		if (n == capacity)
		{
			capacity *= 2;
			starts = repalloc(starts, sizeof(Datum) * capacity);
			ends = repalloc(ends, sizeof(Datum) * capacity);
		}
		starts[n] = TimestampTzGetDatum(s);
		ends[n] = TimestampTzGetDatum(e < until ? e : until);
		n++;
	}
	if (n == 0)
	{
		SPI_finish();
		return (Datum) 0;
	}

	if (ub_distributed())
	{
		/*
		 * Citus cannot plan a correlated subquery over a distributed table
		 * next to a set-returning function: the customer's events of the
		 * range are read first (one single-shard statement, materialized),
		 * then bucketed as on one node.
		 */
		char	   *sql = psprintf(
			"WITH ev AS MATERIALIZED ("
			"  SELECT e.kind, e.amount, e.occurred_at, e.event_id, e.properties"
			"    FROM usage_billing.usage_events e"
			"   WHERE e.customer_id = $1 AND e.meter = $2"
			"     AND e.occurred_at >= $3[1] AND e.occurred_at < $4[pg_catalog.array_upper($4, 1)]"
			"     AND (e.kind = 'adjustment' OR (e.kind = 'usage' AND NOT EXISTS ("
			"          SELECT 1 FROM usage_billing.voided_events v"
			"           WHERE v.customer_id = e.customer_id AND v.event_id = e.event_id))))"
			"SELECT b.s, coalesce(("
			"  SELECT (%s)::numeric FROM ev e"
			"   WHERE e.occurred_at >= b.s AND e.occurred_at < b.e), 0)"
			"  FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4)) AS b(s, e)"
			" ORDER BY b.s", history_expression(meter.aggregation));

		plan = ub_prepare_once(&distributed_plans[meter.aggregation], sql, 5, types);
	}
	else
	{
		char	   *sql = psprintf(
			"SELECT b.s, coalesce(("
			"  SELECT (%s)::numeric FROM usage_billing.usage_events e"
			"   WHERE e.customer_id = $1 AND e.meter = $2"
			"     AND e.occurred_at >= b.s AND e.occurred_at < b.e"
			"     AND (e.kind = 'adjustment' OR (e.kind = 'usage' AND NOT EXISTS ("
			"          SELECT 1 FROM usage_billing.voided_events v"
			"           WHERE v.customer_id = e.customer_id AND v.event_id = e.event_id)))"
			"     ), 0)"
			"  FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4)) AS b(s, e)"
			" ORDER BY b.s", history_expression(meter.aggregation));

		plan = ub_prepare_once(&history_plans[meter.aggregation], sql, 5, types);
	}
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter_name);
	args[2] = PointerGetDatum(construct_array(starts, n, TIMESTAMPTZOID, sizeof(TimestampTz), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[3] = PointerGetDatum(construct_array(ends, n, TIMESTAMPTZOID, sizeof(TimestampTz), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[4] = CStringGetTextDatum(meter.value_property ? meter.value_property : "");
	if (SPI_execute_plan(plan, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "usage history query failed");

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		Datum		values[2];
		bool		nulls[2] = {false, false};
		bool		isnull;

		values[0] = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);
		values[1] = ub_numeric_result(DatumGetNumeric(SPI_getbinval(SPI_tuptable->vals[i],
																 SPI_tuptable->tupdesc, 2, &isnull)),
								   caller_cxt);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
	return (Datum) 0;
}

/*
 * The customer's meters with usage in the current or the previous period or
 * an effective limit, with both totals, ordered by meter.
 */
List *
ub_meter_usage(const UbCustomer *customer, TimestampTz current_start, TimestampTz previous_start)
{
	Oid			types[3] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		args[3];
	List	   *limits = ub_customer_limits(customer);
	List	   *result = NIL;
	SPIPlanPtr	meter_usage_plan = ub_totals_plan(meter_usage_plans,
				 "SELECT m.meter, m.aggregation, m.unit,"
				 "       coalesce(cur.total, 0), coalesce(prev.total, 0),"
				 "       (pg_catalog.to_jsonb(m) OPERATOR(pg_catalog.->>) 'decimals')::pg_catalog.int4"
				 "  FROM usage_billing.meters m"
				 "  LEFT JOIN %1$s cur"
				 "         ON cur.customer_id = $1 AND cur.meter = m.meter AND cur.period_start = $2"
				 "  LEFT JOIN %1$s prev"
				 "         ON prev.customer_id = $1 AND prev.meter = m.meter AND prev.period_start = $3"
				 " WHERE cur.customer_id IS NOT NULL OR prev.customer_id IS NOT NULL"
				 "    OR EXISTS (SELECT 1 FROM usage_billing.effective_limits l"
				 "                WHERE l.customer_id = $1 AND l.meter = m.meter)"
				 " ORDER BY m.meter", 3, types);
	args[0] = CStringGetTextDatum(customer->customer_id);
	args[1] = TimestampTzGetDatum(current_start);
	args[2] = TimestampTzGetDatum(previous_start);
	if (SPI_execute_plan(meter_usage_plan, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "meter usage query failed");

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		UbMeterUsage *mu = palloc0(sizeof(UbMeterUsage));
		bool		isnull;
		ListCell   *lc;

		mu->meter = SPI_getvalue(tup, desc, 1);
		mu->aggregation = ub_parse_aggregation(SPI_getvalue(tup, desc, 2));
		mu->unit = SPI_getvalue(tup, desc, 3);
		mu->current = DatumGetNumericCopy(SPI_getbinval(tup, desc, 4, &isnull));
		mu->last_period = DatumGetNumericCopy(SPI_getbinval(tup, desc, 5, &isnull));
		mu->decimals = DatumGetInt32(SPI_getbinval(tup, desc, 6, &isnull));
		if (isnull)
			mu->decimals = -1;
		foreach(lc, limits)
		{
			UbLimit    *l = (UbLimit *) lfirst(lc);

			if (strcmp(l->meter, mu->meter) == 0)
				mu->limit = l;
		}
		result = lappend(result, mu);
	}
	return result;
}

/* The current period and the one before it. */
void
ub_current_periods(const UbCustomer *customer, TimestampTz now, TimestampTz *start,
				TimestampTz *end, TimestampTz *previous_start)
{
	TimestampTz pe;

	ub_period_containing(customer->billing_anchor, &customer->period, now, start, end);
	ub_period_containing(customer->billing_anchor, &customer->period, *start - 1, previous_start, &pe);
}

/*
 * The projection of a meter's current total over the whole period, rounded
 * half away from zero to the meter's decimals (a quantity the meter could
 * hold; the exact quotient has up to 20 digits), trailing zeros trimmed.
 */
static Numeric
project(const UbMeterUsage *mu, TimestampTz start, TimestampTz end, TimestampTz now)
{
	Numeric		projected;

	if (mu->aggregation != UB_AGG_SUM && mu->aggregation != UB_AGG_COUNT)
		return mu->current;
	if (now <= start)
		return mu->current;
	projected = ub_num_div(ub_num_mul(mu->current, ub_num_int(end - start)), ub_num_int(now - start));
	if (mu->decimals < 0)
		return projected;
	return DatumGetNumeric(DirectFunctionCall1(numeric_trim_scale,
											   DirectFunctionCall2(numeric_round,
																   NumericGetDatum(projected),
																   Int32GetDatum(mu->decimals))));
}

/* SQL: usage_forecast(customer_id) -> (meter, current, projected, last_period, trend_percent, projected_cost) */
Datum
ub_usage_forecast(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext caller_cxt = CurrentMemoryContext;
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	UbCustomer	customer;
	TimestampTz start,
				end,
				previous_start;
	List	   *meters;
	ListCell   *lc;

	InitMaterializedSRF(fcinfo, 0);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_insight_customer(customer_id, &customer);
	ub_current_periods(&customer, now, &start, &end, &previous_start);
	meters = ub_meter_usage(&customer, start, previous_start);

	foreach(lc, meters)
	{
		UbMeterUsage *mu = (UbMeterUsage *) lfirst(lc);
		Numeric		projected = project(mu, start, end, now);
		Numeric		cost = mu->limit ? ub_usage_cost(mu->limit, projected) : NULL;
		Datum		values[6];
		bool		nulls[6] = {false, false, false, false, false, false};

		values[0] = ub_text_result(mu->meter, caller_cxt);
		values[1] = ub_numeric_result(mu->current, caller_cxt);
		values[2] = ub_numeric_result(projected, caller_cxt);
		values[3] = ub_numeric_result(mu->last_period, caller_cxt);
		if (ub_num_cmp(mu->last_period, ub_num_zero()) == 0)
			nulls[4] = true;
		else
			values[4] = ub_numeric_result(ub_num_div(ub_num_mul(ub_num_int(100),
															 ub_num_sub(projected, mu->last_period)),
												  mu->last_period), caller_cxt);
		nulls[5] = (cost == NULL);
		if (cost != NULL)
			values[5] = ub_numeric_result(cost, caller_cxt);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
	return (Datum) 0;
}

/* One plan's standing in recommend_plan. */
typedef struct PlanCost
{
	char	   *plan;
	Numeric		cost;
} PlanCost;

/* Cheapest first; equal costs by plan name, so the order is stable. */
static int
plan_cost_cmp(const void *a, const void *b)
{
	const PlanCost *x = (const PlanCost *) a;
	const PlanCost *y = (const PlanCost *) b;
	int			c = ub_num_cmp(x->cost, y->cost);

	return c != 0 ? c : strcmp(x->plan, y->plan);
}

/* SQL: recommend_plan(customer_id, periods) -> (plan, cost, current) */
Datum
ub_recommend_plan(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext caller_cxt = CurrentMemoryContext;
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	UbCustomer	customer;
	int			periods;
	Datum	   *starts;
	TimestampTz start,
				end;
	int			nplans;
	PlanCost   *costs;
	char	  **meters;
	Datum	   *totals;
	int64	   *period_index;
	int			ntotals;
	Datum		args[2];

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(1) || PG_GETARG_INT32(1) < 1 || PG_GETARG_INT32(1) > UB_MAX_PERIODS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("periods must be between 1 and %d", UB_MAX_PERIODS),
				 errdetail("The number of past billing periods to compare was %s.",
						   PG_ARGISNULL(1) ? "NULL" : psprintf("%d", PG_GETARG_INT32(1)))));
	periods = PG_GETARG_INT32(1);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_insight_customer(customer_id, &customer);

	/* the last complete periods, newest first */
	starts = palloc(sizeof(Datum) * periods);
	ub_period_containing(customer.billing_anchor, &customer.period,
						 GetCurrentTransactionStartTimestamp(), &start, &end);
	for (int i = 0; i < periods; i++)
	{
		ub_period_containing(customer.billing_anchor, &customer.period, start - 1, &start, &end);
		starts[i] = TimestampTzGetDatum(start);
	}

	{
		Oid			types[2] = {TEXTOID, TIMESTAMPTZARRAYOID};
		SPIPlanPtr	period_totals_plan = ub_totals_plan(period_totals_plans,
					 "SELECT a.meter, a.total, p.i"
					 "  FROM pg_catalog.unnest($2) WITH ORDINALITY AS p(s, i)"
					 "  JOIN %1$s a"
					 "    ON a.customer_id = $1 AND a.period_start = p.s", 2, types);
		args[0] = CStringGetTextDatum(customer_id);
		args[1] = PointerGetDatum(construct_array(starts, periods, TIMESTAMPTZOID,
												  sizeof(TimestampTz), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		if (SPI_execute_plan(period_totals_plan, args, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "period totals query failed");
		ntotals = (int) SPI_processed;
		meters = palloc(sizeof(char *) * (ntotals + 1));
		totals = palloc(sizeof(Datum) * (ntotals + 1));
		period_index = palloc(sizeof(int64) * (ntotals + 1));
		for (int i = 0; i < ntotals; i++)
		{
			bool		isnull;

			meters[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
			totals[i] = datumCopy(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull),
								  false, -1);
			period_index[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3, &isnull));
		}
	}

	{
		Oid			types[1] = {TEXTOID};

		ub_prepare_once(&plans_plan,
					 "SELECT plan, base_price FROM usage_billing.plans"
					 " WHERE currency = $1 ORDER BY plan", 1, types);
		args[0] = CStringGetTextDatum(customer.currency);
		if (SPI_execute_plan(plans_plan, args, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "plan list query failed");
		nplans = (int) SPI_processed;
		costs = palloc(sizeof(PlanCost) * (nplans + 1));
		for (int i = 0; i < nplans; i++)
		{
			bool		isnull;

			costs[i].plan = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
			/* the base line of every period, rounded as on an invoice */
			costs[i].cost = ub_num_mul(ub_round_money(DatumGetNumericCopy(SPI_getbinval(SPI_tuptable->vals[i],
																					 SPI_tuptable->tupdesc, 2, &isnull)),
													  customer.currency),
									   ub_num_int(periods));
		}
	}

	for (int i = 0; i < nplans; i++)
	{
		List	   *limits = ub_plan_limits(costs[i].plan);
		ListCell   *lc;

		foreach(lc, limits)
		{
			UbLimit    *l = (UbLimit *) lfirst(lc);

			if (!ub_limit_is_billed(l))
				continue;
			/* one usage line per billed meter and period, even at 0 */
			for (int p = 1; p <= periods; p++)
			{
				Numeric		total = ub_num_zero();

				for (int t = 0; t < ntotals; t++)
					if (period_index[t] == p && strcmp(meters[t], l->meter) == 0)
						total = DatumGetNumeric(totals[t]);
				costs[i].cost = ub_num_add(costs[i].cost,
										   ub_round_money(ub_usage_cost(l, total), customer.currency));
			}
		}
	}

	qsort(costs, nplans, sizeof(PlanCost), plan_cost_cmp);
	for (int i = 0; i < nplans; i++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = ub_text_result(costs[i].plan, caller_cxt);
		values[1] = ub_numeric_result(costs[i].cost, caller_cxt);
		values[2] = BoolGetDatum(strcmp(costs[i].plan, customer.plan) == 0);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
	return (Datum) 0;
}
