/*-------------------------------------------------------------------------
 * record.c
 *	  increment_usage: record one usage event, atomically and idempotently.
 *
 * A call appends the event to the ledger (usage_events) and adds it to
 * the aggregate of its (customer, meter, period) in the same transaction,
 * so reads never scan the ledger.  The aggregate row is updated with
 * INSERT ... ON CONFLICT DO UPDATE: concurrent callers on the same row queue
 * on its row lock and each sees the committed total of the ones before it,
 * which makes the hard-cap check after the update exact at the boundary.
 * A call that would pass a hard cap raises PT402 after its writes, and the
 * error rolls them back: nothing is half-written.
 *
 * Every write is a statement of the executor (SPI with saved plans), so
 * whatever a DBA adds to the tables -- triggers, generated columns,
 * constraints, indexes, replica identity, publications, row-level
 * security -- behaves as with plain SQL.  Before them, the event is checked
 * and placed in its period by ub_prepare_event (record_prepare.c); after
 * them ub_finish_aggregate, here, enforces the hard cap and hands the
 * crossing to the alerts.
 *
 * A contended sum or count key also has escrow slots (escrow.c has the
 * rules, escrow_store.c the other statements).  A call whose backend holds
 * a slot of the key first reads the key's row and slots (index scans, no
 * executor: escrow_store.c); when the slot may be spent under the limit in
 * force and its budget covers the call, one statement appends the event
 * and adds it to the slot, leaving the aggregate row alone ("spend").
 * Otherwise the call takes the row ("row path"): the upsert locks it, and
 * under that lock the key's slots are folded when a decision may be near,
 * and this backend's slot may get a budget.
 *
 * Idempotency: the ledger has a unique index on (customer_id,
 * idempotency_key).  The event is inserted with ON CONFLICT DO NOTHING; a
 * conflict means the key was recorded before (or by a concurrent call that
 * committed first) and we return the state of the original event's meter and
 * period with duplicate = true (ub_lookup_duplicate_of), after checking that
 * the call repeats the original (23505 when it does not: record_prepare.c).
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
#include "storage/backendid.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "alerts.h"
#include "catalog.h"
#include "escrow.h"
#include "pricing.h"
#include "record.h"
#include "holds.h"
#include "errors.h"
#include "citus.h"

PG_FUNCTION_INFO_V1(ub_increment_usage);

static void raise_hard_cap(const UbEventInput *in, const UbMeter *meter, const UbLimit *limit,
						   Numeric total, Numeric contribution, Numeric held,
						   TimestampTz period_start);

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
	"        updated_at = EXCLUDED.updated_at,"
#define AGG_SET_ADD		" total = a.total + EXCLUDED.total"
#define AGG_SET_MAX		" total = greatest(a.total, EXCLUDED.total)"
/* the latest occurred_at wins; on a tie the later call does */
#define AGG_SET_LAST \
	" total = CASE WHEN EXCLUDED.last_usage >= a.last_usage" \
	"              THEN EXCLUDED.total ELSE a.total END"
#define AGG_RETURNING	" RETURNING a.total, a.previous_total"
/* from 1.3: does the row have escrow slots to fold? */
#define AGG_RETURNING_SLOTTED	AGG_RETURNING ", a.slotted"
/* from 1.4: and what do its holds take from the hard cap? */
#define AGG_RETURNING_RESERVED	AGG_RETURNING_SLOTTED ", a.reserved"

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
		return ub_prepare_routable(&plans[1], LEDGER_INSERT LEDGER_ON_CONFLICT, 7, record_types);
	/* without a key there is nothing to conflict on: skip the arbiter check */
	return ub_prepare_routable(&plans[0], LEDGER_INSERT, 7, record_types);
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

/*
 * The aggregate upsert alone, additive: unique_count, and a sum or count
 * event whose ledger row the spend statement already wrote.  On a schema
 * with escrow slots it also returns whether the row has some.
 */
