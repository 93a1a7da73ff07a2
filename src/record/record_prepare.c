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
 *
 * Strict input: an amount has at most the meter's decimals (an amount with
 * more fractional digits that are not zero is refused; trailing zeros beyond
 * them are dropped, so totals never show more) and is at most the meter's
 * max_amount; a count meter takes NULL or 1; occurred_at is at most
 * usage_billing.max_future_skew ahead of the statement's start and within
 * usage_billing.late_event_grace of its period's end, and its period has no
 * finalized invoice (else refused, or moved to the current period by
 * usage_billing.late_event_action).  Every refusal is 22023 with a detail
 * naming the field and the limit.
 *
 * Exact idempotency: a key recorded before answers as a duplicate only when
 * the call repeats the original's meter, amount, occurred_at (when given:
 * an occurred_at equal to the transaction's start is the default now()) and
 * properties; otherwise the call fails with 23505 naming what differs.  The
 * comparison is made wherever a duplicate is found: before writing, for an
 * event that validation refuses, and after a ledger conflict: the writers
 * (record.c, batch.c) call ub_lookup_duplicate_of(event, out) after one.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "escrow.h"
#include "finalize.h"
#include "periods.h"
#include "pricing.h"
#include "record.h"
#include "errors.h"

/* An error found while validating, raised only if the call is not a duplicate. */
typedef struct DeferredError
{
	int			sqlstate;
	char	   *message;
	char	   *detail;
	char	   *hint;
} DeferredError;

int			ub_late_event_grace_seconds = UB_DEFAULT_LATE_EVENT_GRACE;
int			ub_max_future_skew_seconds = UB_DEFAULT_MAX_FUTURE_SKEW;
int			ub_late_event_action = UB_LATE_REJECT;

static const struct config_enum_entry late_event_action_options[] = {
	{"reject", UB_LATE_REJECT, false},
	{"current_period", UB_LATE_CURRENT_PERIOD, false},
	{NULL, 0, false}
};

static SPIPlanPtr original_plan = NULL;
static SPIPlanPtr agg_read_plans[2];	/* per schema: ub_totals_plan */

static bool validate_event(const UbEventInput *in, const UbCustomer *customer,
						   bool meter_found, const UbMeter *meter, char **unique_value,
						   Numeric *amount, DeferredError *err);
static bool check_amount(const UbEventInput *in, const UbMeter *meter, Numeric *amount,
						 DeferredError *err);
static void raise_deferred(const DeferredError *err);
static bool place_in_period(const UbEventInput *in, const UbCustomer *customer,
							TimestampTz *start, TimestampTz *end, DeferredError *err);
static bool lookup_original(const char *customer_id, const char *key, const UbEventInput *in,
							UbRecordResult *out);

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
 * The amount rules of a meter: count meters take NULL or 1; others a finite
 * number, not negative where usage adds up, with at most the meter's
 * decimals and at most its max_amount (ub_check_amount_limits, which the
 * corrections share).  *amount is the amount to record: 1 for a count
 * meter's NULL, trailing zeros beyond the meter's decimals dropped.
 */
static bool
check_amount(const UbEventInput *in, const UbMeter *meter, Numeric *amount, DeferredError *err)
{
	Numeric		a = in->amount;

	*amount = a;
	if (meter->aggregation == UB_AGG_COUNT)
	{
		if (a == NULL)
		{
			*amount = ub_num_int(1);
			return true;
		}
		if (ub_num_is_special(a) || ub_num_cmp(a, ub_num_int(1)) != 0)
			DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
				  psprintf("amount of count meter \"%s\" must be NULL or 1", in->meter),
				  psprintf("Field \"amount\" was %s; a count meter counts one per event.",
						   ub_num_str(a)),
				  pstrdup("To record a quantity, create a sum meter: usage_billing.create_meter(meter, 'sum')."));
	}

	if (a == NULL)
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("amount must not be NULL"),
			  psprintf("Meter \"%s\" was given a NULL amount.", in->meter), NULL);
	if (ub_num_is_special(a))
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("amount must be a finite number"),
			  psprintf("Meter \"%s\" was given %s.", in->meter, ub_num_str(a)),
			  NULL);
	if ((meter->aggregation == UB_AGG_SUM || meter->aggregation == UB_AGG_COUNT ||
		 meter->aggregation == UB_AGG_UNIQUE_COUNT) &&
		ub_num_cmp(a, ub_num_zero()) < 0)
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("amount must not be negative"),
			  psprintf("Meter \"%s\" aggregates with %s and was given %s.", in->meter,
					   ub_aggregation_name(meter->aggregation), ub_num_str(a)),
			  pstrdup("Correct recorded usage with usage_billing.adjust_usage() or usage_billing.void_usage()."));
	if (!ub_check_amount_limits("amount", in->meter, meter, a, amount, &err->message,
								&err->detail, &err->hint))
	{
		err->sqlstate = ERRCODE_INVALID_PARAMETER_VALUE;
		return false;
	}
	return true;
}

