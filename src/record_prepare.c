/*-------------------------------------------------------------------------
 * record_prepare.c
 *	  Checking a usage event before anything is written, and answering for
 *	  a duplicate.
 *
 * increment_usage and increment_usage_batch (record.c, batch.c) both start
 * here: ub_prepare_event checks the names, resolves the customer, the meter
 * and the limit in force, validates the event and places it in its billing
 * period.  A "duplicate" is an event whose idempotency key was recorded
 * before; ub_lookup_duplicate answers for it with the state of the original
 * event's meter and period.
 *
 * Validation errors after the customer lookup are "deferred": a
 * DeferredError is raised only when the key is not a duplicate, so that a
 * retry of a recorded event is answered as one even if it would now be
 * refused (a suspended customer, a deleted meter).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "escrow.h"
#include "periods.h"
#include "pricing.h"
#include "record.h"
#include "usage_billing.h"

/* An error found while validating, raised only if the call is not a duplicate. */
typedef struct DeferredError
{
	int			sqlstate;
	char	   *message;
	char	   *detail;
	char	   *hint;
} DeferredError;

static SPIPlanPtr original_plan = NULL;
static SPIPlanPtr agg_read_plans[2];	/* per schema: ub_totals_plan */

static bool validate_event(const UbEventInput *in, const UbCustomer *customer,
						   bool meter_found, const UbMeter *meter, char **unique_value,
						   DeferredError *err);
static void raise_deferred(const DeferredError *err);
static void place_in_period(const UbCustomer *customer, TimestampTz occurred_at,
							TimestampTz *start, TimestampTz *end);

/* Raises a deferred error. */
static void
raise_deferred(const DeferredError *err)
{
	ereport(ERROR,
			(errcode(err->sqlstate),
			 errmsg_internal("%s", err->message),
			 err->detail ? errdetail_internal("%s", err->detail) : 0,
			 err->hint ? errhint("%s", err->hint) : 0));
}

#define DEFER(err, code, msg, det, hnt) \
	do { \
		(err)->sqlstate = (code); (err)->message = (msg); \
		(err)->detail = (det); (err)->hint = (hnt); \
		return false; \
	} while (0)

/*
 * Checks everything about an event that does not need a write.  Returns false
 * with *err filled when the event must be refused; for unique_count meters
 * sets *unique_value to the property's value.
 */
static bool
validate_event(const UbEventInput *in, const UbCustomer *customer,
			   bool meter_found, const UbMeter *meter, char **unique_value,
			   DeferredError *err)
{
	if (strcmp(customer->status, "active") != 0)
		DEFER(err, ERRCODE_UB_NOT_ACTIVE,
			  psprintf("customer \"%s\" is %s", in->customer_id, customer->status),
			  psprintf("Usage can only be recorded for active customers."),
			  pstrdup("Reactivate the customer with usage_billing.set_customer_status()."));

	if (!meter_found)
		DEFER(err, ERRCODE_NO_DATA_FOUND,
			  psprintf("meter \"%s\" does not exist", in->meter),
			  NULL,
			  pstrdup("Create it with usage_billing.create_meter()."));

	if (in->amount == NULL)
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("amount must not be NULL"),
			  psprintf("Meter \"%s\" was given a NULL amount.", in->meter), NULL);
	if (ub_num_is_special(in->amount))
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("amount must be a finite number"),
			  psprintf("Meter \"%s\" was given %s.", in->meter,
					   ub_num_str(in->amount)),
			  NULL);
	if ((meter->aggregation == UB_AGG_SUM || meter->aggregation == UB_AGG_COUNT ||
		 meter->aggregation == UB_AGG_UNIQUE_COUNT) &&
		ub_num_cmp(in->amount, ub_num_zero()) < 0)
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("amount must not be negative"),
			  psprintf("Meter \"%s\" aggregates with %s and was given %s.", in->meter,
					   ub_aggregation_name(meter->aggregation),
					   ub_num_str(in->amount)),
			  pstrdup("Correct recorded usage with usage_billing.adjust_usage() or usage_billing.void_usage()."));

	if (in->occurred_at_null)
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("occurred_at must not be NULL"),
			  NULL,
			  pstrdup("Omit occurred_at to record the event at the current time."));
	if (TIMESTAMP_NOT_FINITE(in->occurred_at))
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("occurred_at must be a finite timestamp"),
			  NULL, NULL);

	if (in->properties != NULL &&
		(!JB_ROOT_IS_OBJECT(in->properties) || JB_ROOT_IS_SCALAR(in->properties)))
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("properties must be a JSON object"),
			  psprintf("The properties given were a JSON %s.",
					   JB_ROOT_IS_ARRAY(in->properties) && !JB_ROOT_IS_SCALAR(in->properties) ? "array" : "scalar"),
			  NULL);

	*unique_value = NULL;
	if (meter->aggregation == UB_AGG_UNIQUE_COUNT)
	{
		JsonbValue	v;
		JsonbValue *found = NULL;

		if (in->properties != NULL)
			found = getKeyJsonValueFromContainer(&in->properties->root, meter->value_property,
												 strlen(meter->value_property), &v);
		if (found == NULL || v.type == jbvNull)
			DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
				  psprintf("unique_count event for meter \"%s\" lacks property \"%s\"",
						   in->meter, meter->value_property),
				  psprintf("A unique_count meter counts distinct values of properties->>'%s'.",
						   meter->value_property),
				  psprintf("Pass properties => '{\"%s\": ...}'.", meter->value_property));
		if (v.type == jbvString)
			*unique_value = pnstrdup(v.val.string.val, v.val.string.len);
		else if (v.type == jbvNumeric)
			*unique_value = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v.val.numeric)));
		else if (v.type == jbvBool)
			*unique_value = pstrdup(v.val.boolean ? "true" : "false");
		else
			*unique_value = JsonbToCString(NULL, v.val.binary.data, v.val.binary.len);
	}
	return true;
}

