/*-------------------------------------------------------------------------
 * corrections.c
 *	  void_usage and adjust_usage: append-only corrections of recorded usage.
 *
 * Vocabulary
 *	 original	a ledger row of kind 'usage', found by its idempotency key
 *	 void		a ledger row of kind 'void' whose voided_event_id names the
 *				original (also listed in voided_events); the original stops counting anywhere (aggregates,
 *				history, invoices).  Its amount is minus the original's, so
 *				that for sum meters sum(amount) over the ledger is the total.
 *	 adjustment	a ledger row of kind 'adjustment' whose amount (the delta) is
 *				added to the total of a sum or count meter in the period of
 *				its occurred_at
 *	 recompute	for max, last and unique_count meters a void cannot be undone
 *				arithmetically: the period's total is computed again from the
 *				ledger's usage rows that are not voided (and the distinct
 *				values of usage_unique_values follow)
 *
 * Nothing is updated or deleted in the ledger: the original stays, and the
 * correction row records who (recorded_by), when (recorded_at) and why
 * (reason).  The aggregate row is locked (SELECT ... FOR UPDATE) before it
 * is read, so corrections are exact under concurrency with increment_usage,
 * which takes the same row lock; the primary key of voided_events (one row
 * per voided original, kept outside the ledger so the hot path pays for no
 * extra index) makes a second void of the same event a no-op, also when two
 * sessions void it at once.  Corrections never count in event_count (a void
 * removes its original from it), never raise alerts, ignore hard caps (they
 * are an administrator's act) and are accepted for any past period whatever
 * the late-event grace window says: fixing a closed period is their point.
 * They obey the rest of strict input (record_prepare.c): a void needs a
 * reason that is not blank, an adjustment's delta has at most the meter's
 * decimals and at most its max_amount in absolute value, and its
 * occurred_at is at most usage_billing.max_future_skew ahead.
 *
 * Known gap: a void on a unique_count meter racing with a new event carrying
 * the same value in the same period may drop that value from the distinct
 * set (the new event found the value present before the void removed it).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "escrow.h"
#include "periods.h"
#include "num.h"
#include "record.h"
#include "errors.h"

PG_FUNCTION_INFO_V1(ub_void_usage);
PG_FUNCTION_INFO_V1(ub_adjust_usage);

static SPIPlanPtr original_plan = NULL;
static SPIPlanPtr agg_lock_plan = NULL;
static SPIPlanPtr agg_ensure_plan = NULL;
static SPIPlanPtr void_insert_plan = NULL;
static SPIPlanPtr adjust_insert_plan = NULL;
static SPIPlanPtr recompute_plan = NULL;
static SPIPlanPtr unique_still_plan = NULL;
static SPIPlanPtr unique_delete_plan = NULL;
static SPIPlanPtr agg_void_plan = NULL;
static SPIPlanPtr agg_adjust_plan = NULL;


/* Raises P0002 for an unknown customer; the usual first check of a writing call. */
static void
require_customer(const char *customer_id, UbCustomer *customer)
{
	if (!ub_lookup_customer(customer_id, customer))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("customer \"%s\" does not exist", customer_id)));
}

/*
 * Locks the aggregate row of (customer, meter, period) and returns its total,
 * or NULL when there is no row.  Callers that need the row create it first.
 */
