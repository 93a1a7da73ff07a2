/*-------------------------------------------------------------------------
 * batch.c
 *	  increment_usage_batch: many usage events in one call, all or nothing.
 *
 * The batch is a JSON array of objects with the same fields, meaning and
 * defaults as the arguments of increment_usage, and every event passes the
 * same checks (ub_prepare_event).  Writing is done in bulk: the ledger rows
 * of the whole batch, then one aggregate update per (customer, meter,
 * period) "group" of the batch, each followed by the same hard-cap and alert
 * step as a single call (ub_finish_aggregate).  The writes go through
 * direct_write.c where it is usable, otherwise through one multi-row ledger
 * insert and one multi-row aggregate upsert per aggregation kind in SQL.  unique_count events, whose contribution depends on
 * the set of values already seen, take the single-event path.  Any error, a
 * hard cap included, aborts the statement and with it the whole batch.
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

#include "catalog/pg_type.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"

#include "direct_write.h"
#include "pricing.h"
#include "record.h"
#include "usage_billing.h"

PG_FUNCTION_INFO_V1(ub_increment_usage_batch);

/* An event of the batch with its position, for a stable sort. */
typedef struct BatchEvent
{
	UbEventInput in;
	int			position;
	UbPreparedEvent pe;
	bool		accepted;		/* written to the ledger by this batch */
	bool		single;			/* unique_count: recorded on the single-event path */
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

/* A one-dimensional array of n datums of the given type. */
static Datum
make_array(Datum *elems, bool *nulls, int n, Oid elmtype)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1];
	int			lbs[1] = {1};

	dims[0] = n;
	get_typlenbyvalalign(elmtype, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs,
											  elmtype, typlen, typbyval, typalign));
}

#define LEDGER_BULK \
	"INSERT INTO usage_billing.usage_events" \
	"       (customer_id, meter, period_start, occurred_at, amount," \
	"        idempotency_key, properties)" \
	" SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[]," \
	"                      $5::numeric[], $6::text[], $7::jsonb[])"

/*
 * Writes the ledger rows of the bulk events in one statement and marks the
 * events it accepted: keyless events always, keyed events when their key was
 * new (the first occurrence of a key repeated inside the batch).
 */
