/*-------------------------------------------------------------------------
 * batch.c
 *	  increment_usage_batch: many usage events in one call, all or nothing.
 *
 * The batch is a JSON array of objects with the same fields, meaning and
 * defaults as the arguments of increment_usage, and every event passes the
 * same checks (ub_prepare_event).  Writing is done in bulk: one multi-row
 * ledger insert for the whole batch, then one multi-row aggregate upsert per
 * aggregation kind with a row per (customer, meter, period) "group" of the
 * batch, each group followed by the same hard-cap and alert step as a
 * single call (ub_finish_aggregate); the statements are in batch_sql.c
 * (batch.h is what the two share).  unique_count events, whose
 * contribution depends on the set of values already seen, take the
 * single-event path.  Any error, a hard cap included, aborts the statement
 * and with it the whole batch.
 *
 * Here live the parsing of the batch's JSON, the order of the events and of
 * the groups, the claims on idempotency keys repeated inside the batch, and
 * the grouping of the events.
 *
 * Groups are written in (customer_id, meter, period_start) order, so that
 * concurrent batches take aggregate row locks in the same order and do not
 * deadlock each other.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "executor/spi.h"
#include "utils/datum.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/hsearch.h"

#include "batch.h"
#include "num.h"
#include "record.h"
#include "errors.h"

PG_FUNCTION_INFO_V1(ub_increment_usage_batch);

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
			 errdetail("Field \"%s\" of event %d (index %d) must be %s.", field, position + 1,
					   position, expected)));
}

/* At most the first 100 bytes of a string for a message, cut at a character boundary. */
static char *
clipped(const char *s, int len)
{
	return pnstrdup(s, pg_mbcliplen(s, len, 100));
}

/* The keys an event of the batch may have: the arguments of increment_usage. */
static const char *const event_keys[] = {
	"customer_id", "meter", "amount", "idempotency_key", "occurred_at", "properties"
};

/* Raises 22023 for a key that is not one of event_keys (a typo such as "amout"). */
static void
check_event_keys(JsonbContainer *obj, int position)
{
	JsonbIterator *it = JsonbIteratorInit(obj);
	JsonbValue	v;
	JsonbIteratorToken tok;

	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		bool		known = false;

		if (tok != WJB_KEY)
			continue;
		for (int k = 0; k < lengthof(event_keys); k++)
			if (v.val.string.len == strlen(event_keys[k]) &&
				memcmp(v.val.string.val, event_keys[k], v.val.string.len) == 0)
				known = true;
		if (!known)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid usage event at position %d of the batch", position + 1),
					 errdetail("Event %d (index %d) has an unknown key \"%s\"; the keys are customer_id, meter, amount, idempotency_key, occurred_at and properties.",
							   position + 1, position, clipped(v.val.string.val, v.val.string.len)),
					 errhint("Nothing of the batch was recorded.")));
	}
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

/* Reads a required string field: absent or null is refused. */
static const char *
required_text(JsonbContainer *obj, const char *key, int position)
{
	bool		present;
	const char *text = field_text(obj, key, position, &present);

	if (text == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid usage event at position %d of the batch", position + 1),
				 errdetail("Event %d (index %d) has %s key \"%s\"; every event needs customer_id and meter.",
						   position + 1, position, present ? "a null" : "no", key)));
	return text;
}

/*
 * Converts a string field with a type's input function; a string the type
 * does not take is 22023 naming the event and the field, not the input
 * function's own error.
 */
static Datum
field_input(PGFunction input, const char *text, int position, const char *field,
			const char *expected)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile Datum result = (Datum) 0;
	volatile bool failed = false;

	PG_TRY();
	{
		result = DirectFunctionCall3(input, CStringGetDatum(text), ObjectIdGetDatum(InvalidOid),
									 Int32GetDatum(-1));
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		/* only data errors of the input function are ours to replace */
		if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) != ERRCODE_DATA_EXCEPTION)
			PG_RE_THROW();
		FlushErrorState();
		failed = true;
	}
	PG_END_TRY();
	if (failed)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid usage event at position %d of the batch", position + 1),
				 errdetail("Field \"%s\" of event %d (index %d) must be %s, not \"%s\".",
						   field, position + 1, position, expected, clipped(text, strlen(text)))));
	return result;
}

