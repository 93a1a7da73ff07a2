/*-------------------------------------------------------------------------
 * reservations.c
 *	  reserve_usage, commit_reservation, release_reservation: check and hold
 *	  in one step.
 *
 * Check-then-act (check_limit, then the expensive work, then
 * increment_usage) lets N concurrent callers all pass the check for the
 * last unit of a hard cap.  A reservation takes the unit at once instead:
 *
 *	 hold       a reservations row with status 'held' whose expires_at has
 *				not passed.  It counts against the hard cap of its key
 *				(customer, meter, period) from the moment reserve_usage
 *				returns: no call, batch or other reservation can take the room.
 *	 reserved   usage_aggregates.reserved: the sum of the key's held
 *				amounts, changed only under the aggregate row's lock.  A hold
 *				past expires_at is still in it until a decision that needs the
 *				room expires it (ub_reservations_expire): expired holds free
 *				themselves, no worker is needed.  The hard cap's point is
 *				included minus reserved, for refusals and for escrow budgets
 *				alike (escrow.c).
 *	 commit     records the reservation as usage, once: its event has the
 *				idempotency key 'reservation:<id>', the hold is released in the
 *				same transaction, and an amount above the hold is checked
 *				against the cap for the difference.  A repeated commit answers
 *				duplicate = true.
 *	 release    frees the hold without recording anything.
 *
 * reserve_usage takes the aggregate row's lock (creating the row, at 0, if
 * the period has none yet) and folds the key's escrow slots, so it decides
 * on the exact total, as a call near a limit does.
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
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "alerts.h"
#include "catalog.h"
#include "escrow.h"
#include "num.h"
#include "record.h"
#include "relations.h"
#include "holds.h"
#include "errors.h"
#include "citus.h"

PG_FUNCTION_INFO_V1(ub_reserve_usage);
PG_FUNCTION_INFO_V1(ub_commit_reservation);
PG_FUNCTION_INFO_V1(ub_release_reservation);

/* The longest hold: a reservation is for work in progress, not a standing allowance. */
#define UB_RESERVATION_MAX_TTL_USEC		((int64) 7 * USECS_PER_DAY)

/* A reservation row as commit and release read it. */
typedef struct Reservation
{
	char	   *customer_id;
	char	   *meter;
	TimestampTz period_start;
	Numeric		amount;
	TimestampTz expires_at;
	char	   *status;
	Numeric		committed_amount;	/* NULL unless committed */
	TimestampTz ended_at;
} Reservation;

/* Raises 22023 for an argument of a reservation function. */
static void
bad_argument(const char *msg, const char *detail, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("%s", msg),
			 detail ? errdetail("%s", detail) : 0,
			 hint ? errhint("%s", hint) : 0));
}