static Numeric
lock_aggregate(const char *customer_id, const char *meter, TimestampTz period_start)
{
	Oid			types[3] = {TEXTOID, TEXTOID, TIMESTAMPTZOID};
	Datum		args[3];
	bool		isnull;

	/* a correction decides on the exact total: escrow slots go back into the row first */
	(void) ub_escrow_fold_key(customer_id, meter, period_start);
	ub_prepare_once(&agg_lock_plan,
				 "SELECT total FROM usage_billing.usage_aggregates"
				 " WHERE customer_id = $1 AND meter = $2 AND period_start = $3"
				 " FOR UPDATE", 3, types);
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	if (SPI_execute_plan(agg_lock_plan, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "aggregate lock failed");
	if (SPI_processed == 0)
		return NULL;
	return DatumGetNumericCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * The period's values recomputed from the usage rows that are not voided:
 * max amount, last amount, first and last occurred_at.  Runs after the void
 * row was inserted, so the voided event is already excluded.
 */
static void
recompute_period(const char *customer_id, const char *meter, TimestampTz period_start,
				 Numeric *max_amount, Numeric *last_amount, Datum *first, bool *first_null,
				 Datum *last, bool *last_null)
{
	Oid			types[3] = {TEXTOID, TEXTOID, TIMESTAMPTZOID};
	Datum		args[3];
	bool		isnull;
	Datum		d;
	HeapTuple	tup;
	TupleDesc	desc;

	ub_prepare_once(&recompute_plan,
				 "SELECT max(e.amount),"
				 "       (pg_catalog.array_agg(e.amount ORDER BY e.occurred_at DESC, e.event_id DESC))[1],"
				 "       min(e.occurred_at), max(e.occurred_at)"
				 "  FROM usage_billing.usage_events e"
				 " WHERE e.customer_id = $1 AND e.meter = $2 AND e.period_start = $3"
				 "   AND e.kind = 'usage'"
				 "   AND NOT EXISTS (SELECT 1 FROM usage_billing.voided_events v"
				 "                    WHERE v.customer_id = e.customer_id AND v.event_id = e.event_id)",
				 3, types);
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	if (SPI_execute_plan(recompute_plan, args, NULL, false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "period recompute failed");
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	d = SPI_getbinval(tup, desc, 1, &isnull);
	*max_amount = isnull ? ub_num_zero() : DatumGetNumericCopy(d);
	d = SPI_getbinval(tup, desc, 2, &isnull);
	*last_amount = isnull ? ub_num_zero() : DatumGetNumericCopy(d);
	*first = SPI_getbinval(tup, desc, 3, first_null);
	*last = SPI_getbinval(tup, desc, 4, last_null);
}

/*
 * unique_count: drops the voided event's value from the period's distinct
 * set unless another live event still has it.  Returns 1 if it was dropped.
 */
static int
drop_unique_value(const char *customer_id, const char *meter, TimestampTz period_start,
				  const char *property, const char *value)
{
	Oid			types[5] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID, TEXTOID};
	Datum		args[5];

	if (value == NULL)
		return 0;
	ub_prepare_once(&unique_still_plan,
				 "SELECT 1 FROM usage_billing.usage_events e"
				 " WHERE e.customer_id = $1 AND e.meter = $2 AND e.period_start = $3"
				 "   AND e.kind = 'usage' AND e.properties ->> $4 = $5"
				 "   AND NOT EXISTS (SELECT 1 FROM usage_billing.voided_events v"
				 "                    WHERE v.customer_id = e.customer_id AND v.event_id = e.event_id)"
				 " LIMIT 1", 5, types);
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	args[3] = CStringGetTextDatum(property);
	args[4] = CStringGetTextDatum(value);
	if (SPI_execute_plan(unique_still_plan, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "unique value lookup failed");
	if (SPI_processed > 0)
		return 0;

	ub_prepare_once(&unique_delete_plan,
				 "DELETE FROM usage_billing.usage_unique_values"
				 " WHERE customer_id = $1 AND meter = $2 AND period_start = $3 AND value = $4",
				 4, types);
	args[3] = CStringGetTextDatum(value);
	if (SPI_execute_plan(unique_delete_plan, args, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "unique value delete failed");
	return SPI_processed > 0 ? 1 : 0;
}

/* Raises 22023 for a correction without a reason (NULL or only blanks): the ledger says why. */
static void
check_reason(const char *function, const char *reason)
{
	const char *p = reason;

	while (p != NULL && *p != '\0' && isspace((unsigned char) *p))
		p++;
	if (p == NULL || *p == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s needs a reason", function),
				 errdetail("Field \"reason\" was %s; a correction records why it was made.",
						   reason == NULL ? "NULL" : "blank"),
				 errhint("Pass reason => 'duplicate import', for example.")));
}

/* SQL: void_usage(customer_id, idempotency_key, reason) */
Datum
ub_void_usage(PG_FUNCTION_ARGS)
{
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *key = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *reason = PG_ARGISNULL(2) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(2));
	UbCustomer	customer;
	UbCustomer	target_customer;
	UbMeter		meter;
	UbLimit		limit;
	bool		meter_found;
	Datum		args[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	desc;
	int64		event_id;
	char	   *meter_name;
	TimestampTz period_start;
	TimestampTz occurred_at;
	Numeric		amount;
	char	   *unique_value = NULL;
	Numeric		total;
	Numeric		new_total;
	Numeric		max_amount,
				last_amount;
	Datum		first,
				last;
	bool		first_null,
				last_null;

	ub_check_name("customer id", customer_id, UB_MAX_NAME_LEN);
	ub_check_name("idempotency key", key, UB_MAX_KEY_LEN);
	check_reason("void_usage", reason);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	require_customer(customer_id, &customer);

	{
		Oid			types[2] = {TEXTOID, TEXTOID};

		ub_prepare_once(&original_plan,
					 "SELECT e.event_id, e.meter, e.period_start, e.occurred_at, e.amount,"
					 "       e.properties ->> m.value_property"
					 "  FROM usage_billing.usage_events e"
					 "  LEFT JOIN usage_billing.meters m ON m.meter = e.meter"
					 " WHERE e.customer_id = $1 AND e.idempotency_key = $2 AND e.kind = 'usage'",
					 2, types);
		args[0] = CStringGetTextDatum(customer_id);
		args[1] = CStringGetTextDatum(key);
		if (SPI_execute_plan(original_plan, args, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "original event lookup failed");
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_NO_DATA_FOUND),
					 errmsg("usage event \"%s\" of customer \"%s\" does not exist", key, customer_id),
					 errdetail("No usage was recorded with this idempotency key."),
					 errhint("Only events recorded with an idempotency key can be voided; use usage_billing.adjust_usage() for the others.")));
		tup = SPI_tuptable->vals[0];
		desc = SPI_tuptable->tupdesc;
		event_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		meter_name = SPI_getvalue(tup, desc, 2);
		period_start = DatumGetTimestampTz(SPI_getbinval(tup, desc, 3, &isnull));
		occurred_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 4, &isnull));
		amount = DatumGetNumericCopy(SPI_getbinval(tup, desc, 5, &isnull));
		unique_value = SPI_getvalue(tup, desc, 6);
	}

	if (!ub_lookup_usage_target(customer_id, meter_name, &target_customer, &meter, &meter_found, &limit) ||
		!meter_found)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("meter \"%s\" does not exist", meter_name)));

	/* the row lock first: increment_usage and other corrections queue behind it */
	total = lock_aggregate(customer_id, meter_name, period_start);

	{
		Oid			types7[7] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, NUMERICOID, INT8OID, TEXTOID};
		Datum		args7[7];
		char		nulls7[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};

		ub_prepare_once(&void_insert_plan,
					 "WITH marked AS ("
					 "  INSERT INTO usage_billing.voided_events (event_id, customer_id)"
					 "  VALUES ($6, $1) ON CONFLICT (customer_id, event_id) DO NOTHING RETURNING event_id)"
					 "INSERT INTO usage_billing.usage_events"
					 "       (customer_id, meter, period_start, occurred_at, amount, kind,"
					 "        voided_event_id, reason)"
					 " SELECT $1, $2, $3, $4, -$5, 'void', marked.event_id, $7 FROM marked",
					 7, types7);
		args7[0] = CStringGetTextDatum(customer_id);
		args7[1] = CStringGetTextDatum(meter_name);
		args7[2] = TimestampTzGetDatum(period_start);
		args7[3] = TimestampTzGetDatum(occurred_at);
		args7[4] = NumericGetDatum(amount);
		args7[5] = Int64GetDatum(event_id);
		args7[6] = reason ? CStringGetTextDatum(reason) : (Datum) 0;
		nulls7[6] = reason ? ' ' : 'n';
		if (SPI_execute_plan(void_insert_plan, args7, nulls7, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "void insert failed");
		if (SPI_processed == 0)
		{
			/* voided before: nothing more to do */
			SPI_finish();
			PG_RETURN_VOID();
		}
	}

	if (total == NULL)
	{
		/* the aggregate row is gone (retention): the ledger alone records the void */
		SPI_finish();
		PG_RETURN_VOID();
	}

	recompute_period(customer_id, meter_name, period_start, &max_amount, &last_amount,
					 &first, &first_null, &last, &last_null);
	switch (meter.aggregation)
	{
		case UB_AGG_SUM:
			new_total = ub_num_sub(total, amount);
			break;
		case UB_AGG_COUNT:
			new_total = ub_num_sub(total, ub_num_int(1));
			break;
		case UB_AGG_MAX:
			new_total = max_amount;
			break;
		case UB_AGG_LAST:
			new_total = last_amount;
			break;
		case UB_AGG_UNIQUE_COUNT:
			new_total = ub_num_sub(total,
								   ub_num_int(drop_unique_value(customer_id, meter_name, period_start,
																meter.value_property, unique_value)));
			break;
		default:
			elog(ERROR, "unexpected aggregation");
	}
	if (ub_num_cmp(new_total, ub_num_zero()) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("voiding usage event \"%s\" would make the total of meter \"%s\" negative", key, meter_name),
				 errdetail("The total of customer \"%s\" in the billing period starting %s is %s; the event contributed %s.",
						   customer_id, timestamptz_to_str(period_start), ub_num_str(total),
						   ub_num_str(ub_num_sub(total, new_total))),
				 errhint("Remove the negative adjustments of that period first.")));

	{
		Oid			types[6] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, NUMERICOID, TIMESTAMPTZOID, TIMESTAMPTZOID};

		ub_prepare_once(&agg_void_plan,
					 "UPDATE usage_billing.usage_aggregates"
					 "   SET total = $4, event_count = greatest(event_count - 1, 0),"
					 "       first_usage = $5, last_usage = $6, updated_at = now()"
					 " WHERE customer_id = $1 AND meter = $2 AND period_start = $3",
					 6, types);
		args[0] = CStringGetTextDatum(customer_id);
		args[1] = CStringGetTextDatum(meter_name);
		args[2] = TimestampTzGetDatum(period_start);
		args[3] = NumericGetDatum(new_total);
		args[4] = first;
		nulls[4] = first_null ? 'n' : ' ';
		args[5] = last;
		nulls[5] = last_null ? 'n' : ' ';
		if (SPI_execute_plan(agg_void_plan, args, nulls, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "aggregate update failed");
	}
	SPI_finish();
	PG_RETURN_VOID();
}