/*
 * Converts one JSON object of the batch to an event input.  Unknown keys,
 * a missing customer_id or meter, and fields of the wrong type are refused
 * here, naming the event; the rules on the values are ub_prepare_event's.
 */
static void
parse_event(JsonbContainer *obj, int position, UbEventInput *in)
{
	JsonbValue	v;
	bool		present;
	const char *text;

	memset(in, 0, sizeof(*in));
	check_event_keys(obj, position);
	in->customer_id = required_text(obj, "customer_id", position);
	in->meter = required_text(obj, "meter", position);
	in->idempotency_key = field_text(obj, "idempotency_key", position, &present);

	/* amount: a number or a numeric string; absent means 1 as in increment_usage */
	if (getKeyJsonValueFromContainer(obj, "amount", 6, &v) == NULL)
		in->amount = int64_to_numeric(1);
	else if (v.type == jbvNumeric)
		in->amount = v.val.numeric;
	else if (v.type == jbvString)
		in->amount = DatumGetNumeric(field_input(numeric_in,
												 pnstrdup(v.val.string.val, v.val.string.len),
												 position, "amount", "a number"));
	else if (v.type != jbvNull)
		bad_field(position, "amount", "a number");

	/* occurred_at: absent means now(); an explicit null is refused like a NULL argument */
	text = field_text(obj, "occurred_at", position, &present);
	if (!present)
		in->occurred_at = GetCurrentTransactionStartTimestamp();
	else if (text == NULL)
		in->occurred_at_null = true;
	else
		in->occurred_at = DatumGetTimestampTz(field_input(timestamptz_in, text, position,
														  "occurred_at", "a timestamp"));

	if (getKeyJsonValueFromContainer(obj, "properties", 10, &v) != NULL && v.type != jbvNull)
	{
		if (v.type != jbvBinary || !JsonContainerIsObject(v.val.binary.data))
			bad_field(position, "properties", "a JSON object");
		in->properties = JsonbValueToJsonb(&v);
	}
}

/* Orders events by customer, meter, period, then position: the group order. */
static int
group_cmp(const void *a, const void *b)
{
	const BatchEvent *x = *(BatchEvent *const *) a;
	const BatchEvent *y = *(BatchEvent *const *) b;
	int			c;

	c = strcmp(x->in.customer_id, y->in.customer_id);
	if (c != 0)
		return c;
	c = strcmp(x->in.meter, y->in.meter);
	if (c != 0)
		return c;
	if (x->pe.period_start != y->pe.period_start)
		return x->pe.period_start < y->pe.period_start ? -1 : 1;
	return x->position - y->position;
}

/*
 * Gathers the accepted bulk events, in group order, into groups per aggregation
 * kind, and writes them.
 */