/* Reads a reservation, named name in messages, and locks it; P0002 when there is none. */
static void
lock_reservation(pg_uuid_t *id, const char *name, Reservation *r)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {UUIDOID};
	Datum		args[1];
	HeapTuple	t;
	TupleDesc	d;
	bool		isnull;

	args[0] = UUIDPGetDatum(id);
	if (ub_distributed())
	{
		/*
		 * Citus locks rows in one shard only: find the reservation's customer
		 * first (it never changes), then lock the row in its shard.
		 */
		static SPIPlanPtr find_plan = NULL;
		static SPIPlanPtr lock_plan = NULL;
		Oid			lock_types[2] = {UUIDOID, TEXTOID};
		Datum		lock_args[2];

		if (SPI_execute_plan(ub_prepare_once(&find_plan,
											 "SELECT customer_id FROM usage_billing.reservations"
											 " WHERE reservation_id = $1", 1, types),
							 args, NULL, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "reading a reservation failed");
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_NO_DATA_FOUND),
					 errmsg("reservation %s does not exist", name)));
		lock_args[0] = args[0];
		lock_args[1] = CStringGetTextDatum(ub_col_text(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 1));
		if (SPI_execute_plan(ub_prepare_once(&lock_plan,
											 "SELECT customer_id, meter, period_start, amount, expires_at, status,"
											 "       committed_amount, ended_at"
											 "  FROM usage_billing.reservations"
											 " WHERE reservation_id = $1 AND customer_id = $2 FOR UPDATE",
											 2, lock_types),
							 lock_args, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "reading a reservation failed");
	}
	else if (SPI_execute_plan(ub_prepare_once(&plan,
											  "SELECT customer_id, meter, period_start, amount, expires_at, status,"
											  "       committed_amount, ended_at"
											  "  FROM usage_billing.reservations WHERE reservation_id = $1 FOR UPDATE",
											  1, types),
							  args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading a reservation failed");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("reservation %s does not exist", name)));
	t = SPI_tuptable->vals[0];
	d = SPI_tuptable->tupdesc;
	r->customer_id = ub_col_text(t, d, 1);
	r->meter = ub_col_text(t, d, 2);
	r->period_start = DatumGetTimestampTz(SPI_getbinval(t, d, 3, &isnull));
	r->amount = DatumGetNumericCopy(SPI_getbinval(t, d, 4, &isnull));
	r->expires_at = DatumGetTimestampTz(SPI_getbinval(t, d, 5, &isnull));
	r->status = ub_col_text(t, d, 6);
	r->committed_amount = ub_col_numeric(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 7);
	r->ended_at = DatumGetTimestampTz(SPI_getbinval(t, d, 8, &isnull));
	if (isnull)
		r->ended_at = 0;
}

/*
 * Ends a reservation with a new status and, when it was still held (expired
 * or not, it is then still in reserved), takes its amount out of the key's
 * reserved.
 */
static void
end_hold(pg_uuid_t *id, const Reservation *r, const char *status, Numeric committed)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[7] = {UUIDOID, TEXTOID, NUMERICOID, TEXTOID, TEXTOID, TIMESTAMPTZOID,
	NUMERICOID};
	Datum		args[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			ret;

	args[0] = UUIDPGetDatum(id);
	args[1] = CStringGetTextDatum(status);
	args[2] = committed ? NumericGetDatum(committed) : (Datum) 0;
	nulls[2] = committed ? ' ' : 'n';
	args[3] = CStringGetTextDatum(r->customer_id);
	args[4] = CStringGetTextDatum(r->meter);
	args[5] = TimestampTzGetDatum(r->period_start);
	args[6] = NumericGetDatum(strcmp(r->status, "held") == 0 ? r->amount : ub_num_zero());
	ret = SPI_execute_plan(ub_prepare_once(&plan,
										   "WITH ended AS ("
										   "  UPDATE usage_billing.reservations"
										   "     SET status = $2, committed_amount = $3, ended_at = pg_catalog.now()"
										   "   WHERE reservation_id = $1 AND customer_id = $4"
										   "  RETURNING 1)"
										   " UPDATE usage_billing.usage_aggregates a"
										   "    SET reserved = a.reserved - $7"
										   "  WHERE a.customer_id = $4 AND a.meter = $5 AND a.period_start = $6"
										   "    AND EXISTS (SELECT FROM ended)",
										   7, types),
						   args, nulls, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "ending a hold failed: %s", SPI_result_code_string(ret));
}

/* SQL: reserve_usage(customer_id, meter, amount, ttl, idempotency_key) */
Datum
ub_reserve_usage(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr same_key_plan = NULL;
	static SPIPlanPtr hold_plan = NULL;
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext caller = CurrentMemoryContext;
	UbEventInput in;
	UbPreparedEvent pe;
	UbRecordResult dup;
	Interval   *ttl = PG_ARGISNULL(3) ? NULL : PG_GETARG_INTERVAL_P(3);
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	TimestampTz expires_at;
	Numeric		total;
	Numeric		held;
	Numeric		remaining = NULL;
	Datum		args[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	Oid			types[8] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, NUMERICOID,
	TIMESTAMPTZOID, TEXTOID, INTERVALOID};
	Datum		values[3];
	bool		vnulls[3] = {false, false, false};
	bool		isnull;
	bool		slotted;
	int			ret;

	InitMaterializedSRF(fcinfo, 0);
	PreventCommandIfReadOnly("reserve_usage()");

	memset(&in, 0, sizeof(in));
	in.customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	in.meter = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	in.amount = PG_ARGISNULL(2) ? NULL : PG_GETARG_NUMERIC(2);
	in.occurred_at = now;
	if (in.customer_id == NULL || in.meter == NULL)
		bad_argument("customer_id and meter must not be NULL", NULL, NULL);
	if (in.amount == NULL)
		bad_argument("amount must not be NULL",
					 "A reservation holds an amount of the meter's unit.", NULL);
	if (ttl == NULL || DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
															   TimestampTzGetDatum(now),
															   IntervalPGetDatum(ttl))) <= now)
		bad_argument("ttl must be a positive interval",
					 "A reservation frees itself when its ttl has passed.", NULL);
	expires_at = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
														 TimestampTzGetDatum(now),
														 IntervalPGetDatum(ttl)));
	if (expires_at - now > UB_RESERVATION_MAX_TTL_USEC)
		bad_argument("ttl is too long",
					 "A reservation may be held for at most 7 days.",
					 "Reserve for the work in progress and commit or release it when the work ends.");

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();

	/* the checks of increment_usage: customer, status, meter, amount */
	if (!ub_prepare_event(&in, &pe, &dup))
		elog(ERROR, "a reservation has no idempotency key to be a duplicate of");
	if (pe.meter.aggregation != UB_AGG_SUM && pe.meter.aggregation != UB_AGG_COUNT)
		bad_argument(psprintf("meter \"%s\" does not take reservations", in.meter),
					 "Only sum, count and duration meters add up what is reserved.", NULL);

	args[0] = CStringGetTextDatum(in.customer_id);
	args[1] = CStringGetTextDatum(in.meter);
	args[2] = TimestampTzGetDatum(pe.period_start);
	args[3] = TimestampTzGetDatum(pe.period_end);
	args[4] = NumericGetDatum(in.amount);
	args[5] = TimestampTzGetDatum(expires_at);
	args[6] = PG_ARGISNULL(4) ? (Datum) 0 : PointerGetDatum(PG_GETARG_TEXT_PP(4));
	nulls[6] = PG_ARGISNULL(4) ? 'n' : ' ';
	args[7] = IntervalPGetDatum(ttl);

	/* the same key again: the same reservation if it asks for the same, else a conflict */
	if (!PG_ARGISNULL(4))
	{
		ret = SPI_execute_plan(ub_prepare_once(&same_key_plan,
											   "SELECT reservation_id, expires_at, meter = $2 AND amount = $5"
											   "  FROM usage_billing.reservations"
											   " WHERE customer_id = $1 AND idempotency_key = $7",
											   8, types),
							   args, nulls, false, 1);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "reading a reservation failed");
		if (SPI_processed > 0)
		{
			HeapTuple	t = SPI_tuptable->vals[0];
			TupleDesc	d = SPI_tuptable->tupdesc;

			if (!DatumGetBool(SPI_getbinval(t, d, 3, &isnull)))
				ereport(ERROR,
						(errcode(ERRCODE_UNIQUE_VIOLATION),
						 errmsg("idempotency key \"%s\" was already used with different parameters",
								text_to_cstring(PG_GETARG_TEXT_PP(4))),
						 errdetail("Customer \"%s\" reserved with this key for another meter or amount.",
								   in.customer_id),
						 errhint("A retry must repeat the original call's parameters; a new reservation needs a new idempotency key.")));
			values[0] = SPI_getbinval(t, d, 1, &isnull);
			values[1] = SPI_getbinval(t, d, 2, &isnull);
			vnulls[2] = true;
			{
				MemoryContext spi = MemoryContextSwitchTo(caller);

				values[0] = datumCopy(values[0], false, UUID_LEN);
				tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, vnulls);
				MemoryContextSwitchTo(spi);
			}
			PopOverrideSearchPath();
			SPI_finish();
			return (Datum) 0;
		}
	}

	/* the aggregate row's lock, creating the row at 0 when the period has none */
	ret = SPI_execute_plan(ub_prepare_once(&lock_plan,
										   "INSERT INTO usage_billing.usage_aggregates AS a"
										   "       (customer_id, meter, period_start, period_end, total, event_count,"
										   "        updated_at)"
										   " VALUES ($1, $2, $3, $4, 0, 0, pg_catalog.now())"
										   " ON CONFLICT (customer_id, meter, period_start) DO UPDATE"
										   "    SET reserved = a.reserved"
										   " RETURNING a.total, a.slotted, a.reserved", 8, types),
						   args, nulls, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "locking the aggregate failed: %s", SPI_result_code_string(ret));
	total = ub_col_numeric(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	slotted = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	held = ub_col_numeric(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
	/* a hold is a decision at the cap: on the exact total */
	if (slotted)
		total = ub_num_add(total, ub_escrow_fold_locked(in.customer_id, in.meter, pe.period_start));

	if (pe.limit.exists && pe.limit.included != NULL)
	{
		if (pe.limit.hard_cap &&
			ub_num_cmp(ub_num_add(ub_num_add(total, held), in.amount), pe.limit.included) > 0 &&
			ub_num_cmp(held, ub_num_zero()) > 0)
			held = ub_num_sub(held, ub_reservations_expire(in.customer_id, in.meter, pe.period_start));
		if (pe.limit.hard_cap &&
			ub_num_cmp(ub_num_add(ub_num_add(total, held), in.amount), pe.limit.included) > 0)
		{
			ub_alerts_hard_cap_blocked(&pe.customer, &pe.meter, &pe.limit, pe.period_start,
									   ub_num_add(ub_num_add(total, held), in.amount));
			ereport(ERROR,
					(errcode(ERRCODE_UB_HARD_CAP),
					 errmsg("reserving %s of meter \"%s\" would exceed the limit of %s",
							ub_num_str(in.amount), in.meter, ub_num_str(pe.limit.included)),
					 errdetail("Customer \"%s\" has used %s and holds %s in reservations of %s in the billing period starting %s.",
							   in.customer_id, ub_num_str(total), ub_num_str(held),
							   ub_num_str(pe.limit.included), timestamptz_to_str(pe.period_start)),
					 errhint("Release reservations that are not needed, upgrade the plan or raise the limit.")));
		}
		remaining = ub_num_sub(pe.limit.included, ub_num_add(ub_num_add(total, held), in.amount));
		if (ub_num_cmp(remaining, ub_num_zero()) < 0)
			remaining = ub_num_zero();
	}

	ret = SPI_execute_plan(ub_prepare_once(&hold_plan,
										   "WITH hold AS ("
										   "  INSERT INTO usage_billing.reservations"
										   "         (customer_id, meter, period_start, amount, expires_at, idempotency_key)"
										   "  VALUES ($1, $2, $3, $5, $6, $7)"
										   "  RETURNING reservation_id, expires_at, amount),"
										   " counted AS ("
										   "  UPDATE usage_billing.usage_aggregates a SET reserved = a.reserved + h.amount"
										   "    FROM hold h"
										   "   WHERE a.customer_id = $1 AND a.meter = $2 AND a.period_start = $3)"
										   " SELECT reservation_id, expires_at FROM hold", 8, types),
						   args, nulls, false, 0);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "recording a reservation failed: %s", SPI_result_code_string(ret));

	{
		MemoryContext spi = MemoryContextSwitchTo(caller);

		values[0] = datumCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull),
							  false, UUID_LEN);
		values[1] = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		vnulls[2] = (remaining == NULL);
		values[2] = remaining ? datumCopy(NumericGetDatum(remaining), false, -1) : (Datum) 0;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, vnulls);
		MemoryContextSwitchTo(spi);
	}
	PopOverrideSearchPath();
	SPI_finish();
	return (Datum) 0;
}

