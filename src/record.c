/*-------------------------------------------------------------------------
 * record.c
 *	  increment_usage: record one usage event, atomically and idempotently.
 *
 * A call appends the event to the ledger (usage_events) and folds it into
 * the aggregate of its (customer, meter, period) in the same transaction,
 * so reads never scan the ledger.  The aggregate row is updated with
 * INSERT ... ON CONFLICT DO UPDATE: concurrent callers on the same row queue
 * on its row lock and each sees the committed total of the ones before it,
 * which makes the hard-cap check after the update exact at the boundary.
 * A call that would pass a hard cap raises PT402 after its writes, and the
 * error rolls them back: nothing is half-written.
 *
 * The writes go through direct_write.c (table and index access with the
 * same protocol) where that is equivalent, and through the SQL below
 * otherwise.  Before them, the event is checked and placed in its period by
 * ub_prepare_event (record_prepare.c); after them ub_finish_aggregate, here,
 * enforces the hard cap and hands the crossing to the alerts.
 *
 * Idempotency: the ledger has a unique index on (customer_id,
 * idempotency_key).  The event is inserted with ON CONFLICT DO NOTHING; a
 * conflict means the key was recorded before (or by a concurrent call that
 * committed first) and we return the state of the original event's meter and
 * period with duplicate = true (ub_lookup_duplicate), checking nothing else.
 * Because validation errors must not hide a duplicate, every error after the
 * customer lookup is "deferred": before raising it we look whether the key is
 * a duplicate (record_prepare.c).
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
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "alerts.h"
#include "catalog.h"
#include "direct_write.h"
#include "escrow.h"
#include "pricing.h"
#include "record.h"
#include "usage_billing.h"

PG_FUNCTION_INFO_V1(ub_increment_usage);

static void raise_hard_cap(const UbEventInput *in, const UbMeter *meter, const UbLimit *limit,
						   Numeric total, Numeric contribution, TimestampTz period_start);

/*
 * The statements of the hot path.  Parameters: $1 customer_id, $2 meter,
 * $3 period_start, $4 occurred_at, $5 amount, $6 idempotency_key,
 * $7 properties, $8 period_end, $9 the aggregate contribution (the amount;
 * 1 for count; 0 or 1 for unique_count; the unique value for its insert).
 */
#define LEDGER_INSERT \
	"INSERT INTO usage_billing.usage_events" \
	"       (customer_id, meter, period_start, occurred_at, amount," \
	"        idempotency_key, properties)" \
	" VALUES ($1, $2, $3, $4, $5, $6, $7)"
#define LEDGER_ON_CONFLICT \
	" ON CONFLICT (customer_id, idempotency_key)" \
	"   WHERE idempotency_key IS NOT NULL DO NOTHING"
#define AGG_INSERT \
	"INSERT INTO usage_billing.usage_aggregates AS a" \
	"       (customer_id, meter, period_start, period_end, total, event_count," \
	"        first_usage, last_usage, updated_at) "
#define AGG_ROW "$1, $2, $3, $8, $9, 1, $4, $4, now()"
#define AGG_ON_CONFLICT \
	" ON CONFLICT (customer_id, meter, period_start) DO UPDATE" \
	"    SET event_count = a.event_count + 1," \
	"        previous_total = a.total," \
	"        first_usage = least(a.first_usage, EXCLUDED.first_usage)," \
	"        last_usage = greatest(a.last_usage, EXCLUDED.last_usage)," \
	"        updated_at = now(),"
#define AGG_SET_ADD		" total = a.total + EXCLUDED.total"
#define AGG_SET_MAX		" total = greatest(a.total, EXCLUDED.total)"
/* the latest occurred_at wins; on a tie the later call does */
#define AGG_SET_LAST \
	" total = CASE WHEN EXCLUDED.last_usage >= a.last_usage" \
	"              THEN EXCLUDED.total ELSE a.total END"
#define AGG_RETURNING	" RETURNING a.total, a.previous_total"
/* from 1.3: does the row have escrow slots to fold? */
#define AGG_RETURNING_SLOTTED	AGG_RETURNING ", a.slotted"

#define COMBINED_RETURNING(ledger_tail, set, returning) \
	"WITH ev AS (" LEDGER_INSERT ledger_tail " RETURNING 1) " \
	AGG_INSERT "SELECT " AGG_ROW " FROM ev" AGG_ON_CONFLICT set returning
#define COMBINED(ledger_tail, set) COMBINED_RETURNING(ledger_tail, set, AGG_RETURNING)

