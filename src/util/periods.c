/*-------------------------------------------------------------------------
 * periods.c
 *	  Billing-period arithmetic.
 *
 * A customer's billing periods start at billing_anchor + k * period for
 * every integer k (negative k: periods before the anchor).  The addition is
 * calendar arithmetic in UTC: we add the interval to the anchor taken as a
 * timestamp without time zone, which clamps month ends the way Stripe does
 * (anchor Jan 31 -> Feb 28/29 -> Mar 31) and never depends on the session's
 * TimeZone.  Each start is computed from the anchor, never from the previous
 * start, so clamping does not drift.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "periods.h"

PG_FUNCTION_INFO_V1(ub_period_bounds);

#define UB_AVG_MONTH_USECS	((int64) (30.436875 * USECS_PER_DAY))
#define UB_MAX_PERIOD_STEPS 64

/* Rejects periods that are not strictly positive in every component sense. */
void
ub_check_period(const Interval *period)
{
	if (period->month < 0 || period->day < 0 || period->time < 0 ||
		(period->month == 0 && period->day == 0 && period->time == 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid billing period"),
				 errdetail("A billing period must be positive and must not mix signs.")));
}

/* The start of period number k: anchor + k * period in UTC calendar arithmetic. */
TimestampTz
ub_period_start_k(TimestampTz anchor, const Interval *period, int64 k)
{
	Interval	step;
	int64		months = (int64) period->month * k;
	int64		days = (int64) period->day * k;
	int64		time;

	if (months > PG_INT32_MAX || months < PG_INT32_MIN ||
		days > PG_INT32_MAX || days < PG_INT32_MIN ||
		pg_mul_s64_overflow(period->time, k, &time))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("billing period out of range")));

	step.month = (int32) months;
	step.day = (int32) days;
	step.time = time;

	/* timestamp (without time zone) arithmetic on a UTC value is UTC arithmetic */
	return DatumGetTimestamp(DirectFunctionCall2(timestamp_pl_interval,
												 TimestampGetDatum(anchor),
												 PointerGetDatum(&step)));
}

/* Finds the period [start, end) that contains "at". */
void
ub_period_containing(TimestampTz anchor, const Interval *period, TimestampTz at,
					 TimestampTz *start, TimestampTz *end)
{
	int64		approx_len;
	int64		k;
	int			steps;
	TimestampTz s;
	TimestampTz e;

	if (TIMESTAMP_NOT_FINITE(anchor) || TIMESTAMP_NOT_FINITE(at))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("billing periods need finite timestamps"),
				 errdetail("Neither the billing anchor nor the point in time may be infinity.")));
	ub_check_period(period);

	approx_len = (int64) period->month * UB_AVG_MONTH_USECS +
		(int64) period->day * USECS_PER_DAY + period->time;
	k = (at - anchor) / approx_len;
	if (at < anchor && (at - anchor) % approx_len != 0)
		k--;

	/* the estimate is off by at most a step or two; walk to the right period */
	s = ub_period_start_k(anchor, period, k);
	for (steps = 0; s > at; steps++)
	{
		if (steps > UB_MAX_PERIOD_STEPS)
			elog(ERROR, "billing period search did not converge");
		k--;
		s = ub_period_start_k(anchor, period, k);
	}
	e = ub_period_start_k(anchor, period, k + 1);
	for (steps = 0; e <= at; steps++)
	{
		if (steps > UB_MAX_PERIOD_STEPS)
			elog(ERROR, "billing period search did not converge");
		k++;
		s = e;
		e = ub_period_start_k(anchor, period, k + 1);
	}

	*start = s;
	*end = e;
}

/* SQL: period_bounds(anchor, period, at) -> (period_start, period_end) */
Datum
ub_period_bounds(PG_FUNCTION_ARGS)
{
	TimestampTz anchor = PG_GETARG_TIMESTAMPTZ(0);
	Interval   *period = PG_GETARG_INTERVAL_P(1);
	TimestampTz at = PG_GETARG_TIMESTAMPTZ(2);
	TupleDesc	tupdesc;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	TimestampTz start;
	TimestampTz end;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	ub_period_containing(anchor, period, at, &start, &end);
	values[0] = TimestampTzGetDatum(start);
	values[1] = TimestampTzGetDatum(end);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}