/*
 * The decimals and max_amount of a meter for a value of field "field" (an
 * amount or a correction's delta; its absolute value is compared with
 * max_amount).  Returns false with the error's message, detail and hint when
 * it breaks one; else sets *normalized to the value without the trailing
 * zeros beyond the meter's decimals.
 */
bool
ub_check_amount_limits(const char *field, const char *meter_name, const UbMeter *meter,
					   Numeric value, Numeric *normalized, char **message, char **detail,
					   char **hint)
{
	int			scale = DatumGetInt32(DirectFunctionCall1(numeric_scale, NumericGetDatum(value)));
	Numeric		magnitude = value;

	*normalized = value;
	if (scale > meter->decimals)
	{
		int			needed = DatumGetInt32(DirectFunctionCall1(numeric_min_scale,
															   NumericGetDatum(value)));

		if (needed > meter->decimals)
		{
			*message = psprintf("%s has more decimals than meter \"%s\" allows", field, meter_name);
			*detail = psprintf("Field \"%s\" was %s, with %d decimals; meter \"%s\" takes at most %d (its decimals).",
							   field, ub_num_str(value), needed, meter_name, meter->decimals);
			*hint = pstrdup("Round the value, or record it in a smaller unit.");
			return false;
		}
		*normalized = DatumGetNumeric(DirectFunctionCall2(numeric_round, NumericGetDatum(value),
														  Int32GetDatum(meter->decimals)));
	}
	if (ub_num_cmp(value, ub_num_zero()) < 0)
		magnitude = DatumGetNumeric(DirectFunctionCall1(numeric_abs, NumericGetDatum(value)));
	if (meter->max_amount != NULL && ub_num_cmp(magnitude, meter->max_amount) > 0)
	{
		*message = psprintf("%s is above the largest amount of meter \"%s\"", field, meter_name);
		*detail = psprintf("Field \"%s\" was %s; meter \"%s\" takes at most %s per call (its max_amount).",
						   field, ub_num_str(value), meter_name, ub_num_str(meter->max_amount));
		*hint = pstrdup("Split the usage into several events, or raise the meter's max_amount.");
		return false;
	}
	return true;
}

/*
 * Checks everything about an event that does not need a write.  Returns false
 * with *err filled when the event must be refused; for unique_count meters
 * sets *unique_value to the property's value, and *amount to the amount to
 * record.
 */
static bool
validate_event(const UbEventInput *in, const UbCustomer *customer,
			   bool meter_found, const UbMeter *meter, char **unique_value,
			   Numeric *amount, DeferredError *err)
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

	if (!check_amount(in, meter, amount, err))
		return false;

	if (in->occurred_at_null)
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("occurred_at must not be NULL"),
			  NULL,
			  pstrdup("Omit occurred_at to record the event at the current time."));
	if (TIMESTAMP_NOT_FINITE(in->occurred_at))
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("occurred_at must be a finite timestamp"),
			  NULL, NULL);
	if (in->occurred_at - GetCurrentStatementStartTimestamp() >
		(int64) ub_max_future_skew_seconds * USECS_PER_SEC)
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("occurred_at is in the future"),
			  psprintf("Field \"occurred_at\" was %s; it may be at most %d seconds ahead of now() (usage_billing.max_future_skew).",
					   pstrdup(timestamptz_to_str(in->occurred_at)), ub_max_future_skew_seconds),
			  pstrdup("Record events when they happen; check the clock of the client that sent it."));

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
 * more than usage_billing.late_event_grace ago, 35 days by default) are
 * refused or, by setting, moved to the current period; -1 accepts every
 * past period.
 */