static Oid	record_types[9] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	NUMERICOID, TEXTOID, JSONBOID, TIMESTAMPTZOID, NUMERICOID};

/* The ledger insert alone, with or without the idempotency arbiter. */
static SPIPlanPtr
ledger_plan(bool keyed)
{
	static SPIPlanPtr plans[2];

	if (keyed)
		return ub_prepare_once(&plans[1], LEDGER_INSERT LEDGER_ON_CONFLICT, 7, record_types);
	/* without a key there is nothing to conflict on: skip the arbiter check */
	return ub_prepare_once(&plans[0], LEDGER_INSERT, 7, record_types);
}

/* Adds a unique_count value to the period's set; inserts a row when it is new. */
static SPIPlanPtr
unique_plan(void)
{
	static SPIPlanPtr plan;
	static Oid	types[9] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	NUMERICOID, TEXTOID, JSONBOID, TIMESTAMPTZOID, TEXTOID};

	return ub_prepare_once(&plan,
						"INSERT INTO usage_billing.usage_unique_values"
						"       (customer_id, meter, period_start, value)"
						" VALUES ($1, $2, $3, $9) ON CONFLICT DO NOTHING", 9, types);
}

/* The aggregate upsert alone, additive (unique_count). */
static SPIPlanPtr
aggregate_plan(void)
{
	static SPIPlanPtr plan;

	return ub_prepare_once(&plan, AGG_INSERT "VALUES (" AGG_ROW ")" AGG_ON_CONFLICT AGG_SET_ADD AGG_RETURNING,
						9, record_types);
}

/*
 * Ledger insert and aggregate upsert in one statement.  For sum and count,
 * on a schema with escrow slots, it also returns whether the row has some.
 */
static SPIPlanPtr
combined_plan(UbAggregation agg, bool keyed)
{
	static SPIPlanPtr plans[3][2];
	static SPIPlanPtr slotted_plans[2];

	switch (agg)
	{
		case UB_AGG_MAX:
			return keyed ?
				ub_prepare_once(&plans[1][1], COMBINED(LEDGER_ON_CONFLICT, AGG_SET_MAX), 9, record_types) :
				ub_prepare_once(&plans[1][0], COMBINED("", AGG_SET_MAX), 9, record_types);
		case UB_AGG_LAST:
			return keyed ?
				ub_prepare_once(&plans[2][1], COMBINED(LEDGER_ON_CONFLICT, AGG_SET_LAST), 9, record_types) :
				ub_prepare_once(&plans[2][0], COMBINED("", AGG_SET_LAST), 9, record_types);
		default:
			if (ub_escrow_installed())
				return keyed ?
					ub_prepare_once(&slotted_plans[1],
									COMBINED_RETURNING(LEDGER_ON_CONFLICT, AGG_SET_ADD, AGG_RETURNING_SLOTTED),
									9, record_types) :
					ub_prepare_once(&slotted_plans[0],
									COMBINED_RETURNING("", AGG_SET_ADD, AGG_RETURNING_SLOTTED),
									9, record_types);
			return keyed ?
				ub_prepare_once(&plans[0][1], COMBINED(LEDGER_ON_CONFLICT, AGG_SET_ADD), 9, record_types) :
				ub_prepare_once(&plans[0][0], COMBINED("", AGG_SET_ADD), 9, record_types);
	}
}
/* Raises PT402: the message names the meter and the limit, the detail the usage. */
static void
raise_hard_cap(const UbEventInput *in, const UbMeter *meter, const UbLimit *limit,
			   Numeric total, Numeric contribution, TimestampTz period_start)
{
	bool		additive = (meter->aggregation != UB_AGG_MAX && meter->aggregation != UB_AGG_LAST);

	ereport(ERROR,
			(errcode(ERRCODE_UB_HARD_CAP),
			 errmsg("usage of meter \"%s\" would exceed the limit of %s",
					in->meter, ub_num_str(limit->included)),
			 additive ?
			 errdetail("Customer \"%s\" has used %s of %s in the billing period starting %s; this call adds %s.",
					   in->customer_id, ub_num_str(ub_num_sub(total, contribution)),
					   ub_num_str(limit->included), timestamptz_to_str(period_start),
					   ub_num_str(contribution)) :
			 errdetail("This call would set the value of customer \"%s\" to %s, above the limit of %s in the billing period starting %s.",
					   in->customer_id, ub_num_str(total), ub_num_str(limit->included),
					   timestamptz_to_str(period_start)),
			 errhint("Upgrade the plan or raise the limit to record more usage.")));
}

