/*-------------------------------------------------------------------------
 * batch.c
 *	  increment_usage_batch: many usage events in one call, all or nothing.
 *
 * The batch is a JSON array of objects with the same fields, meaning and
 * defaults as the arguments of increment_usage.  Every event goes through
 * the same path as a single call (ub_record_event), inside one statement:
 * any error, a hard cap included, aborts the statement and with it the
 * whole batch.  Events are processed in (customer_id, meter) order, keeping
 * their relative order, so that concurrent batches take aggregate row locks
 * in the same order and do not deadlock each other.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "record.h"
#include "usage_billing.h"

PG_FUNCTION_INFO_V1(ub_increment_usage_batch);

/* An event of the batch with its position, for a stable sort. */
typedef struct BatchEvent
{
	UbEventInput in;
	int			position;
} BatchEvent;

/* Orders events by customer, then meter, then position in the batch. */
static int
batch_event_cmp(const void *a, const void *b)
{
	const BatchEvent *x = (const BatchEvent *) a;
	const BatchEvent *y = (const BatchEvent *) b;
	int			c;

	c = strcmp(x->in.customer_id ? x->in.customer_id : "", y->in.customer_id ? y->in.customer_id : "");
	if (c != 0)
		return c;
	c = strcmp(x->in.meter ? x->in.meter : "", y->in.meter ? y->in.meter : "");
	if (c != 0)
		return c;
	return x->position - y->position;
}

/* Raises 22023 for a field of the wrong JSON type. */
static void
bad_field(int position, const char *field, const char *expected)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid usage event at position %d of the batch", position + 1),
			 errdetail("Field \"%s\" must be %s.", field, expected)));
}

/* Reads a string field; *present is false when the key is absent. */
static const char *
field_text(JsonbContainer *obj, const char *key, int position, bool *present)
{
	JsonbValue	v;

	*present = getKeyJsonValueFromContainer(obj, key, strlen(key), &v) != NULL;
	if (!*present || v.type == jbvNull)
		return NULL;
	if (v.type != jbvString)
		bad_field(position, key, "a string");
	return pnstrdup(v.val.string.val, v.val.string.len);
}

/* Converts one JSON object of the batch to an event input. */
static void
parse_event(JsonbContainer *obj, int position, UbEventInput *in)
{
	JsonbValue	v;
	bool		present;
	const char *text;

	memset(in, 0, sizeof(*in));
	in->customer_id = field_text(obj, "customer_id", position, &present);
	in->meter = field_text(obj, "meter", position, &present);
	in->idempotency_key = field_text(obj, "idempotency_key", position, &present);

	/* amount: a number or a numeric string; absent means 1 as in increment_usage */
	if (getKeyJsonValueFromContainer(obj, "amount", 6, &v) == NULL)
		in->amount = int64_to_numeric(1);
	else if (v.type == jbvNumeric)
		in->amount = v.val.numeric;
	else if (v.type == jbvString)
		in->amount = DatumGetNumeric(DirectFunctionCall3(numeric_in,
														 CStringGetDatum(pnstrdup(v.val.string.val, v.val.string.len)),
														 ObjectIdGetDatum(InvalidOid),
														 Int32GetDatum(-1)));
	else if (v.type != jbvNull)
		bad_field(position, "amount", "a number");

	/* occurred_at: absent means now(); an explicit null is refused like a NULL argument */
	text = field_text(obj, "occurred_at", position, &present);
	if (!present)
		in->occurred_at = GetCurrentTransactionStartTimestamp();
	else if (text == NULL)
		in->occurred_at_null = true;
	else
		in->occurred_at = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in,
																  CStringGetDatum(text),
																  ObjectIdGetDatum(InvalidOid),
																  Int32GetDatum(-1)));

	if (getKeyJsonValueFromContainer(obj, "properties", 10, &v) != NULL && v.type != jbvNull)
		in->properties = JsonbValueToJsonb(&v);
}

/* SQL: increment_usage_batch(events jsonb) -> (accepted, duplicates) */
Datum
ub_increment_usage_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Jsonb	   *events;
	int			n;
	BatchEvent *batch;
	int64		accepted = 0;
	int64		duplicates = 0;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	MemoryContext batch_cxt;
	MemoryContext old_cxt;

	InitMaterializedSRF(fcinfo, 0);

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("events must not be NULL"),
				 errhint("Pass a JSON array of usage events.")));
	events = PG_GETARG_JSONB_P(0);
	if (!JB_ROOT_IS_ARRAY(events) || JB_ROOT_IS_SCALAR(events))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("events must be a JSON array"),
				 errhint("Pass [{\"customer_id\": ..., \"meter\": ..., \"amount\": ...}, ...].")));

	n = JB_ROOT_COUNT(events);
	batch = palloc(sizeof(BatchEvent) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		JsonbValue *elem = getIthJsonbValueFromContainer(&events->root, i);

		if (elem == NULL || elem->type != jbvBinary || !JsonContainerIsObject(elem->val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid usage event at position %d of the batch", i + 1),
					 errdetail("Every element of the batch must be a JSON object.")));
		parse_event(elem->val.binary.data, i, &batch[i].in);
		batch[i].position = i;
	}
	qsort(batch, n, sizeof(BatchEvent), batch_event_cmp);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	/* each event's results are garbage after it is counted: reset per event */
	batch_cxt = AllocSetContextCreate(CurrentMemoryContext, "usage_billing batch event",
									  ALLOCSET_DEFAULT_SIZES);
	for (int i = 0; i < n; i++)
	{
		UbRecordResult out;

		old_cxt = MemoryContextSwitchTo(batch_cxt);
		ub_record_event(&batch[i].in, &out);
		MemoryContextSwitchTo(old_cxt);
		if (out.duplicate)
			duplicates++;
		else
			accepted++;
		MemoryContextReset(batch_cxt);
	}
	SPI_finish();

	values[0] = Int64GetDatum(accepted);
	values[1] = Int64GetDatum(duplicates);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	return (Datum) 0;
}