static SPIPlanPtr
aggregate_plan(void)
{
	static SPIPlanPtr plans[3];

	if (ub_reservations_installed())
		return ub_prepare_routable(&plans[2], AGG_INSERT "VALUES (" AGG_ROW ")" AGG_ON_CONFLICT
								   AGG_SET_ADD AGG_RETURNING_RESERVED, 9, record_types);
	if (ub_escrow_installed())
		return ub_prepare_routable(&plans[1], AGG_INSERT "VALUES (" AGG_ROW ")" AGG_ON_CONFLICT
								   AGG_SET_ADD AGG_RETURNING_SLOTTED, 9, record_types);
	return ub_prepare_routable(&plans[0], AGG_INSERT "VALUES (" AGG_ROW ")" AGG_ON_CONFLICT
							   AGG_SET_ADD AGG_RETURNING, 9, record_types);
}

/*
 * The spend's write, in one statement: the ledger insert (ev) and the
 * addition to this backend's slot (up), if the ledger took the event and
 * the slot's budget still covers it.  Returns (events the ledger took, the
 * slot's new total or NULL).  $10 is the slot (the backend id).  Whether
 * the slot may be spent at all was read before (ub_escrow_read).
 */
#define SLOT_SPEND(ledger_tail) \
	"WITH ev AS (" LEDGER_INSERT ledger_tail " RETURNING 1)," \
	" up AS (UPDATE usage_billing.usage_aggregate_slots s" \
	"           SET total = s.total + $9, event_count = s.event_count + 1," \
	"               budget = s.budget - $9," \
	"               first_usage = least(s.first_usage, $4)," \
	"               last_usage = greatest(s.last_usage, $4)," \
	"               updated_at = now()" \
	"         WHERE s.customer_id = $1 AND s.meter = $2 AND s.period_start = $3" \
	"           AND s.slot = $10 AND (s.budget IS NULL OR s.budget >= $9)" \
	"           AND EXISTS (SELECT FROM ev)" \
	"        RETURNING s.total)" \
	" SELECT (SELECT count(*) FROM ev), (SELECT total FROM up)"