/*
 * After an aggregate took new usage: refuses it at a hard cap (PT402, which
 * rolls the writes back) or lets the alerts look at the crossing.
 */
void
ub_finish_aggregate(const UbEventInput *in, const UbPreparedEvent *pe,
					Numeric previous_total, Numeric total, Numeric contribution)
{
	const UbLimit *limit = &pe->limit;

	/* the row lock taken by the upsert serializes callers: this check is exact */
	if (limit->exists && limit->hard_cap && limit->included != NULL &&
		ub_num_cmp(total, limit->included) > 0)
	{
		ub_alerts_hard_cap_blocked(&pe->customer, &pe->meter, limit, pe->period_start, total);
		raise_hard_cap(in, &pe->meter, limit, total, contribution, pe->period_start);
	}

	/* thresholds are only crossed where there is an included quantity */
	if (limit->exists && limit->included != NULL)
		ub_alerts_after_record(&pe->customer, &pe->meter, limit, pe->period_start,
							   previous_total, total);
}

/* Records one event; see the file header for the protocol. */
void
ub_record_event(const UbEventInput *in, UbRecordResult *out)
{
	UbPreparedEvent pe;
	Numeric		contribution;
	Numeric		previous_total = NULL;
	Datum		previous;
	Datum		args[9];
	char		nulls[9];
	bool		isnull;
	int			ret;
	UbDirectWriter *writer;

	if (!ub_prepare_event(in, &pe, out))
		return;

	/*
	 * Ledger and aggregate in one statement where we can: the aggregate
	 * upsert reads the rows the ledger insert returned, so a duplicate key
	 * (no ledger row) leaves the aggregate alone and returns nothing.
	 * unique_count needs the ledger's verdict before it touches the set of
	 * distinct values, so it takes three statements.
	 */
	args[0] = CStringGetTextDatum(in->customer_id);
	args[1] = CStringGetTextDatum(in->meter);
	args[2] = TimestampTzGetDatum(pe.period_start);
	args[3] = TimestampTzGetDatum(in->occurred_at);
	args[4] = NumericGetDatum(in->amount);
	args[5] = in->idempotency_key ? CStringGetTextDatum(in->idempotency_key) : (Datum) 0;
	args[6] = in->properties ? JsonbPGetDatum(in->properties) : (Datum) 0;
	args[7] = TimestampTzGetDatum(pe.period_end);
	memset(nulls, ' ', sizeof(nulls));
	nulls[5] = in->idempotency_key ? ' ' : 'n';
	nulls[6] = in->properties ? ' ' : 'n';

	if (pe.meter.aggregation == UB_AGG_UNIQUE_COUNT)
	{
		ret = SPI_execute_plan(ledger_plan(in->idempotency_key != NULL), args, nulls, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "ledger insert failed: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
		{
			if (!ub_lookup_duplicate(in->customer_id, in->idempotency_key, out))
				elog(ERROR, "idempotency conflict without an original event");
			return;
		}
		args[8] = CStringGetTextDatum(pe.unique_value);
		ret = SPI_execute_plan(unique_plan(), args, nulls, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "unique value insert failed: %s", SPI_result_code_string(ret));
		contribution = ub_num_int(SPI_processed > 0 ? 1 : 0);
		args[8] = NumericGetDatum(contribution);
		ret = SPI_execute_plan(aggregate_plan(), args, nulls, false, 0);
	}
	else
	{
		contribution = pe.meter.aggregation == UB_AGG_COUNT ? ub_num_int(1) : in->amount;
		if (ub_direct_writes_usable() && (writer = ub_direct_open()) != NULL)
		{
			bool		recorded = ub_direct_insert_event(writer, in, pe.period_start);

			if (recorded)
			{
				UbAggregateDelta d;

				d.customer_id = in->customer_id;
				d.meter = in->meter;
				d.period_start = pe.period_start;
				d.period_end = pe.period_end;
				d.aggregation = pe.meter.aggregation;
				d.contribution = contribution;
				d.count = 1;
				d.first_usage = d.last_usage = in->occurred_at;
				d.limit = &pe.limit;
				ub_direct_fold(writer, &d, &out->total, &previous_total);
			}
			ub_direct_close(writer);
			if (recorded)
				goto recorded;
			if (!ub_lookup_duplicate(in->customer_id, in->idempotency_key, out))
				elog(ERROR, "idempotency conflict without an original event");
			return;
		}
		args[8] = NumericGetDatum(contribution);
		ret = SPI_execute_plan(combined_plan(pe.meter.aggregation, in->idempotency_key != NULL),
							   args, nulls, false, 0);
	}
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "aggregate update failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		/* the ledger insert conflicted: a duplicate key */
		if (!ub_lookup_duplicate(in->customer_id, in->idempotency_key, out))
			elog(ERROR, "idempotency conflict without an original event");
		return;
	}
	out->total = DatumGetNumericCopy(SPI_getbinval(SPI_tuptable->vals[0],
												   SPI_tuptable->tupdesc, 1, &isnull));
	previous = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	previous_total = isnull ? NULL : DatumGetNumericCopy(previous);
	if (previous_total != NULL && SPI_tuptable->tupdesc->natts >= 3 &&
		DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull)))
	{
		/* the upsert holds the row's lock: fold its escrow slots and decide on the exact total */
		Numeric		folded = ub_escrow_fold_key_sql(in->customer_id, in->meter, pe.period_start);

		out->total = ub_num_add(out->total, folded);
		previous_total = ub_num_add(previous_total, folded);
	}