static void
insert_ledger(BatchEvent **events, int n)
{
	static SPIPlanPtr plans[2];
	static Oid	types[7] = {TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID,
	TIMESTAMPTZARRAYOID, NUMERICARRAYOID, TEXTARRAYOID, JSONBARRAYOID};
	Datum	   *cols[7];
	bool	   *colnulls[7];
	Datum		args[7];
	bool		keyed = false;
	int			ret;
	HTAB	   *inserted = NULL;

	for (int c = 0; c < 7; c++)
	{
		cols[c] = palloc(sizeof(Datum) * n);
		colnulls[c] = palloc0(sizeof(bool) * n);
	}
	for (int i = 0; i < n; i++)
	{
		const UbEventInput *in = &events[i]->in;

		cols[0][i] = CStringGetTextDatum(in->customer_id);
		cols[1][i] = CStringGetTextDatum(in->meter);
		cols[2][i] = TimestampTzGetDatum(events[i]->pe.period_start);
		cols[3][i] = TimestampTzGetDatum(in->occurred_at);
		cols[4][i] = NumericGetDatum(in->amount);
		colnulls[5][i] = (in->idempotency_key == NULL);
		cols[5][i] = in->idempotency_key ? CStringGetTextDatum(in->idempotency_key) : (Datum) 0;
		colnulls[6][i] = (in->properties == NULL);
		cols[6][i] = in->properties ? JsonbPGetDatum(in->properties) : (Datum) 0;
		keyed |= (in->idempotency_key != NULL);
	}
	args[0] = make_array(cols[0], colnulls[0], n, TEXTOID);
	args[1] = make_array(cols[1], colnulls[1], n, TEXTOID);
	args[2] = make_array(cols[2], colnulls[2], n, TIMESTAMPTZOID);
	args[3] = make_array(cols[3], colnulls[3], n, TIMESTAMPTZOID);
	args[4] = make_array(cols[4], colnulls[4], n, NUMERICOID);
	args[5] = make_array(cols[5], colnulls[5], n, TEXTOID);
	args[6] = make_array(cols[6], colnulls[6], n, JSONBOID);

	if (!keyed)
	{
		if (plans[0] == NULL)
		{
			plans[0] = SPI_prepare(LEDGER_BULK, 7, types);
			if (plans[0] == NULL || SPI_keepplan(plans[0]) != 0)
				elog(ERROR, "could not prepare the bulk ledger insert");
		}
		ret = SPI_execute_plan(plans[0], args, NULL, false, 0);
		if (ret != SPI_OK_INSERT || SPI_processed != (uint64) n)
			elog(ERROR, "bulk ledger insert failed: %s", SPI_result_code_string(ret));
		for (int i = 0; i < n; i++)
			events[i]->accepted = true;
		return;
	}

	if (plans[1] == NULL)
	{
		plans[1] = SPI_prepare(LEDGER_BULK
							   " ON CONFLICT (customer_id, idempotency_key)"
							   "   WHERE idempotency_key IS NOT NULL DO NOTHING"
							   " RETURNING customer_id, idempotency_key", 7, types);
		if (plans[1] == NULL || SPI_keepplan(plans[1]) != 0)
			elog(ERROR, "could not prepare the bulk ledger insert");
	}
	ret = SPI_execute_plan(plans[1], args, NULL, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "bulk ledger insert failed: %s", SPI_result_code_string(ret));

	/* the keys the insert took, as "customer_id NUL key" strings */
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = UB_MAX_NAME_LEN + UB_MAX_KEY_LEN + 2;
		ctl.entrysize = ctl.keysize;
		ctl.hcxt = CurrentMemoryContext;
		inserted = hash_create("usage_billing batch keys", Max(SPI_processed, 16), &ctl,
							   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		char		key[UB_MAX_NAME_LEN + UB_MAX_KEY_LEN + 2];
		char	   *cust = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1);
		char	   *ikey = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2);

		if (ikey == NULL)
			continue;
		memset(key, 0, sizeof(key));
		strlcpy(key, cust, UB_MAX_NAME_LEN + 1);
		strlcpy(key + UB_MAX_NAME_LEN + 1, ikey, UB_MAX_KEY_LEN + 1);
		hash_search(inserted, key, HASH_ENTER, NULL);
	}
	for (int i = 0; i < n; i++)
	{
		const UbEventInput *in = &events[i]->in;
		char		key[UB_MAX_NAME_LEN + UB_MAX_KEY_LEN + 2];
		bool		found;

		if (in->idempotency_key == NULL)
		{
			events[i]->accepted = true;
			continue;
		}
		memset(key, 0, sizeof(key));
		strlcpy(key, in->customer_id, UB_MAX_NAME_LEN + 1);
		strlcpy(key + UB_MAX_NAME_LEN + 1, in->idempotency_key, UB_MAX_KEY_LEN + 1);
		/* the first occurrence of a key claims the ledger row */
		hash_search(inserted, key, HASH_REMOVE, &found);
		events[i]->accepted = found;
	}
}

#define AGG_BULK(set) \
	"INSERT INTO usage_billing.usage_aggregates AS a" \
	"       (customer_id, meter, period_start, period_end, total, event_count," \
	"        first_usage, last_usage, updated_at)" \
	" SELECT c, m, ps, pe, t, n, f, l, now()" \
	"   FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[]," \
	"               $5::numeric[], $6::bigint[], $7::timestamptz[], $8::timestamptz[])" \
	"        AS u(c, m, ps, pe, t, n, f, l)" \
	" ON CONFLICT (customer_id, meter, period_start) DO UPDATE" \
	"    SET event_count = a.event_count + EXCLUDED.event_count," \
	"        previous_total = a.total," \
	"        first_usage = least(a.first_usage, EXCLUDED.first_usage)," \
	"        last_usage = greatest(a.last_usage, EXCLUDED.last_usage)," \
	"        updated_at = now()," set \
	" RETURNING a.total, a.previous_total"

