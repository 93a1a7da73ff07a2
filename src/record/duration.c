/*-------------------------------------------------------------------------
 * duration.c
 *	  record_duration: usage of a duration meter given as a time span.
 *
 * A duration meter is a sum meter whose unit is a time unit (seconds,
 * minutes or hours; meters.duration_unit): increment_usage takes amounts in
 * that unit, and record_duration(customer, meter, started_at, ended_at,
 * idempotency_key) converts the span [started_at, ended_at) to it.
 *
 * The conversion is numeric arithmetic on the span's microseconds, no
 * float: the part of the span in each billing period is recorded in that
 * period, as one event of the usual path (ub_record_event, so every rule of
 * strict input and exact idempotency applies).  The parts are rounded to
 * the meter's decimals on the running total, so that they add up to the
 * whole span rounded once.  A part's occurred_at is its last microsecond;
 * the last part's event carries the idempotency key, earlier parts the key
 * with " (part i of n)" appended, so a retry of the whole span is a
 * duplicate part by part.  The call returns what increment_usage returns
 * for the last part (the period of ended_at).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "periods.h"
#include "num.h"
#include "record.h"
#include "errors.h"

PG_FUNCTION_INFO_V1(ub_record_duration);

/* Most parts a span may have: a span longer than this many periods is refused. */
#define MAX_PARTS 1000

/* The meter's time unit in seconds and its decimals; false when it is not a duration meter. */
static bool
duration_unit(const char *meter, int64 *unit_seconds, int *decimals, bool *found)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		args[1];
	char	   *unit;
	bool		isnull;
	Datum		d;

	ub_prepare_once(&plan,
					"SELECT (pg_catalog.to_jsonb(m) OPERATOR(pg_catalog.->>) 'duration_unit'),"
					"       (pg_catalog.to_jsonb(m) OPERATOR(pg_catalog.->>) 'decimals')::pg_catalog.int4"
					"  FROM usage_billing.meters m WHERE m.meter = $1", 1, types);
	args[0] = CStringGetTextDatum(meter);
	if (SPI_execute_plan(plan, args, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "meter lookup failed");
	*found = SPI_processed > 0;
	if (!*found)
		return false;
	unit = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	*decimals = isnull ? UB_DEFAULT_DECIMALS : DatumGetInt32(d);
	if (unit == NULL)
		return false;
	if (strcmp(unit, "seconds") == 0)
		*unit_seconds = 1;
	else if (strcmp(unit, "minutes") == 0)
		*unit_seconds = 60;
	else if (strcmp(unit, "hours") == 0)
		*unit_seconds = 3600;
	else
		return false;
	return true;
}

/* microseconds / (unit_seconds * 1e6), exactly, rounded to "decimals" places. */
static Numeric
to_unit(int64 usecs, int64 unit_seconds, int decimals)
{
	Numeric		q = ub_num_div(ub_num_int(usecs), ub_num_int(unit_seconds * USECS_PER_SEC));

	Datum		r = DirectFunctionCall2(numeric_round, NumericGetDatum(q), Int32GetDatum(decimals));

	/* no trailing zeros: 90 minutes are 1.5 hours, not 1.500000 */
	return DatumGetNumeric(DirectFunctionCall1(numeric_trim_scale, r));
}

/* Raises 22023 naming a timestamp field. */
static void
bad_span(const char *message, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg_internal("%s", message),
			 errdetail_internal("%s", detail)));
}