static bool
place_in_period(const UbEventInput *in, const UbCustomer *customer,
				TimestampTz *start, TimestampTz *end, DeferredError *err)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();

	ub_period_containing(customer->billing_anchor, &customer->period, in->occurred_at, start, end);
	if (*end > now)
		return true;
	if (ub_late_event_grace_seconds < 0 ||
		*end + (int64) ub_late_event_grace_seconds * USECS_PER_SEC >= now)
	{
		/* an ended period within the grace, unless it is invoiced */
		if (!ub_period_invoiced(customer->customer_id, *start))
			return true;
		if (ub_late_event_action == UB_LATE_CURRENT_PERIOD)
		{
			ub_period_containing(customer->billing_anchor, &customer->period, now, start, end);
			return true;
		}
		DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
			  psprintf("period %s of customer \"%s\" is invoiced",
					   pstrdup(timestamptz_to_str(*start)), customer->customer_id),
			  psprintf("Field \"occurred_at\" was %s; the billing period [%s, %s) has a finalized invoice.",
					   pstrdup(timestamptz_to_str(in->occurred_at)),
					   pstrdup(timestamptz_to_str(*start)), pstrdup(timestamptz_to_str(*end))),
			  pstrdup("Correct an invoiced period with usage_billing.adjust_usage() (the next invoice carries it), or set usage_billing.late_event_action = 'current_period'."));
	}

	if (ub_late_event_action == UB_LATE_CURRENT_PERIOD)
	{
		ub_period_containing(customer->billing_anchor, &customer->period, now, start, end);
		return true;
	}
	DEFER(err, ERRCODE_INVALID_PARAMETER_VALUE,
		  psprintf("event for customer \"%s\" is too late for its billing period", customer->customer_id),
		  psprintf("Field \"occurred_at\" was %s; its billing period ended at %s and accepts late events for %d seconds (usage_billing.late_event_grace).",
				   pstrdup(timestamptz_to_str(in->occurred_at)), pstrdup(timestamptz_to_str(*end)),
				   ub_late_event_grace_seconds),
		  pstrdup("Record it with a current occurred_at; a superuser can widen usage_billing.late_event_grace (-1: any past period) for a backfill, or set usage_billing.late_event_action = 'current_period'."));
}

/* Appends one "name (earlier X, given Y)" to a list of differences. */
static void
add_difference(StringInfo buf, const char *name, const char *earlier, const char *was,
			   const char *given)
{
	if (buf->len > 0)
		appendStringInfoString(buf, ", ");
	appendStringInfo(buf, "%s (%s %s, given %s)", name, earlier, was, given);
}

/* A jsonb for a message: its text (at most 200 bytes of it), or NULL. */
static char *
jsonb_text(Jsonb *j)
{
	char	   *text;
	int			len;

	if (j == NULL)
		return pstrdup("NULL");
	text = JsonbToCString(NULL, &j->root, VARSIZE(j));
	len = strlen(text);
	if (len <= 200)
		return text;
	return psprintf("%s...", pnstrdup(text, pg_mbcliplen(text, len, 200)));
}

/*
 * What differs between an event "in" and an earlier one with the same key
 * (meter, amount, occurred_at, properties), as "name (earlier X, given Y)"
 * items, or NULL when "in" repeats it.  A NULL amount is 1 (what a count
 * meter records for it); an occurred_at equal to the transaction's start is
 * the default now(), not given, and matches any.
 */
char *
ub_event_differences(const UbEventInput *in, const char *meter, Numeric amount,
					 TimestampTz occurred_at, Jsonb *properties, const char *earlier)
{
	StringInfoData diff;
	Numeric		given = in->amount ? in->amount : ub_num_int(1);

	if (amount == NULL)
		amount = ub_num_int(1);
	initStringInfo(&diff);
	if (strcmp(in->meter, meter) != 0)
		add_difference(&diff, "meter", earlier, psprintf("\"%s\"", meter), psprintf("\"%s\"", in->meter));
	if (ub_num_is_special(given) != ub_num_is_special(amount) || ub_num_cmp(given, amount) != 0)
		add_difference(&diff, "amount", earlier, ub_num_str(amount), ub_num_str(given));
	if (!in->occurred_at_null && in->occurred_at != GetCurrentTransactionStartTimestamp() &&
		occurred_at != GetCurrentTransactionStartTimestamp() && in->occurred_at != occurred_at)
		add_difference(&diff, "occurred_at", earlier, pstrdup(timestamptz_to_str(occurred_at)),
					   pstrdup(timestamptz_to_str(in->occurred_at)));
	if ((properties == NULL) != (in->properties == NULL) ||
		(properties != NULL &&
		 !DatumGetBool(DirectFunctionCall2(jsonb_eq, JsonbPGetDatum(properties),
										   JsonbPGetDatum(in->properties)))))
		add_difference(&diff, "properties", earlier, jsonb_text(properties), jsonb_text(in->properties));
	return diff.len > 0 ? diff.data : NULL;
}