/* One (customer, meter, period) of the batch with what it adds. */
typedef struct BatchGroup
{
	BatchEvent *first;
	Numeric		contribution;
	int64		count;
	TimestampTz first_usage;
	TimestampTz last_usage;
} BatchGroup;

/* Folds the groups of one aggregation kind in with the direct writer, checking caps and alerts. */
static void
fold_groups(UbDirectWriter *w, BatchGroup *groups, int n, UbAggregation agg)
{
	for (int g = 0; g < n; g++)
	{
		UbEventInput in = groups[g].first->in;
		UbAggregateDelta d;
		Numeric		total;
		Numeric		previous_total;

		d.customer_id = in.customer_id;
		d.meter = in.meter;
		d.period_start = groups[g].first->pe.period_start;
		d.period_end = groups[g].first->pe.period_end;
		d.aggregation = agg;
		d.contribution = groups[g].contribution;
		d.count = groups[g].count;
		d.first_usage = groups[g].first_usage;
		d.last_usage = groups[g].last_usage;
		ub_direct_fold(w, &d, &total, &previous_total);

		in.amount = groups[g].contribution;
		ub_finish_aggregate(&in, &groups[g].first->pe, previous_total, total,
							groups[g].contribution);
	}
}

/* Upserts the groups of one aggregation kind and checks caps and alerts. */
static void
upsert_groups(BatchGroup *groups, int n, UbAggregation agg)
{
	static SPIPlanPtr plans[3];
	static Oid	types[8] = {TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID,
	TIMESTAMPTZARRAYOID, NUMERICARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID,
	TIMESTAMPTZARRAYOID};
	int			slot = agg == UB_AGG_MAX ? 1 : agg == UB_AGG_LAST ? 2 : 0;
	Datum	   *cols[8];
	Datum		args[8];
	int			ret;

	if (n == 0)
		return;
	if (plans[slot] == NULL)
	{
		const char *sql = slot == 1 ? AGG_BULK(" total = greatest(a.total, EXCLUDED.total)") :
		slot == 2 ? AGG_BULK(" total = CASE WHEN EXCLUDED.last_usage >= a.last_usage"
							 "              THEN EXCLUDED.total ELSE a.total END") :
		AGG_BULK(" total = a.total + EXCLUDED.total");

		plans[slot] = SPI_prepare(sql, 8, types);
		if (plans[slot] == NULL || SPI_keepplan(plans[slot]) != 0)
			elog(ERROR, "could not prepare the bulk aggregate upsert");
	}

	for (int c = 0; c < 8; c++)
		cols[c] = palloc(sizeof(Datum) * n);
	for (int g = 0; g < n; g++)
	{
		cols[0][g] = CStringGetTextDatum(groups[g].first->in.customer_id);
		cols[1][g] = CStringGetTextDatum(groups[g].first->in.meter);
		cols[2][g] = TimestampTzGetDatum(groups[g].first->pe.period_start);
		cols[3][g] = TimestampTzGetDatum(groups[g].first->pe.period_end);
		cols[4][g] = NumericGetDatum(groups[g].contribution);
		cols[5][g] = Int64GetDatum(groups[g].count);
		cols[6][g] = TimestampTzGetDatum(groups[g].first_usage);
		cols[7][g] = TimestampTzGetDatum(groups[g].last_usage);
	}
	args[0] = make_array(cols[0], NULL, n, TEXTOID);
	args[1] = make_array(cols[1], NULL, n, TEXTOID);
	args[2] = make_array(cols[2], NULL, n, TIMESTAMPTZOID);
	args[3] = make_array(cols[3], NULL, n, TIMESTAMPTZOID);
	args[4] = make_array(cols[4], NULL, n, NUMERICOID);
	args[5] = make_array(cols[5], NULL, n, INT8OID);
	args[6] = make_array(cols[6], NULL, n, TIMESTAMPTZOID);
	args[7] = make_array(cols[7], NULL, n, TIMESTAMPTZOID);

	ret = SPI_execute_plan(plans[slot], args, NULL, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != (uint64) n)
		elog(ERROR, "bulk aggregate upsert failed: %s", SPI_result_code_string(ret));

	/* RETURNING yields the rows in the order of the unnest, i.e. of groups[] */
	{
		SPITupleTable *tt = SPI_tuptable;

		for (int g = 0; g < n; g++)
		{
			bool		isnull;
			Numeric		total = DatumGetNumericCopy(SPI_getbinval(tt->vals[g], tt->tupdesc, 1, &isnull));
			Datum		prev = SPI_getbinval(tt->vals[g], tt->tupdesc, 2, &isnull);
			UbEventInput in = groups[g].first->in;

			in.amount = groups[g].contribution;
			ub_finish_aggregate(&in, &groups[g].first->pe,
								isnull ? NULL : DatumGetNumericCopy(prev), total,
								groups[g].contribution);
		}
	}
}