/* SQL: adjust_usage(customer_id, meter, delta, reason, occurred_at) */
Datum
ub_adjust_usage(PG_FUNCTION_ARGS)
{
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *meter_name = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	Numeric		delta = PG_ARGISNULL(2) ? NULL : PG_GETARG_NUMERIC(2);
	char	   *reason = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	UbCustomer	customer;
	UbMeter		meter;
	UbLimit		limit;
	TimestampTz occurred_at;
	TimestampTz period_start;
	TimestampTz period_end;
	Numeric		total;
	Numeric		new_total;
	Datum		args[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};

	ub_check_name("customer id", customer_id, UB_MAX_NAME_LEN);
	ub_check_name("meter name", meter_name, UB_MAX_NAME_LEN);
	if (delta == NULL || ub_num_is_special(delta))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("delta must be a finite number"),
				 errdetail("Meter \"%s\" was given %s.", meter_name,
						   delta == NULL ? "NULL" : ub_num_str(delta))));
	if (PG_ARGISNULL(4) || TIMESTAMP_NOT_FINITE(PG_GETARG_TIMESTAMPTZ(4)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("occurred_at must be a finite timestamp"),
				 errhint("Omit occurred_at to correct the current billing period.")));
	occurred_at = PG_GETARG_TIMESTAMPTZ(4);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_require_usage_target(customer_id, meter_name, &customer, &meter, &limit);
	if (meter.aggregation != UB_AGG_SUM && meter.aggregation != UB_AGG_COUNT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cannot adjust meter \"%s\"", meter_name),
				 errdetail("Meter \"%s\" aggregates with %s; only sum and count meters can be adjusted by a delta.",
						   meter_name, ub_aggregation_name(meter.aggregation)),
				 errhint("Void the wrong events with usage_billing.void_usage() and record the right ones.")));
	if (meter.aggregation == UB_AGG_COUNT &&
		ub_num_cmp(delta, DatumGetNumeric(DirectFunctionCall2(numeric_trunc, NumericGetDatum(delta),
															  Int32GetDatum(0)))) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("delta for count meter \"%s\" must be a whole number", meter_name),
				 errdetail("The delta given was %s.", ub_num_str(delta))));

	/* the amount rules of recording apply to the delta; occurred_at may not be in the future */
	{
		char	   *message;
		char	   *detail;
		char	   *hint;

		if (!ub_check_amount_limits("delta", meter_name, &meter, delta, &delta, &message,
									&detail, &hint))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg_internal("%s", message),
					 errdetail_internal("%s", detail),
					 errhint("%s", hint)));
	}
	if (occurred_at - GetCurrentStatementStartTimestamp() >
		(int64) ub_max_future_skew_seconds * USECS_PER_SEC)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("occurred_at is in the future"),
				 errdetail("Field \"occurred_at\" was %s; it may be at most %d seconds ahead of now() (usage_billing.max_future_skew).",
						   timestamptz_to_str(occurred_at), ub_max_future_skew_seconds),
				 errhint("Omit occurred_at to correct the current billing period.")));

	ub_period_containing(customer.billing_anchor, &customer.period, occurred_at,
						 &period_start, &period_end);

	/* make sure the row exists, then lock it */
	{
		Oid			types[4] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID};

		ub_prepare_once(&agg_ensure_plan,
					 "INSERT INTO usage_billing.usage_aggregates"
					 "       (customer_id, meter, period_start, period_end, total, event_count)"
					 " VALUES ($1, $2, $3, $4, 0, 0)"
					 " ON CONFLICT (customer_id, meter, period_start) DO NOTHING", 4, types);
		args[0] = CStringGetTextDatum(customer_id);
		args[1] = CStringGetTextDatum(meter_name);
		args[2] = TimestampTzGetDatum(period_start);
		args[3] = TimestampTzGetDatum(period_end);
		if (SPI_execute_plan(agg_ensure_plan, args, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "aggregate insert failed");
	}
	total = lock_aggregate(customer_id, meter_name, period_start);
	if (total == NULL)
		elog(ERROR, "aggregate row vanished");

	new_total = ub_num_add(total, delta);
	if (ub_num_cmp(new_total, ub_num_zero()) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("adjustment would make the total of meter \"%s\" negative", meter_name),
				 errdetail("The total of customer \"%s\" in the billing period starting %s is %s; the delta is %s.",
						   customer_id, timestamptz_to_str(period_start), ub_num_str(total), ub_num_str(delta)),
				 errhint("A total can be lowered to 0 at most.")));

	{
		Oid			types[6] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, NUMERICOID, TEXTOID};

		ub_prepare_once(&adjust_insert_plan,
					 "INSERT INTO usage_billing.usage_events"
					 "       (customer_id, meter, period_start, occurred_at, amount, kind, reason)"
					 " VALUES ($1, $2, $3, $4, $5, 'adjustment', $6)", 6, types);
		args[3] = TimestampTzGetDatum(occurred_at);
		args[4] = NumericGetDatum(delta);
		args[5] = reason ? CStringGetTextDatum(reason) : (Datum) 0;
		nulls[5] = reason ? ' ' : 'n';
		if (SPI_execute_plan(adjust_insert_plan, args, nulls, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "adjustment insert failed");
	}
	{
		Oid			types[4] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, NUMERICOID};

		ub_prepare_once(&agg_adjust_plan,
					 "UPDATE usage_billing.usage_aggregates"
					 "   SET total = $4, updated_at = now()"
					 " WHERE customer_id = $1 AND meter = $2 AND period_start = $3", 4, types);
		args[3] = NumericGetDatum(new_total);
		if (SPI_execute_plan(agg_adjust_plan, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "aggregate update failed");
	}
	SPI_finish();
	PG_RETURN_VOID();
}
