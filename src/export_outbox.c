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
 *   record    transaction 2: usage_billing.export_record() per row
 *
 * Every function here expects to run inside a transaction with an active
 * snapshot, and connects to SPI itself.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "utils/builtins.h"

#include "export_worker.h"

static SPIPlanPtr fetch_plan = NULL;
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
 */
UbMeterEvent *
ub_outbox_fetch(int limit, MemoryContext cxt, int *n)
{
	Oid			argtypes[1] = {INT4OID};
	Datum		values[1];
	UbMeterEvent *events;
	uint64		i;

	SPI_connect();
	if (fetch_plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(
								"SELECT outbox_id, identifier, idempotency_key, event_name, "
								"       stripe_customer_id, value::text, event_ts, attempts "
								"  FROM (SELECT DISTINCT ON (customer_id, meter) * "
								"          FROM usage_billing.export_outbox "
								"         WHERE status = 'pending' "
								"         ORDER BY customer_id, meter, period_start, seq) o "
								" WHERE next_attempt_at <= clock_timestamp() "
								" ORDER BY next_attempt_at, outbox_id "
								" LIMIT $1", 1, argtypes);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		fetch_plan = p;
	}
	values[0] = Int32GetDatum(limit);
	ub_spi_check(SPI_execute_plan(fetch_plan, values, NULL, true, limit),
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
		ev->outcome = UB_OUT_NOT_TRIED;
	}
	SPI_finish();
	return events;
}

/* Transaction 2: records every attempted row's outcome; counts sent and failed rows. */
void
ub_outbox_record(UbMeterEvent *events, int n, int64 *sent, int64 *failed)
{
	Oid			argtypes[8] = {INT8OID, TEXTOID, INT4OID, TEXTOID, TEXTOID, INT4OID, BOOLOID, INT4OID};
	int			i;

	*sent = *failed = 0;
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
	for (i = 0; i < n; i++)
	{
		UbMeterEvent *ev = &events[i];
		Datum		values[8];
		char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
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
		values[0] = Int64GetDatum(ev->outbox_id);
		values[1] = CStringGetTextDatum(outcome);
		values[2] = Int32GetDatum(ev->http_status);
		if (ev->http_status == 0)
			nulls[2] = 'n';
		values[3] = CStringGetTextDatum(ev->request_id);
		if (ev->request_id[0] == '\0')
			nulls[3] = 'n';
		values[4] = CStringGetTextDatum(ev->error);
		if (ev->error[0] == '\0')
			nulls[4] = 'n';
		values[5] = Int32GetDatum(ev->outcome == UB_OUT_RETRY ? ev->retry_in_ms : 0);
		values[6] = BoolGetDatum(ev->rotate_key);
		values[7] = Int32GetDatum(ev->duration_ms);
		ub_spi_check(SPI_execute_plan(record_plan, values, nulls, false, 0),
					 SPI_OK_SELECT, "recording an export attempt");
	}
	SPI_finish();
}

/* Milliseconds until the earliest pending row is due, or -1 when none is pending. */
long
ub_outbox_next_due_ms(void)
{
	bool		isnull;
	Datum		d;
	long		ms = -1;

	SPI_connect();
	ub_spi_check(SPI_execute("SELECT greatest(0, ceil(extract(epoch FROM "
							 "min(next_attempt_at) - clock_timestamp()) * 1000))::bigint "
							 "FROM usage_billing.export_outbox WHERE status = 'pending'",
							 true, 1),
				 SPI_OK_SELECT, "finding the next retry");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
		ms = (long) DatumGetInt64(d);
	SPI_finish();
	return ms;
}