static void
write_aggregates(BatchEvent **events, int n)
{
	BatchGroup *groups[3];
	int			ngroups[3] = {0, 0, 0};

	for (int k = 0; k < 3; k++)
		groups[k] = palloc(sizeof(BatchGroup) * Max(n, 1));

	for (int i = 0; i < n; i++)
	{
		BatchEvent *ev = events[i];
		UbAggregation agg = ev->pe.meter.aggregation;
		int			slot = agg == UB_AGG_MAX ? 1 : agg == UB_AGG_LAST ? 2 : 0;
		BatchGroup *g = ngroups[slot] > 0 ? &groups[slot][ngroups[slot] - 1] : NULL;

		if (!ev->accepted)
			continue;
		if (g == NULL || strcmp(g->first->in.customer_id, ev->in.customer_id) != 0 ||
			strcmp(g->first->in.meter, ev->in.meter) != 0 ||
			g->first->pe.period_start != ev->pe.period_start)
		{
			g = &groups[slot][ngroups[slot]++];
			g->first = ev;
			g->contribution = agg == UB_AGG_COUNT ? ub_num_int(1) : ev->in.amount;
			g->count = 1;
			g->first_usage = ev->in.occurred_at;
			g->last_usage = ev->in.occurred_at;
			continue;
		}
		switch (agg)
		{
			case UB_AGG_COUNT:
				g->contribution = ub_num_add(g->contribution, ub_num_int(1));
				break;
			case UB_AGG_MAX:
				g->contribution = ub_num_max(g->contribution, ev->in.amount);
				break;
			case UB_AGG_LAST:
				/* events come in batch order: on a tie the later one wins */
				if (ev->in.occurred_at >= g->last_usage)
					g->contribution = ev->in.amount;
				break;
			default:
				g->contribution = ub_num_add(g->contribution, ev->in.amount);
				break;
		}
		g->count++;
		g->first_usage = Min(g->first_usage, ev->in.occurred_at);
		g->last_usage = Max(g->last_usage, ev->in.occurred_at);
	}

	for (int k = 0; k < 3; k++)
	{
		UbAggregation agg = k == 1 ? UB_AGG_MAX : k == 2 ? UB_AGG_LAST : UB_AGG_SUM;

		ub_batch_upsert_groups(groups[k], ngroups[k], agg);
	}
}

#define KEY_BYTES (UB_MAX_NAME_LEN + UB_MAX_KEY_LEN + 2)

/* Entry of the batch's key table: which event first used (customer, key). */
typedef struct KeyClaim
{
	char		key[KEY_BYTES];
	int			position;
	const BatchEvent *first;
} KeyClaim;

/* Fills a zero-padded "customer NUL key" hash key; false when it cannot be one. */
static bool
claim_key(const UbEventInput *in, char *key)
{
	if (in->customer_id == NULL || in->idempotency_key == NULL ||
		strlen(in->customer_id) > UB_MAX_NAME_LEN || strlen(in->idempotency_key) > UB_MAX_KEY_LEN)
		return false;
	memset(key, 0, KEY_BYTES);
	strcpy(key, in->customer_id);
	strcpy(key + UB_MAX_NAME_LEN + 1, in->idempotency_key);
	return true;
}

/* Records, for every key of the batch, the position (in batch order) that uses it first. */
static HTAB *
claim_keys(BatchEvent *batch, int n)
{
	HASHCTL		ctl;
	HTAB	   *claims;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = KEY_BYTES;
	ctl.entrysize = sizeof(KeyClaim);
	ctl.hcxt = CurrentMemoryContext;
	claims = hash_create("usage_billing batch key claims", Max(n, 16), &ctl,
						 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	for (int i = 0; i < n; i++)
	{
		char		key[KEY_BYTES];
		bool		found;
		KeyClaim   *claim;

		if (!claim_key(&batch[i].in, key))
			continue;
		claim = hash_search(claims, key, HASH_ENTER, &found);
		if (!found || batch[i].position < claim->position)
		{
			claim->position = batch[i].position;
			claim->first = &batch[i];
		}
	}
	return claims;
}

/*
 * Is this event the first of the batch to use its key (or keyless)?  A
 * later use must repeat the first one exactly (23505 otherwise): then it is
 * a duplicate that counts once.
 */
static bool
first_use_of_key(HTAB *claims, const BatchEvent *ev, int n)
{
	char		key[KEY_BYTES];
	KeyClaim   *claim;
	const UbEventInput *first;
	char	   *diff;

	if (!claim_key(&ev->in, key))
		return true;
	claim = hash_search(claims, key, HASH_FIND, NULL);
	if (claim == NULL || claim->position == ev->position)
		return true;
	first = &claim->first->in;
	diff = ub_event_differences(&ev->in, first->meter, first->amount, first->occurred_at,
								first->properties, psprintf("event %d", claim->position + 1));
	if (diff != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("idempotency key \"%s\" was already used with different parameters",
						ev->in.idempotency_key),
				 errdetail("Events %d and %d of the batch use this key for customer \"%s\"; these differ: %s.",
						   claim->position + 1, ev->position + 1, ev->in.customer_id, diff),
				 errhint("Nothing of the batch was recorded.")));
	return false;
}