/* SQL: record_duration(customer_id, meter, started_at, ended_at, idempotency_key) */
Datum
ub_record_duration(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *meter = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *key = PG_ARGISNULL(4) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(4));
	TimestampTz started_at;
	TimestampTz ended_at;
	UbCustomer	customer;
	UbMeter		m;
	UbLimit		limit;
	bool		meter_found;
	bool		found;
	int64		unit_seconds = 1;
	int			decimals = UB_DEFAULT_DECIMALS;
	TimestampTz bounds[MAX_PARTS + 1];
	int			nparts = 0;
	Numeric		recorded = ub_num_zero();
	UbRecordResult out;
	MemoryContext caller_cxt = CurrentMemoryContext;

	InitMaterializedSRF(fcinfo, 0);
	PreventCommandIfReadOnly("record_duration()");

	ub_check_name("customer id", customer_id, UB_MAX_NAME_LEN);
	ub_check_name("meter name", meter, UB_MAX_NAME_LEN);
	if (key != NULL)
		ub_check_name("idempotency key", key, UB_MAX_KEY_LEN - 32);
	if (PG_ARGISNULL(2) || PG_ARGISNULL(3))
		bad_span(psprintf("%s must not be NULL", PG_ARGISNULL(2) ? "started_at" : "ended_at"),
				 "A duration is the span from started_at to ended_at.");
	started_at = PG_GETARG_TIMESTAMPTZ(2);
	ended_at = PG_GETARG_TIMESTAMPTZ(3);
	if (TIMESTAMP_NOT_FINITE(started_at) || TIMESTAMP_NOT_FINITE(ended_at))
		bad_span("started_at and ended_at must be finite timestamps",
				 psprintf("Field \"%s\" was infinite.", TIMESTAMP_NOT_FINITE(started_at) ? "started_at" : "ended_at"));
	if (ended_at < started_at)
		bad_span("ended_at is before started_at",
				 psprintf("Field \"ended_at\" was %s, before started_at %s; a span cannot be negative.",
						  pstrdup(timestamptz_to_str(ended_at)), pstrdup(timestamptz_to_str(started_at))));
	if (ended_at - GetCurrentStatementStartTimestamp() > (int64) ub_max_future_skew_seconds * USECS_PER_SEC)
		bad_span("ended_at is in the future",
				 psprintf("Field \"ended_at\" was %s; it may be at most %d seconds ahead of now() (usage_billing.max_future_skew).",
						  pstrdup(timestamptz_to_str(ended_at)), ub_max_future_skew_seconds));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();

	if (!duration_unit(meter, &unit_seconds, &decimals, &found))
	{
		if (!found)
			ereport(ERROR,
					(errcode(ERRCODE_NO_DATA_FOUND),
					 errmsg("meter \"%s\" does not exist", meter),
					 errhint("Create it with usage_billing.create_meter(meter, 'duration', unit => 'seconds').")));
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("meter \"%s\" is not a duration meter", meter),
				 errdetail("record_duration records spans of time on meters created with aggregation 'duration'."),
				 errhint("Record the amount with usage_billing.increment_usage().")));
	}
	if (!ub_lookup_usage_target(customer_id, meter, &customer, &m, &meter_found, &limit))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("customer \"%s\" does not exist", customer_id),
				 errhint("Create it with usage_billing.upsert_customer().")));

	/* the period boundaries inside the span: bounds[0] = started_at < ... < bounds[n] = ended_at */
	bounds[0] = started_at;
	do
	{
		TimestampTz s;
		TimestampTz e;

		if (nparts == MAX_PARTS)
			bad_span("the span covers too many billing periods",
					 psprintf("From %s to %s: at most %d periods.", pstrdup(timestamptz_to_str(started_at)),
							  pstrdup(timestamptz_to_str(ended_at)), MAX_PARTS));
		ub_period_containing(customer.billing_anchor, &customer.period, bounds[nparts], &s, &e);
		bounds[++nparts] = Min(e, ended_at);
	} while (bounds[nparts] < ended_at);

	for (int i = 0; i < nparts; i++)
	{
		UbEventInput in;
		Numeric		upto = to_unit(bounds[i + 1] - started_at, unit_seconds, decimals);

		memset(&in, 0, sizeof(in));
		in.customer_id = customer_id;
		in.meter = meter;
		in.amount = ub_num_sub(upto, recorded);
		recorded = upto;
		in.occurred_at = Max(bounds[i], bounds[i + 1] - 1);
		in.idempotency_key = key == NULL ? NULL :
			i == nparts - 1 ? key : psprintf("%s (part %d of %d)", key, i + 1, nparts);
		ub_record_event(&in, &out);
	}
	PopOverrideSearchPath();

	/* the result outlives SPI: copy it out before SPI_finish */
	ub_put_record_result(rsinfo, &out, caller_cxt);
	SPI_finish();
	return (Datum) 0;
}