static SPIPlanPtr
spend_plan(bool keyed)
{
	static SPIPlanPtr plans[2];
	static Oid	types[10] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	NUMERICOID, TEXTOID, JSONBOID, TIMESTAMPTZOID, NUMERICOID, INT4OID};

	if (keyed)
		return ub_prepare_once(&plans[1], SLOT_SPEND(LEDGER_ON_CONFLICT), 10, types);
	return ub_prepare_once(&plans[0], SLOT_SPEND(""), 10, types);
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
	static SPIPlanPtr reserved_plans[2];

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
			if (ub_reservations_installed())
				return keyed ?
					ub_prepare_once(&reserved_plans[1],
									COMBINED_RETURNING(LEDGER_ON_CONFLICT, AGG_SET_ADD, AGG_RETURNING_RESERVED),
									9, record_types) :
					ub_prepare_once(&reserved_plans[0],
									COMBINED_RETURNING("", AGG_SET_ADD, AGG_RETURNING_RESERVED),
									9, record_types);
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
			   Numeric total, Numeric contribution, Numeric held, TimestampTz period_start)
{
	bool		additive = (meter->aggregation != UB_AGG_MAX && meter->aggregation != UB_AGG_LAST);

	ereport(ERROR,
			(errcode(ERRCODE_UB_HARD_CAP),
			 errmsg("usage of meter \"%s\" would exceed the limit of %s",
					in->meter, ub_num_str(limit->included)),
			 ub_num_cmp(held, ub_num_zero()) > 0 ?
			 errdetail("Customer \"%s\" has used %s and holds %s in reservations of %s in the billing period starting %s; this call adds %s.",
					   in->customer_id, ub_num_str(ub_num_sub(total, contribution)), ub_num_str(held),
					   ub_num_str(limit->included), timestamptz_to_str(period_start),
					   ub_num_str(contribution)) :
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
	if (limit->exists && limit->hard_cap && limit->included != NULL)
	{
		Numeric		held = limit->reserved ? limit->reserved : ub_num_zero();

		/* holds take their room from the cap; expired ones give it back when it is needed */
		if (ub_num_cmp(ub_num_add(total, held), limit->included) > 0 &&
			ub_num_cmp(held, ub_num_zero()) > 0)
			held = ub_num_sub(held, ub_reservations_expire(in->customer_id, in->meter,
														   pe->period_start));
		if (ub_num_cmp(ub_num_add(total, held), limit->included) > 0)
		{
			ub_alerts_hard_cap_blocked(&pe->customer, &pe->meter, limit, pe->period_start, total);
			raise_hard_cap(in, &pe->meter, limit, total, contribution, held, pe->period_start);
		}
	}

	/* thresholds are only crossed where there is an included quantity */
	if (limit->exists && limit->included != NULL)
		ub_alerts_after_record(&pe->customer, &pe->meter, limit, pe->period_start,
							   previous_total, total);
}

/* May this aggregation take usage through escrow slots on this schema now? */
static bool
escrow_eligible(UbAggregation agg)
{
	return (agg == UB_AGG_SUM || agg == UB_AGG_COUNT) &&
		ub_hot_key_slots != UB_SLOTS_OFF && ub_escrow_installed() && !ub_distributed();
}

/* What came of trying to record an event through this backend's slot. */
typedef enum SpendOutcome
{
	SPEND_DONE,					/* recorded: ledger row and slot */
	SPEND_DUPLICATE,			/* the key was recorded before: nothing written */
	SPEND_LEDGER_ONLY,			/* ledger row written, the slot was gone: take the row */
	SPEND_NONE					/* nothing written: take the row */
} SpendOutcome;

/*
 * The spend: records a sum or count event in this backend's escrow slot of
 * the key when the slot may be spent under the limit in force (the key's
 * combined budget, read without the executor) and its budget covers the
 * contribution (args[8]).  On SPEND_DONE *total is the key's total as this
 * call leaves it: the committed row and other slots, and ours.
 */
static SpendOutcome
try_spend(const UbEventInput *in, const UbPreparedEvent *pe, const Datum *args,
		  const char *nulls, uint64 key, Numeric *total)
{
	Numeric		contribution = DatumGetNumeric(args[8]);
	UbEscrowProbe p;
	UbLimit		limit = pe->limit;
	Datum		spend_args[10];
	char		spend_nulls[10];
	bool		isnull;
	Datum		slot_total;
	int			ret;

	if (!ub_escrow_read(in->customer_id, in->meter, pe->period_start, &p) || !p.own_found)
	{
		ub_escrow_remember(key, false);
		return SPEND_NONE;
	}
	if (p.own_budget != NULL && ub_num_cmp(contribution, p.own_budget) > 0)
		return SPEND_NONE;
	/* holds take their room from the hard cap (reservations.c) */
	if (ub_num_cmp(p.reserved, ub_num_zero()) != 0)
		limit.reserved = p.reserved;
	if (!ub_escrow_spendable(&limit, &p))
		return SPEND_NONE;

	memcpy(spend_args, args, sizeof(Datum) * 9);
	memcpy(spend_nulls, nulls, 9);
	spend_args[9] = Int32GetDatum(MyBackendId);
	spend_nulls[9] = ' ';
	ret = SPI_execute_plan(spend_plan(in->idempotency_key != NULL), spend_args, spend_nulls,
						   false, 0);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "escrow spend failed: %s", SPI_result_code_string(ret));
	if (DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) == 0)
		return SPEND_DUPLICATE;
	slot_total = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	if (isnull)
	{
		/* a writer folded the key since the read */
		ub_escrow_remember(key, false);
		return SPEND_LEDGER_ONLY;
	}
	*total = ub_num_add(ub_num_add(p.row_total, p.others_total), DatumGetNumeric(slot_total));
	return SPEND_DONE;
}