/* SQL: commit_reservation(reservation_id, amount DEFAULT NULL), as increment_usage */
Datum
ub_commit_reservation(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext caller = CurrentMemoryContext;
	pg_uuid_t  *id;
	Reservation r;
	UbEventInput in;
	UbRecordResult out;
	char	   *key;

	InitMaterializedSRF(fcinfo, 0);
	PreventCommandIfReadOnly("commit_reservation()");
	if (PG_ARGISNULL(0))
		bad_argument("reservation_id must not be NULL", NULL, NULL);
	id = PG_GETARG_UUID_P(0);
	key = psprintf("reservation:%s",
				   DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(id))));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();
	lock_reservation(id, key + strlen("reservation:"), &r);
	if (strcmp(r.status, "released") == 0)
		bad_argument(psprintf("reservation %s was released", key + strlen("reservation:")),
					 "A released reservation records nothing.",
					 "Record the usage with increment_usage, or reserve again.");

	memset(&in, 0, sizeof(in));
	in.customer_id = r.customer_id;
	in.meter = r.meter;
	in.idempotency_key = key;
	if (strcmp(r.status, "committed") == 0)
	{
		/* the commit again: the same event, answered as a duplicate */
		in.amount = PG_ARGISNULL(1) ? r.committed_amount : PG_GETARG_NUMERIC(1);
		in.occurred_at = r.ended_at;
	}
	else
	{
		/* held or expired: free the hold, then record (a held amount may be exceeded by a cap check) */
		in.amount = PG_ARGISNULL(1) ? r.amount : PG_GETARG_NUMERIC(1);
		in.occurred_at = GetCurrentTransactionStartTimestamp();
		end_hold(id, &r, "committed", in.amount);
	}
	ub_record_event(&in, &out);
	ub_put_record_result(rsinfo, &out, caller);
	PopOverrideSearchPath();
	SPI_finish();
	return (Datum) 0;
}

/* SQL: release_reservation(reservation_id) */
Datum
ub_release_reservation(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *id;
	Reservation r;
	char	   *name;

	PreventCommandIfReadOnly("release_reservation()");
	if (PG_ARGISNULL(0))
		bad_argument("reservation_id must not be NULL", NULL, NULL);
	id = PG_GETARG_UUID_P(0);
	name = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(id)));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();
	lock_reservation(id, name, &r);
	if (strcmp(r.status, "committed") == 0)
		bad_argument(psprintf("reservation %s was committed", name),
					 "Its usage is recorded; a release cannot undo it.",
					 "Correct recorded usage with usage_billing.void_usage or adjust_usage.");
	if (strcmp(r.status, "held") == 0)
		end_hold(id, &r, "released", NULL);
	PopOverrideSearchPath();
	SPI_finish();
	PG_RETURN_VOID();
}
