/*-------------------------------------------------------------------------
 * export_outbox.c
 *	  The export worker's database side: planning, fetching and recording
 *	  outbox rows through SPI.
 *
 * Vocabulary (see the export section of usage_billing--1.0.sql)
 *   plan      transaction 1: usage_billing.export_plan() writes the outbox
 *             rows that bring Stripe to floor(total), and commits them
 *             before anything is sent
 *   batch     due pending rows, at most one per (customer, meter), copied
 *             into the caller's memory context so that no transaction stays
 *             open while they are sent
 *   record    transaction 2: one usage_billing.export_record() call per batch
 *
 * Every function here expects to run inside a transaction with an active
 * snapshot, and connects to SPI itself.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "catalog/namespace.h"
#include "utils/lsyscache.h"
#include "executor/spi.h"
#include "utils/builtins.h"

#include "catalog.h"
#include "export_worker.h"
#include "relations.h"

static SPIPlanPtr fetch_plan = NULL;
static SPIPlanPtr fetch_plan_accounts = NULL;
static SPIPlanPtr record_plan = NULL;

/* Raises an error for an SPI failure; these are can't-happen cases. */
static void
ub_spi_check(int rc, int expected, const char *what)
{
	if (rc != expected)
		elog(ERROR, "SPI failed while %s: %s", what, SPI_result_code_string(rc));
}

/* True when usage_billing is installed in the database we are connected to. */
bool
ub_outbox_extension_installed(void)
{
	return OidIsValid(get_extension_oid("usage_billing", true));
}

/*
 * True when export_outbox has the column stripe_account (Stripe Connect,
 * extension 1.5): a database still at an older version has none.
 */
bool
ub_outbox_has_accounts(void)
{
	Oid			rel = ub_schema_relation("export_outbox");

	return OidIsValid(rel) && get_attnum(rel, "stripe_account") != InvalidAttrNumber;
}

/* Transaction 1: writes what is to be sent; returns the number of new outbox rows. */
int
ub_outbox_plan(int max_rows)
{
	Oid			argtypes[1] = {INT4OID};
	Datum		values[1];
	bool		isnull;
	int			n;

	values[0] = Int32GetDatum(max_rows);
	SPI_connect();
	ub_spi_check(SPI_execute_with_args("SELECT usage_billing.export_plan($1)",
									   1, argtypes, values, NULL, false, 1),
				 SPI_OK_SELECT, "planning exports");
	n = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return isnull ? 0 : n;
}

/* Copies column col of the current row as a string into cxt ("" for NULL). */
static char *
ub_copy_text(HeapTuple tup, TupleDesc desc, int col, MemoryContext cxt)
{
	char	   *v = SPI_getvalue(tup, desc, col);

	return MemoryContextStrdup(cxt, v ? v : "");
}

/*
 * Fetches up to limit due pending rows into cxt, the earliest pending row of
 * each (customer, meter) only: never two requests for one customer and meter.
 *
 * A row is due when its retry time has come and its timestamp is not ahead
 * of the clock.  The planner gives each new event of a max, last or
 * unique_count meter a timestamp after the previous one's (Stripe keeps the
 * latest by timestamp), which is up to a second ahead when the value changes
 * within a second; such a row waits here until the clock reaches its
 * timestamp.  Since the next event is planned only once this one is sent,
 * timestamps then never run ahead: no event leaves ahead of the clock, and
 * none drifts towards Stripe's 5-minute limit.
 */
UbMeterEvent *
ub_outbox_fetch(int limit, MemoryContext cxt, int *n)
{
	Oid			argtypes[1] = {INT4OID};
	Datum		values[1];
	UbMeterEvent *events;
	uint64		i;

	bool		accounts = ub_outbox_has_accounts();
	SPIPlanPtr *plan = accounts ? &fetch_plan_accounts : &fetch_plan;

	SPI_connect();
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(psprintf(
								"SELECT outbox_id, identifier, idempotency_key, event_name, "
								"       stripe_customer_id, value::text, event_ts, attempts, %s "
								"  FROM (SELECT DISTINCT ON (customer_id, meter) * "
								"          FROM usage_billing.export_outbox "
								"         WHERE status = 'pending' "
								"         ORDER BY customer_id, meter, period_start, seq) o "
								" WHERE next_attempt_at <= clock_timestamp() "
								"   AND event_ts <= extract(epoch FROM clock_timestamp()) "
								" ORDER BY next_attempt_at, outbox_id "
								" LIMIT $1", accounts ? "stripe_account" : "NULL::text"), 1, argtypes);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	values[0] = Int32GetDatum(limit);
	ub_spi_check(SPI_execute_plan(*plan, values, NULL, true, limit),
				 SPI_OK_SELECT, "fetching a batch");

	*n = (int) SPI_processed;
	events = MemoryContextAllocZero(cxt, sizeof(UbMeterEvent) * Max(*n, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		UbMeterEvent *ev = &events[i];
		bool		isnull;

		ev->outbox_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		ev->identifier = ub_copy_text(tup, desc, 2, cxt);
		ev->idempotency_key = ub_copy_text(tup, desc, 3, cxt);
		ev->event_name = ub_copy_text(tup, desc, 4, cxt);
		ev->stripe_customer_id = ub_copy_text(tup, desc, 5, cxt);
		ev->value = ub_copy_text(tup, desc, 6, cxt);
		ev->timestamp = DatumGetInt64(SPI_getbinval(tup, desc, 7, &isnull));
		ev->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));
		(void) SPI_getbinval(tup, desc, 9, &isnull);
		ev->stripe_account = isnull ? NULL : ub_copy_text(tup, desc, 9, cxt);
		ev->outcome = UB_OUT_NOT_TRIED;
	}
	SPI_finish();
	return events;
}