/*
 * On the row path, after an upsert took the aggregate row's lock and
 * returned the row's total (*total) and the one before (*previous_total,
 * NULL for a new row): folds the key's escrow slots when a decision may be
 * near (the totals then become exact), and gives this backend's slot a
 * budget when it wants one.  When the slots stay, no point is within reach:
 * *total becomes the key's total and *previous_total the same, as nothing
 * was crossed.  For single calls and a batch's groups alike.
 */
void
ub_settle_aggregate(const UbEventInput *in, const UbPreparedEvent *pe, bool slotted,
					Numeric *total, Numeric *previous_total)
{
	bool		escrow = escrow_eligible(pe->meter.aggregation);
	uint64		key = escrow ? ub_escrow_key_hash(in->customer_id, in->meter, pe->period_start) : 0;
	bool		want_slot = escrow &&
		(ub_hot_key_slots == UB_SLOTS_ALWAYS || ub_escrow_has_slot(key) || ub_escrow_is_hot(key));
	UbEscrowProbe p;
	bool		kept = false;
	Numeric		escrowed = ub_num_zero();
	Numeric		budget;
	Numeric		budget_limit;

	/* a new row has no slots, and a row that has none needs nothing unless we want one */
	if (*previous_total == NULL || (!slotted && !want_slot))
		return;
	if (slotted)
	{
		/* under the row's lock the read is exact: slots change only under it, or by spending */
		(void) ub_escrow_read(in->customer_id, in->meter, pe->period_start, &p);
		kept = escrow &&
			!ub_escrow_near(&pe->limit, *previous_total,
							p.escrowed == NULL ? NULL : ub_num_add(p.row_total, p.escrowed));
		if (!kept)
		{
			/* a decision may be near: fold, and decide on the exact total */
			Numeric		folded = ub_escrow_fold_locked(in->customer_id, in->meter,
													   pe->period_start);

			*total = ub_num_add(*total, folded);
			*previous_total = ub_num_add(*previous_total, folded);
			ub_escrow_remember(key, false);
		}
		else
			escrowed = p.escrowed;
	}
	if (want_slot &&
		ub_escrow_grant(&pe->limit, *total,
						escrowed == NULL ? NULL : ub_num_add(*total, escrowed),
						&budget, &budget_limit))
	{
		ub_escrow_give(in->customer_id, in->meter, pe->period_start, *total, budget,
					   budget_limit);
		ub_escrow_remember(key, true);
	}
	if (kept)
	{
		*total = ub_num_add(*total, p.slots_total);
		*previous_total = *total;
	}
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
	bool		escrow = false;
	uint64		key = 0;
	int			ret;

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
			if (!ub_lookup_duplicate_of(in, out))
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
		TimestampTz started;

		contribution = pe.meter.aggregation == UB_AGG_COUNT ? ub_num_int(1) : in->amount;
		args[8] = NumericGetDatum(contribution);
		if (ub_distributed() &&
			(pe.meter.aggregation == UB_AGG_SUM || pe.meter.aggregation == UB_AGG_COUNT))
		{
			/*
			 * Citus runs the combined statement as an INSERT ... SELECT
			 * through an intermediate result; two single-row statements
			 * route straight to the shard at a fraction of the cost.
			 */
			ret = SPI_execute_plan(ledger_plan(in->idempotency_key != NULL), args, nulls, false, 0);
			if (ret != SPI_OK_INSERT)
				elog(ERROR, "ledger insert failed: %s", SPI_result_code_string(ret));
			if (SPI_processed == 0)
			{
				if (!ub_lookup_duplicate_of(in, out))
					elog(ERROR, "idempotency conflict without an original event");
				return;
			}
			ret = SPI_execute_plan(aggregate_plan(), args, nulls, false, 0);
			goto row_written;
		}
		escrow = escrow_eligible(pe.meter.aggregation);
		if (escrow)
			key = ub_escrow_key_hash(in->customer_id, in->meter, pe.period_start);
		if (escrow && ub_escrow_has_slot(key))
		{
			switch (try_spend(in, &pe, args, nulls, key, &out->total))
			{
				case SPEND_DONE:
					/* no point was within reach: nothing to decide or alert */
					goto recorded;
				case SPEND_DUPLICATE:
					if (!ub_lookup_duplicate_of(in, out))
						elog(ERROR, "idempotency conflict without an original event");
					return;
				case SPEND_LEDGER_ONLY:
					started = GetCurrentTimestamp();
					ret = SPI_execute_plan(aggregate_plan(), args, nulls, false, 0);
					if (GetCurrentTimestamp() - started >= UB_ESCROW_WAIT_USEC)
						ub_escrow_note_contention(key);
					goto row_written;
				case SPEND_NONE:
					break;
			}
		}
		/* a row path that waited for the row's lock counts towards a slot */
		started = escrow ? GetCurrentTimestamp() : 0;
		ret = SPI_execute_plan(combined_plan(pe.meter.aggregation, in->idempotency_key != NULL),
							   args, nulls, false, 0);
		if (escrow && GetCurrentTimestamp() - started >= UB_ESCROW_WAIT_USEC)
			ub_escrow_note_contention(key);
	}