/* Error context of the per-event checks: which event of the batch. */
static void
batch_event_context(void *arg)
{
	int			position = *(int *) arg;

	errcontext("usage event %d (index %d) of the batch", position + 1, position);
}

/* SQL: increment_usage_batch(events jsonb) -> (accepted, duplicates) */
Datum
ub_increment_usage_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Jsonb	   *events;
	int			n;
	BatchEvent *batch;
	BatchEvent **bulk;
	int			nbulk = 0;
	int64		accepted = 0;
	int64		duplicates = 0;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	HTAB	   *seen_keys;
	ErrorContextCallback context;

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
	batch = palloc0(sizeof(BatchEvent) * Max(n, 1));
	bulk = palloc(sizeof(BatchEvent *) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		JsonbValue *elem = getIthJsonbValueFromContainer(&events->root, i);

		if (elem == NULL || elem->type != jbvBinary || !JsonContainerIsObject(elem->val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid usage event at position %d of the batch", i + 1),
					 errdetail("Event %d (index %d) is not a JSON object; every element of the batch must be one.",
							   i + 1, i)));
		parse_event(elem->val.binary.data, i, &batch[i].in);
		batch[i].position = i;
	}
	/*
	 * A key repeated inside the batch: the first occurrence in batch order is
	 * the event, the others are its duplicates (claims point into the sorted
	 * array).
	 */
	qsort(batch, n, sizeof(BatchEvent), batch_event_cmp);
	seen_keys = claim_keys(batch, n);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();

	/* every event is checked before anything is written */
	context.callback = batch_event_context;
	context.previous = error_context_stack;
	error_context_stack = &context;
	for (int i = 0; i < n; i++)
	{
		UbRecordResult dup;

		context.arg = &batch[i].position;
		if (!ub_prepare_event(&batch[i].in, &batch[i].pe, &dup))
			duplicates++;
		else if (first_use_of_key(seen_keys, &batch[i], n))
		{
			if (batch[i].pe.meter.aggregation == UB_AGG_UNIQUE_COUNT)
				batch[i].single = true;
			else
				bulk[nbulk++] = &batch[i];
		}
		else
			duplicates++;
	}
	error_context_stack = context.previous;

	if (nbulk > 0)
	{
		qsort(bulk, nbulk, sizeof(BatchEvent *), group_cmp);
		ub_batch_insert_ledger(bulk, nbulk);
		for (int i = 0; i < nbulk; i++)
		{
			if (bulk[i]->accepted)
				accepted++;
			else
				duplicates++;
		}
		write_aggregates(bulk, nbulk);
		/* a key recorded before: a duplicate only if the event repeats it (23505 otherwise) */
		context.previous = error_context_stack;
		error_context_stack = &context;
		for (int i = 0; i < nbulk; i++)
		{
			UbRecordResult dup;

			context.arg = &bulk[i]->position;
			if (!bulk[i]->accepted)
				(void) ub_lookup_duplicate_of(&bulk[i]->in, &dup);
		}
		error_context_stack = context.previous;
	}

	/* unique_count events one by one: each may or may not add a value */
	for (int i = 0; i < n; i++)
	{
		UbRecordResult out;

		if (!batch[i].single)
			continue;
		ub_record_event(&batch[i].in, &out);
		if (out.duplicate)
			duplicates++;
		else
			accepted++;
	}
	PopOverrideSearchPath();
	SPI_finish();

	values[0] = Int64GetDatum(accepted);
	values[1] = Int64GetDatum(duplicates);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	return (Datum) 0;
}