/*
 * Transaction 2: records every attempted row's outcome with one call of
 * usage_billing.export_record() (parallel arrays); counts sent and failed rows.
 */
void
ub_outbox_record(UbMeterEvent *events, int n, int64 *sent, int64 *failed)
{
	Oid			argtypes[8] = {INT8ARRAYOID, TEXTARRAYOID, INT4ARRAYOID, TEXTARRAYOID,
	TEXTARRAYOID, INT4ARRAYOID, BOOLARRAYOID, INT4ARRAYOID};
	Datum	   *e[8];
	bool	   *isnull[8];
	Datum		args[8];
	int			c;
	int			i;
	int			m = 0;

	*sent = *failed = 0;
	for (c = 0; c < 8; c++)
	{
		e[c] = palloc(sizeof(Datum) * Max(n, 1));
		isnull[c] = palloc0(sizeof(bool) * Max(n, 1));
	}
	for (i = 0; i < n; i++)
	{
		UbMeterEvent *ev = &events[i];
		const char *outcome;

		switch (ev->outcome)
		{
			case UB_OUT_SENT:
				outcome = "sent";
				(*sent)++;
				break;
			case UB_OUT_FAILED:
				outcome = "failed";
				(*failed)++;
				break;
			case UB_OUT_RETRY:
				outcome = "retry";
				break;
			default:
				continue;		/* not tried: stays pending, nothing to record */
		}
		e[0][m] = Int64GetDatum(ev->outbox_id);
		e[1][m] = CStringGetTextDatum(outcome);
		e[2][m] = Int32GetDatum(ev->http_status);
		isnull[2][m] = (ev->http_status == 0);
		e[3][m] = CStringGetTextDatum(ev->request_id);
		isnull[3][m] = (ev->request_id[0] == '\0');
		e[4][m] = CStringGetTextDatum(ev->error);
		isnull[4][m] = (ev->error[0] == '\0');
		e[5][m] = Int32GetDatum(ev->outcome == UB_OUT_RETRY ? ev->retry_in_ms : 0);
		e[6][m] = BoolGetDatum(ev->rotate_key);
		e[7][m] = Int32GetDatum(ev->duration_ms);
		m++;
	}
	if (m == 0)
		return;

	args[0] = ub_array(e[0], isnull[0], m, INT8OID);
	args[1] = ub_array(e[1], isnull[1], m, TEXTOID);
	args[2] = ub_array(e[2], isnull[2], m, INT4OID);
	args[3] = ub_array(e[3], isnull[3], m, TEXTOID);
	args[4] = ub_array(e[4], isnull[4], m, TEXTOID);
	args[5] = ub_array(e[5], isnull[5], m, INT4OID);
	args[6] = ub_array(e[6], isnull[6], m, BOOLOID);
	args[7] = ub_array(e[7], isnull[7], m, INT4OID);

	SPI_connect();
	if (record_plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare("SELECT usage_billing.export_record($1, $2, $3, $4, $5, $6, $7, $8)",
									8, argtypes);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		record_plan = p;
	}
	ub_spi_check(SPI_execute_plan(record_plan, args, NULL, false, 0),
				 SPI_OK_SELECT, "recording export attempts");
	SPI_finish();
}

/*
 * Milliseconds until the earliest row ub_outbox_fetch could return is due
 * (the first pending row of each customer and meter, by its retry time and
 * its timestamp), or -1 when none is pending.  Rows queued behind another of
 * their customer and meter do not count: counting them would wake the worker
 * for rows it cannot send yet.
 */
long
ub_outbox_next_due_ms(void)
{
	bool		isnull;
	Datum		d;
	long		ms = -1;

	SPI_connect();
	/* min() over no rows is NULL: nothing pending (greatest() would turn it into 0) */
	ub_spi_check(SPI_execute("SELECT CASE WHEN d IS NOT NULL THEN greatest(0, d) END FROM "
							 "(SELECT ceil(extract(epoch FROM min(greatest(next_attempt_at, to_timestamp(event_ts)))"
							 " - clock_timestamp()) * 1000)::bigint AS d"
							 "  FROM (SELECT DISTINCT ON (customer_id, meter) next_attempt_at, event_ts"
							 "          FROM usage_billing.export_outbox WHERE status = 'pending'"
							 "         ORDER BY customer_id, meter, period_start, seq) h) x",
							 true, 1),
				 SPI_OK_SELECT, "finding the next retry");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
		ms = (long) DatumGetInt64(d);
	SPI_finish();
	return ms;
}