row_written:
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "aggregate update failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		/* the ledger insert conflicted: a duplicate key */
		if (!ub_lookup_duplicate_of(in, out))
			elog(ERROR, "idempotency conflict without an original event");
		return;
	}
	out->total = DatumGetNumericCopy(SPI_getbinval(SPI_tuptable->vals[0],
												   SPI_tuptable->tupdesc, 1, &isnull));
	previous = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	previous_total = isnull ? NULL : DatumGetNumericCopy(previous);
	if (SPI_tuptable->tupdesc->natts >= 4)
	{
		Datum		reserved = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4, &isnull);

		if (!isnull && ub_num_cmp(DatumGetNumeric(reserved), ub_num_zero()) != 0)
			pe.limit.reserved = DatumGetNumericCopy(reserved);
	}
	ub_settle_aggregate(in, &pe,
						SPI_tuptable->tupdesc->natts >= 3 &&
						DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3,
												   &isnull)),
						&out->total, &previous_total);
	ub_finish_aggregate(in, &pe, previous_total, out->total, contribution);

recorded:
	out->duplicate = false;
	out->period_start = pe.period_start;
	out->period_end = pe.period_end;
	out->included = pe.limit.exists ? pe.limit.included : NULL;
	out->remaining = ub_remaining(&pe.limit, out->total);
	out->status = ub_usage_status(&pe.limit, out->total);
}

/*
 * Puts what increment_usage returns into the caller's result set, copied
 * into caller_cxt (the result outlives SPI).  For every function that
 * answers as increment_usage does.
 */
void
ub_put_record_result(ReturnSetInfo *rsinfo, const UbRecordResult *out, MemoryContext caller_cxt)
{
	MemoryContext prev = MemoryContextSwitchTo(caller_cxt);
	Datum		values[7];
	bool		nulls[7];

	memset(nulls, 0, sizeof(nulls));
	values[0] = NumericGetDatum(DatumGetNumericCopy(NumericGetDatum(out->total)));
	nulls[1] = (out->included == NULL);
	values[1] = out->included ? NumericGetDatum(DatumGetNumericCopy(NumericGetDatum(out->included))) : (Datum) 0;
	nulls[2] = (out->remaining == NULL);
	values[2] = out->remaining ? NumericGetDatum(DatumGetNumericCopy(NumericGetDatum(out->remaining))) : (Datum) 0;
	values[3] = CStringGetTextDatum(out->status);
	values[4] = BoolGetDatum(out->duplicate);
	values[5] = TimestampTzGetDatum(out->period_start);
	values[6] = TimestampTzGetDatum(out->period_end);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	MemoryContextSwitchTo(prev);
}

/* SQL: increment_usage(customer_id, meter, amount, idempotency_key, occurred_at, properties) */
Datum
ub_increment_usage(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	UbEventInput in;
	UbRecordResult out;
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
	ub_put_record_result(rsinfo, &out, caller_cxt);
	SPI_finish();
	return (Datum) 0;
}