recorded:
	ub_finish_aggregate(in, &pe, previous_total, out->total, contribution);

	out->duplicate = false;
	out->period_start = pe.period_start;
	out->period_end = pe.period_end;
	out->included = pe.limit.exists ? pe.limit.included : NULL;
	out->remaining = ub_remaining(&pe.limit, out->total);
	out->status = ub_usage_status(&pe.limit, out->total);
}

/*
 * Pins the search path of the SQL we run to pg_catalog alone.  The hot-path
 * functions are declared without SET search_path: a function SET saves and
 * restores the GUC machinery on every call, a measurable share of the call.
 * An override search path costs nearly nothing, keeps a caller's objects
 * from capturing our statements, and keeps the saved plans valid whatever
 * the caller's search_path is.  Errors pop it with the (sub)transaction.
 */
void
ub_push_safe_search_path(void)
{
	OverrideSearchPath path;

	memset(&path, 0, sizeof(path));
	path.schemas = NIL;
	path.addCatalog = true;
	path.addTemp = false;
	PushOverrideSearchPath(&path);
}

/* SQL: increment_usage(customer_id, meter, amount, idempotency_key, occurred_at, properties) */
Datum
ub_increment_usage(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	UbEventInput in;
	UbRecordResult out;
	Datum		values[7];
	bool		nulls[7];
	MemoryContext caller_cxt = CurrentMemoryContext;

	/* the planner's expected row type spares a catalog walk per call */
	InitMaterializedSRF(fcinfo, rsinfo->expectedDesc ? MAT_SRF_USE_EXPECTED_DESC : 0);

	memset(&in, 0, sizeof(in));
	in.customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	in.meter = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	in.amount = PG_ARGISNULL(2) ? NULL : PG_GETARG_NUMERIC(2);
	in.idempotency_key = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	in.occurred_at_null = PG_ARGISNULL(4);
	in.occurred_at = PG_ARGISNULL(4) ? 0 : PG_GETARG_TIMESTAMPTZ(4);
	in.properties = PG_ARGISNULL(5) ? NULL : PG_GETARG_JSONB_P(5);

	/* the same refusal as an INSERT's, but naming what the caller called */
	PreventCommandIfReadOnly("increment_usage()");

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();
	ub_record_event(&in, &out);
	PopOverrideSearchPath();

	/* the result outlives SPI: copy it out before SPI_finish */
	{
		MemoryContext spi_cxt = MemoryContextSwitchTo(caller_cxt);

		memset(nulls, 0, sizeof(nulls));
		values[0] = NumericGetDatum(DatumGetNumericCopy(NumericGetDatum(out.total)));
		nulls[1] = (out.included == NULL);
		values[1] = out.included ? NumericGetDatum(DatumGetNumericCopy(NumericGetDatum(out.included))) : (Datum) 0;
		nulls[2] = (out.remaining == NULL);
		values[2] = out.remaining ? NumericGetDatum(DatumGetNumericCopy(NumericGetDatum(out.remaining))) : (Datum) 0;
		values[3] = CStringGetTextDatum(out.status);
		values[4] = BoolGetDatum(out.duplicate);
		values[5] = TimestampTzGetDatum(out.period_start);
		values[6] = TimestampTzGetDatum(out.period_end);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		MemoryContextSwitchTo(spi_cxt);
	}
	SPI_finish();
	return (Datum) 0;
}