/* Raises 23505 unless the call "in" repeats the original event found by its key. */
static void
compare_with_original(const UbEventInput *in, const char *meter, Numeric amount,
					  TimestampTz occurred_at, Jsonb *properties)
{
	char	   *diff = ub_event_differences(in, meter, amount, occurred_at, properties, "recorded");

	if (diff == NULL)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_UNIQUE_VIOLATION),
			 errmsg("idempotency key \"%s\" was already used with different parameters",
					in->idempotency_key),
			 errdetail("Customer \"%s\" recorded an event with this key; these differ: %s.",
					   in->customer_id, diff),
			 errhint("A retry must repeat the original call's parameters; a new event needs a new idempotency key.")));
}

/*
 * If (customer, key) was recorded before, checks that "in" (when not NULL)
 * repeats it (23505 otherwise), fills *out with the current state of the
 * original event's meter and period and returns true.
 */
static bool
lookup_original(const char *customer_id, const char *key, const UbEventInput *in,
				UbRecordResult *out)
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
				 "SELECT meter, period_start, amount, occurred_at, properties"
				 "  FROM usage_billing.usage_events"
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
	if (in != NULL)
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Numeric		amount = DatumGetNumericCopy(SPI_getbinval(tup, desc, 3, &isnull));
		TimestampTz occurred_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 4, &isnull));
		Datum		props = SPI_getbinval(tup, desc, 5, &isnull);

		compare_with_original(in, meter, amount, occurred_at,
								 isnull ? NULL : DatumGetJsonbPCopy(props));
	}

	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	if (SPI_execute_plan(ub_totals_plan(agg_read_plans,
										"SELECT total, period_end FROM %1$s"
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
 * If the event's (customer, key) was recorded before, fills *out with the
 * current state of the original event's meter and period and returns true;
 * the event must repeat the original (23505 otherwise).
 */
bool
ub_lookup_duplicate_of(const UbEventInput *in, UbRecordResult *out)
{
	return lookup_original(in->customer_id, in->idempotency_key, in, out);
}

/*
 * Checks an event and resolves everything recording it needs.  Returns false
 * when the event is invalid but repeats an event recorded before with its
 * idempotency key: then *dup holds the original's state and nothing must be
 * written.  The amount to record may be rewritten in *in (1 for a count
 * meter's NULL, trailing zeros beyond the meter's decimals dropped): the
 * callers' events are theirs to change.
 */
bool
ub_prepare_event(const UbEventInput *in, UbPreparedEvent *pe, UbRecordResult *dup)
{
	bool		meter_found = false;
	DeferredError err;
	Numeric		amount;

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

	pe->limit.reserved = NULL;
	if (!validate_event(in, &pe->customer, meter_found, &pe->meter, &pe->unique_value,
						&amount, &err) ||
		!place_in_period(in, &pe->customer, &pe->period_start, &pe->period_end, &err))
	{
		if (in->idempotency_key != NULL &&
			lookup_original(in->customer_id, in->idempotency_key, in, dup))
			return false;
		raise_deferred(&err);
	}
	if (amount != in->amount)
		((UbEventInput *) in)->amount = amount;
	return true;
}

/* From _PG_init: the settings of the input rules. */
void
ub_input_init(void)
{
	DefineCustomIntVariable("usage_billing.late_event_grace",
							"Seconds after a billing period ends during which late events still land in it.",
							"The default is 35 days, Stripe's window; -1 accepts events for any past period (a backfill).",
							&ub_late_event_grace_seconds,
							UB_DEFAULT_LATE_EVENT_GRACE, -1, PG_INT32_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("usage_billing.max_future_skew",
							"How far ahead of now() an event's occurred_at may be.",
							"Events further in the future are refused; the default is 5 minutes, Stripe's rule.",
							&ub_max_future_skew_seconds,
							UB_DEFAULT_MAX_FUTURE_SKEW, 0, PG_INT32_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomEnumVariable("usage_billing.late_event_action",
							 "What happens to an event that arrives after its period's grace window.",
							 "reject raises an error; current_period records it in the current period.",
							 &ub_late_event_action,
							 UB_LATE_REJECT,
							 late_event_action_options,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);
}
