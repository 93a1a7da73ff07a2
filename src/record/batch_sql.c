/*-------------------------------------------------------------------------
 * batch_sql.c
 *	  increment_usage_batch's bulk writes: the ledger rows and the
 *	  aggregates of a whole batch in a few statements.
 *
 * Two statements per batch, whatever its size: one multi-row ledger insert
 * (unnest of column arrays, ON CONFLICT DO NOTHING on the idempotency key
 * when any event has one) and, per aggregation kind, one multi-row
 * aggregate upsert of the batch's "groups" (see batch.c), whose RETURNING
 * feeds the same hard-cap and alert step as a single call.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "batch.h"
#include "escrow.h"
#include "num.h"
#include "holds.h"
#include "errors.h"

#define LEDGER_BULK \
	"INSERT INTO usage_billing.usage_events" \
	"       (customer_id, meter, period_start, occurred_at, amount," \
	"        idempotency_key, properties)" \
	" SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[]," \
	"                      $5::numeric[], $6::text[], $7::jsonb[])"

/* Orders events by customer, then idempotency key (keyless last): the ledger's insert order. */
static int
ledger_order_cmp(const void *a, const void *b)
{
	const UbEventInput *x = &(*(BatchEvent *const *) a)->in;
	const UbEventInput *y = &(*(BatchEvent *const *) b)->in;
	int			c = strcmp(x->customer_id, y->customer_id);

	if (c != 0)
		return c;
	if (x->idempotency_key == NULL || y->idempotency_key == NULL)
		return (x->idempotency_key == NULL) - (y->idempotency_key == NULL);
	return strcmp(x->idempotency_key, y->idempotency_key);
}

/*
 * Writes the ledger rows of the bulk events in one statement and marks the
 * events it accepted: keyless events always, keyed events when their key was
 * new (the first occurrence of a key repeated inside the batch).  The rows
 * go in (customer, key) order: two batches that share keys then wait for
 * each other's keys in the same order and never deadlock.
 */
void
ub_batch_insert_ledger(BatchEvent **events, int n)
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
	BatchEvent **ordered;

	for (int c = 0; c < 7; c++)
	{
		cols[c] = palloc(sizeof(Datum) * n);
		colnulls[c] = palloc0(sizeof(bool) * n);
	}
	ordered = palloc(sizeof(BatchEvent *) * n);
	memcpy(ordered, events, sizeof(BatchEvent *) * n);
	qsort(ordered, n, sizeof(BatchEvent *), ledger_order_cmp);
	for (int i = 0; i < n; i++)
	{
		const UbEventInput *in = &ordered[i]->in;

		cols[0][i] = CStringGetTextDatum(in->customer_id);
		cols[1][i] = CStringGetTextDatum(in->meter);
		cols[2][i] = TimestampTzGetDatum(ordered[i]->pe.period_start);
		cols[3][i] = TimestampTzGetDatum(in->occurred_at);
		cols[4][i] = NumericGetDatum(in->amount);
		colnulls[5][i] = (in->idempotency_key == NULL);
		cols[5][i] = in->idempotency_key ? CStringGetTextDatum(in->idempotency_key) : (Datum) 0;
		colnulls[6][i] = (in->properties == NULL);
		cols[6][i] = in->properties ? JsonbPGetDatum(in->properties) : (Datum) 0;
		keyed |= (in->idempotency_key != NULL);
	}
	args[0] = ub_array(cols[0], colnulls[0], n, TEXTOID);
	args[1] = ub_array(cols[1], colnulls[1], n, TEXTOID);
	args[2] = ub_array(cols[2], colnulls[2], n, TIMESTAMPTZOID);
	args[3] = ub_array(cols[3], colnulls[3], n, TIMESTAMPTZOID);
	args[4] = ub_array(cols[4], colnulls[4], n, NUMERICOID);
	args[5] = ub_array(cols[5], colnulls[5], n, TEXTOID);
	args[6] = ub_array(cols[6], colnulls[6], n, JSONBOID);

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

#define AGG_BULK_RETURNING(set, returning) \
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
	"        updated_at = EXCLUDED.updated_at," set returning
#define AGG_BULK(set) AGG_BULK_RETURNING(set, " RETURNING a.total, a.previous_total")

/* Upserts the groups of one aggregation kind and checks caps and alerts. */
void
ub_batch_upsert_groups(BatchGroup *groups, int n, UbAggregation agg)
{
	static SPIPlanPtr plans[5];
	static Oid	types[8] = {TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID,
	TIMESTAMPTZARRAYOID, NUMERICARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID,
	TIMESTAMPTZARRAYOID};
	/*
	 * 3: sum and count on a schema with escrow slots, which also returns
	 * a.slotted; 4: and with reservations, a.reserved
	 */
	int			slot = agg == UB_AGG_MAX ? 1 : agg == UB_AGG_LAST ? 2 :
		ub_reservations_installed() ? 4 : ub_escrow_installed() ? 3 : 0;
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
		slot == 3 ? AGG_BULK_RETURNING(" total = a.total + EXCLUDED.total",
									   " RETURNING a.total, a.previous_total, a.slotted") :
		slot == 4 ? AGG_BULK_RETURNING(" total = a.total + EXCLUDED.total",
									   " RETURNING a.total, a.previous_total, a.slotted, a.reserved") :
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
	args[0] = ub_array(cols[0], NULL, n, TEXTOID);
	args[1] = ub_array(cols[1], NULL, n, TEXTOID);
	args[2] = ub_array(cols[2], NULL, n, TIMESTAMPTZOID);
	args[3] = ub_array(cols[3], NULL, n, TIMESTAMPTZOID);
	args[4] = ub_array(cols[4], NULL, n, NUMERICOID);
	args[5] = ub_array(cols[5], NULL, n, INT8OID);
	args[6] = ub_array(cols[6], NULL, n, TIMESTAMPTZOID);
	args[7] = ub_array(cols[7], NULL, n, TIMESTAMPTZOID);

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
			Numeric		previous = isnull ? NULL : DatumGetNumericCopy(prev);
			UbEventInput in = groups[g].first->in;

			if (tt->tupdesc->natts >= 4)
			{
				Datum		reserved = SPI_getbinval(tt->vals[g], tt->tupdesc, 4, &isnull);

				if (!isnull && ub_num_cmp(DatumGetNumeric(reserved), ub_num_zero()) != 0)
					groups[g].first->pe.limit.reserved = DatumGetNumericCopy(reserved);
			}
			/* under the row's lock: fold the key's escrow slots if a decision may be near */
			ub_settle_aggregate(&in, &groups[g].first->pe,
								tt->tupdesc->natts >= 3 &&
								DatumGetBool(SPI_getbinval(tt->vals[g], tt->tupdesc, 3, &isnull)),
								&total, &previous);
			in.amount = groups[g].contribution;
			ub_finish_aggregate(&in, &groups[g].first->pe, previous, total,
								groups[g].contribution);
		}
	}
}