/*
 * Folds the accepted bulk events, in group order, into groups per aggregation
 * kind, and writes them with the direct writer w or, when NULL, with SQL.
 */
static void
write_aggregates(BatchEvent **events, int n, UbDirectWriter *w)
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

		if (w != NULL)
			fold_groups(w, groups[k], ngroups[k], agg);
		else
			upsert_groups(groups[k], ngroups[k], agg);
	}
}

#define KEY_BYTES (UB_MAX_NAME_LEN + UB_MAX_KEY_LEN + 2)

/* Entry of the batch's key table: which position first used (customer, key). */
typedef struct KeyClaim
{
	char		key[KEY_BYTES];
	int			position;
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
		if (!found)
			claim->position = batch[i].position;
	}
	return claims;
}

/* Is this event the first of the batch to use its key (or keyless)? */
static bool
first_use_of_key(HTAB *claims, const BatchEvent *ev, int n)
{
	char		key[KEY_BYTES];
	KeyClaim   *claim;

	if (!claim_key(&ev->in, key))
		return true;
	claim = hash_search(claims, key, HASH_FIND, NULL);
	return claim == NULL || claim->position == ev->position;
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
					 errdetail("Every element of the batch must be a JSON object.")));
		parse_event(elem->val.binary.data, i, &batch[i].in);
		batch[i].position = i;
	}
	/*
	 * A key repeated inside the batch: the first occurrence in batch order is
	 * the event, the others are its duplicates.  Decide that before sorting.
	 */
	seen_keys = claim_keys(batch, n);
	qsort(batch, n, sizeof(BatchEvent), batch_event_cmp);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();

	/* every event is checked before anything is written */
	for (int i = 0; i < n; i++)
	{
		UbRecordResult dup;

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

	if (nbulk > 0)
	{
		UbDirectWriter *writer = ub_direct_writes_usable() ? ub_direct_open() : NULL;

		qsort(bulk, nbulk, sizeof(BatchEvent *), group_cmp);
		if (writer != NULL)
		{
			const UbEventInput **ins = palloc(sizeof(UbEventInput *) * nbulk);
			TimestampTz *starts = palloc(sizeof(TimestampTz) * nbulk);
			bool	   *taken = palloc(sizeof(bool) * nbulk);

			for (int i = 0; i < nbulk; i++)
			{
				ins[i] = &bulk[i]->in;
				starts[i] = bulk[i]->pe.period_start;
			}
			ub_direct_insert_events(writer, ins, starts, nbulk, taken);
			for (int i = 0; i < nbulk; i++)
				bulk[i]->accepted = taken[i];
		}
		else
			insert_ledger(bulk, nbulk);
		for (int i = 0; i < nbulk; i++)
		{
			if (bulk[i]->accepted)
				accepted++;
			else
				duplicates++;
		}
		write_aggregates(bulk, nbulk, writer);
		if (writer != NULL)
			ub_direct_close(writer);
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