/*
 * The billing period an event lands in.  Late events (whose period ended
 * more than usage_billing.late_event_grace ago) are refused or, by setting,
 * moved to the current period; by default every past period accepts them.
 */
static void
place_in_period(const UbCustomer *customer, TimestampTz occurred_at,
				TimestampTz *start, TimestampTz *end)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();

	ub_period_containing(customer->billing_anchor, &customer->period, occurred_at, start, end);
	if (ub_late_event_grace_seconds < 0 || *end > now)
		return;
	if (*end + (int64) ub_late_event_grace_seconds * USECS_PER_SEC >= now)
		return;

	if (ub_late_event_action == UB_LATE_CURRENT_PERIOD)
	{
		ub_period_containing(customer->billing_anchor, &customer->period, now, start, end);
		return;
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("event for customer \"%s\" is too late for its billing period", customer->customer_id),
			 errdetail("The event occurred at %s; its billing period ended at %s and accepts late events for %d seconds.",
					   pstrdup(timestamptz_to_str(occurred_at)), pstrdup(timestamptz_to_str(*end)),
					   ub_late_event_grace_seconds),
			 errhint("Record it with a current occurred_at, or set usage_billing.late_event_action = 'current_period'.")));
}

/*
 * If (customer, key) was recorded before, fills *out with the current state
 * of the original event's meter and period and returns true.
 */
bool
ub_lookup_duplicate(const char *customer_id, const char *key, UbRecordResult *out)
{
	Oid			types2[2] = {TEXTOID, TEXTOID};
	Oid			types3[3] = {TEXTOID, TEXTOID, TIMESTAMPTZOID};
	Datum		args[3];
	bool		isnull;
	char	   *meter;
	TimestampTz period_start;
	UbCustomer	customer;
	UbMeter		m;
	UbLimit		limit;
	bool		meter_found;
	bool		agg_found;

	ub_prepare_once(&original_plan,
				 "SELECT meter, period_start FROM usage_billing.usage_events"
				 " WHERE customer_id = $1 AND idempotency_key = $2", 2, types2);
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(key);
	if (SPI_execute_plan(original_plan, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "duplicate lookup failed");
	if (SPI_processed == 0)
		return false;
	meter = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	period_start = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
													 SPI_tuptable->tupdesc, 2, &isnull));

	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	if (SPI_execute_plan(ub_totals_plan(agg_read_plans,
										"SELECT total, period_end FROM usage_billing.aggregate_totals"
										" WHERE customer_id = $1 AND meter = $2 AND period_start = $3",
										3, types3),
						 args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "aggregate lookup failed");

	out->duplicate = true;
	out->period_start = period_start;
	agg_found = (SPI_processed > 0);
	if (agg_found)
	{
		out->total = DatumGetNumericCopy(SPI_getbinval(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 1, &isnull));
		out->period_end = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
															SPI_tuptable->tupdesc, 2, &isnull));
	}
	else
	{
		out->total = ub_num_zero();
		out->period_end = period_start;
	}

	memset(&limit, 0, sizeof(limit));
	if (ub_lookup_usage_target(customer_id, meter, &customer, &m, &meter_found, &limit) &&
		!agg_found)
	{
		/* aggregate row gone (retention): recompute the period's end */
		TimestampTz s;

		ub_period_containing(customer.billing_anchor, &customer.period, period_start, &s, &out->period_end);
	}
	out->included = limit.exists ? limit.included : NULL;
	out->remaining = ub_remaining(&limit, out->total);
	out->status = ub_usage_status(&limit, out->total);
	return true;
}

/*
 * Checks an event and resolves everything recording it needs.  Returns false
 * when the event is invalid but its idempotency key was recorded before: then
 * *dup holds the original's state and nothing must be written.
 */
bool
ub_prepare_event(const UbEventInput *in, UbPreparedEvent *pe, UbRecordResult *dup)
{
	bool		meter_found = false;
	DeferredError err;

	ub_check_name("customer id", in->customer_id, UB_MAX_NAME_LEN);
	ub_check_name("meter name", in->meter, UB_MAX_NAME_LEN);
	if (in->idempotency_key != NULL)
		ub_check_name("idempotency key", in->idempotency_key, UB_MAX_KEY_LEN);

	if (!ub_lookup_usage_target(in->customer_id, in->meter, &pe->customer, &pe->meter,
								&meter_found, &pe->limit))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("customer \"%s\" does not exist", in->customer_id),
				 errhint("Create it with usage_billing.upsert_customer().")));

	if (!validate_event(in, &pe->customer, meter_found, &pe->meter, &pe->unique_value, &err))
	{
		if (in->idempotency_key != NULL && ub_lookup_duplicate(in->customer_id, in->idempotency_key, dup))
			return false;
		raise_deferred(&err);
	}

	place_in_period(&pe->customer, in->occurred_at, &pe->period_start, &pe->period_end);
	return true;
}
