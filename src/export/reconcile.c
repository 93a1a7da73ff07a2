/*-------------------------------------------------------------------------
 * reconcile.c
 *	  Reconciliation: the export worker reads back what Stripe holds
 *	  (event summaries) per customer, meter and period, compares it with the
 *	  database and corrects the export's bookkeeping where they differ.
 *
 * The rule (usage_billing.reconcile_record, in the 1.5 script)
 *   drift     Stripe's aggregated_value minus export_state.exported (what
 *             the database says Stripe holds).  A key with events or cancels
 *             in flight, or sent within usage_billing.reconcile_settle
 *             (Stripe's summaries lag), is skipped: its level is not known.
 *   correct   export_state is set to what Stripe holds, so the export itself
 *             repairs it: sum/count meters get a missing difference planned
 *             as a new event, or an excess cancelled among the events sent
 *             within export_cancel_window (what is older shows as
 *             needs_manual_credit: not correctable); formula-last meters get
 *             the current value sent again.
 *
 * Vocabulary
 *   run       one pass in the worker, after a cycle's sending: the keys
 *             (reconcile_candidates, least recently checked first, at most
 *             usage_billing.reconcile_max_keys) are read in transaction 1,
 *             then per key one GET (no transaction open, paced by
 *             export_max_rps) and one reconcile_record() call (its own
 *             transaction).  A run starts every reconcile_interval seconds,
 *             or when reconcile_stripe() asks for one; one that reads for
 *             more than 20 s stops and is resumed by the next cycle, so that
 *             sending goes on in between.
 *   request   reconcile_stripe() -> reconcile_request(): takes a ticket in
 *             shared memory (with an optional customer and meter), wakes the
 *             worker and waits until a run that took the ticket finished.
 *             The HTTP requests are the worker's, never the caller's.  A
 *             cycle that cannot reconcile (no API key, an error) abandons
 *             the pending tickets: their callers stop waiting at once.
 *
 * The shared struct lives next to the export worker's (shmem.c) and is
 * protected by its own spinlock.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "reconcile.h"
#include "export_shmem.h"
#include "stripe_http.h"

/* customer ids and meter names have at most 200 characters */
#define UB_RECONCILE_NAME_LEN	256
/* a run stops reading after this long, so that sending goes on; the next cycle resumes it */
#define UB_RECONCILE_BUDGET_MS	20000

typedef struct UbReconcileShared
{
	slock_t		mutex;
	int64		requested;		/* tickets handed out */
	int64		taken;			/* highest ticket a run has taken */
	int64		completed;		/* highest ticket whose run finished */
	int64		abandoned;		/* highest ticket a cycle could not serve (no key, error) */
	char		customer_id[UB_RECONCILE_NAME_LEN]; /* filter of the pending tickets, "" = all */
	char		meter[UB_RECONCILE_NAME_LEN];
} UbReconcileShared;

static UbReconcileShared *ub_rec = NULL;

static int	ub_reconcile_interval_s = 3600;
static int	ub_reconcile_settle_s = 900;
static int	ub_reconcile_max_keys = 1000;
static TimestampTz ub_reconcile_last = 0;	/* the worker's last run */
static bool ub_reconcile_reached = false;	/* this cycle got to ub_reconcile_run */
static bool ub_reconcile_resume = false;	/* the last run stopped at its time budget */
static TimestampTz ub_reconcile_pass = 0;	/* start of the pass a resumed run continues */

static bool ub_reconcile_take(int64 *ticket, char *customer_id, char *meter);
static void ub_reconcile_done(int64 ticket);
static UbSummaryCheck *ub_reconcile_candidates(const char *customer_id, const char *meter,
											   TimestampTz checked_before, MemoryContext cxt,
											   int *n);
static bool ub_reconcile_record(UbSummaryCheck *k);
static void ub_reconcile_begin(void);
static void ub_reconcile_commit(MemoryContext cxt);

PG_FUNCTION_INFO_V1(ub_reconcile_request);

/* Defines the settings (called from ub_export_init). */
void
ub_reconcile_init(void)
{
	DefineCustomIntVariable("usage_billing.reconcile_interval",
							"Seconds between reconciliations with Stripe's event summaries; 0 turns the schedule off.",
							"The export worker compares what Stripe holds with the database for every meter "
							"with a stripe_meter_id; usage_billing.reconcile_stripe() runs one at once.",
							&ub_reconcile_interval_s, 3600, 0, 7 * 86400, PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.reconcile_settle",
							"How long after an event or cancel was confirmed reconciliation leaves its period alone.",
							"Stripe aggregates meter events asynchronously: a summary read too soon would "
							"look like drift.",
							&ub_reconcile_settle_s, 900, 0, 86400, PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.reconcile_max_keys",
							"Most customer, meter and period keys one reconciliation reads from Stripe.",
							"The least recently checked go first; the rest waits for the next run.",
							&ub_reconcile_max_keys, 1000, 1, 1000000, PGC_SIGHUP, 0,
							NULL, NULL, NULL);
}

/* Asks for room for the struct; from the module's shmem_request_hook. */
void
ub_reconcile_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(UbReconcileShared)));
}

/*
 * Creates or attaches to the struct; from the module's shmem_startup_hook,
 * which holds AddinShmemInitLock.
 */
void
ub_reconcile_shmem_startup(void)
{
	bool		found;

	ub_rec = ShmemInitStruct("usage_billing reconcile", sizeof(UbReconcileShared), &found);
	if (!found)
	{
		memset(ub_rec, 0, sizeof(UbReconcileShared));
		SpinLockInit(&ub_rec->mutex);
	}
}

/*
 * usage_billing.reconcile_request(customer_id, meter, timeout_ms): takes a
 * ticket, wakes the worker and waits until a run that took it finished, at
 * most timeout_ms.  Pending tickets with different filters merge into a run
 * of every key.  True when the run finished in time.
 */
Datum
ub_reconcile_request(PG_FUNCTION_ARGS)
{
	char	   *customer_id = PG_ARGISNULL(0) ? "" : text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *meter = PG_ARGISNULL(1) ? "" : text_to_cstring(PG_GETARG_TEXT_PP(1));
	int			timeout_ms = PG_ARGISNULL(2) ? 60000 : PG_GETARG_INT32(2);
	int64		ticket;
	TimestampTz deadline;

	if (strlen(customer_id) >= UB_RECONCILE_NAME_LEN || strlen(meter) >= UB_RECONCILE_NAME_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("customer id or meter name too long"),
				 errdetail("Both have at most 200 characters.")));
	if (ub_rec == NULL || !ub_shmem_available())
	{
		ereport(NOTICE,
				(errmsg("the usage_billing export worker is not running"),
				 errdetail("The library usage_billing is not in shared_preload_libraries."),
				 errhint("Add usage_billing to shared_preload_libraries and restart the server.")));
		PG_RETURN_BOOL(false);
	}

	SpinLockAcquire(&ub_rec->mutex);
	if (ub_rec->requested == ub_rec->taken)
	{
		strlcpy(ub_rec->customer_id, customer_id, UB_RECONCILE_NAME_LEN);
		strlcpy(ub_rec->meter, meter, UB_RECONCILE_NAME_LEN);
	}
	else
	{
		/* another request is pending: one run serves both */
		if (strcmp(ub_rec->customer_id, customer_id) != 0)
			ub_rec->customer_id[0] = '\0';
		if (strcmp(ub_rec->meter, meter) != 0)
			ub_rec->meter[0] = '\0';
	}
	ticket = ++ub_rec->requested;
	SpinLockRelease(&ub_rec->mutex);

	if (ub_shmem_wake_worker() == 0)
	{
		ereport(NOTICE,
				(errmsg("the usage_billing export worker is not running"),
				 errdetail("It starts with the server and restarts within 10 seconds after a crash."),
				 errhint("Check the server log for its last messages.")));
		PG_RETURN_BOOL(false);
	}

	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), Max(timeout_ms, 0));
	for (;;)
	{
		int64		completed;
		int64		abandoned;

		SpinLockAcquire(&ub_rec->mutex);
		completed = ub_rec->completed;
		abandoned = ub_rec->abandoned;
		SpinLockRelease(&ub_rec->mutex);
		if (completed >= ticket)
			PG_RETURN_BOOL(true);
		if (abandoned >= ticket || GetCurrentTimestamp() >= deadline)
			PG_RETURN_BOOL(false);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 100,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/* The worker takes the pending tickets, if any, with their filter; returns whether there were some. */
static bool
ub_reconcile_take(int64 *ticket, char *customer_id, char *meter)
{
	bool		pending = false;

	*ticket = 0;
	customer_id[0] = meter[0] = '\0';
	if (ub_rec == NULL)
		return false;
	SpinLockAcquire(&ub_rec->mutex);
	if (ub_rec->requested > ub_rec->taken)
	{
		pending = true;
		*ticket = ub_rec->requested;
		ub_rec->taken = ub_rec->requested;
		strlcpy(customer_id, ub_rec->customer_id, UB_RECONCILE_NAME_LEN);
		strlcpy(meter, ub_rec->meter, UB_RECONCILE_NAME_LEN);
	}
	SpinLockRelease(&ub_rec->mutex);
	return pending;
}

/* The worker starts a cycle. */
void
ub_reconcile_cycle_begin(void)
{
	ub_reconcile_reached = false;
}

/*
 * The worker ended a cycle: when it did not get to reconciling (no API key,
 * a standby, an error), the pending tickets are abandoned, so that their
 * callers stop waiting at once instead of until their timeout.
 */
void
ub_reconcile_cycle_end(void)
{
	if (ub_rec == NULL || ub_reconcile_reached)
		return;
	SpinLockAcquire(&ub_rec->mutex);
	if (ub_rec->requested > ub_rec->taken)
	{
		ub_rec->taken = ub_rec->requested;
		ub_rec->abandoned = ub_rec->requested;
	}
	SpinLockRelease(&ub_rec->mutex);
}

/* The run that took ticket finished (or failed): its waiters may read the results. */
static void
ub_reconcile_done(int64 ticket)
{
	if (ub_rec == NULL || ticket == 0)
		return;
	SpinLockAcquire(&ub_rec->mutex);
	if (ub_rec->completed < ticket)
		ub_rec->completed = ticket;
	SpinLockRelease(&ub_rec->mutex);
}

/* Starts a transaction with a snapshot for SPI. */
static void
ub_reconcile_begin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
}

/* Commits what ub_reconcile_begin started and goes back to cxt. */
static void
ub_reconcile_commit(MemoryContext cxt)
{
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
}

/*
 * Transaction 1: the keys not checked since checked_before, copied into cxt;
 * none when the extension predates them.
 */
static UbSummaryCheck *
ub_reconcile_candidates(const char *customer_id, const char *meter, TimestampTz checked_before,
						MemoryContext cxt, int *n)
{
	Oid			argtypes[4] = {TEXTOID, TEXTOID, INT4OID, TIMESTAMPTZOID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	UbSummaryCheck *keys;
	bool		isnull;

	*n = 0;
	SPI_connect();
	if (SPI_execute("SELECT to_regproc('usage_billing.reconcile_record') IS NOT NULL",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "SPI failed while looking for usage_billing.reconcile_record");
	if (!DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
	{
		SPI_finish();
		return NULL;
	}
	values[0] = CStringGetTextDatum(customer_id);
	nulls[0] = customer_id[0] ? ' ' : 'n';
	values[1] = CStringGetTextDatum(meter);
	nulls[1] = meter[0] ? ' ' : 'n';
	values[2] = Int32GetDatum(ub_reconcile_max_keys);
	values[3] = TimestampTzGetDatum(checked_before);
	if (SPI_execute_with_args("SELECT customer_id, meter, period_start, period_end, stripe_customer_id,"
							  "       stripe_account, stripe_meter_id, exported::text,"
							  "       extract(epoch FROM period_start)::bigint,"
							  "       extract(epoch FROM period_end)::bigint"
							  "  FROM usage_billing.reconcile_candidates($1, $2, $3, $4)",
							  4, argtypes, values, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "SPI failed while choosing the keys to reconcile");

	*n = (int) SPI_processed;
	keys = MemoryContextAllocZero(cxt, sizeof(UbSummaryCheck) * Max(*n, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		UbSummaryCheck *k = &keys[i];
		char	   *acct = SPI_getvalue(tup, desc, 6);

		k->customer_id = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 1));
		k->meter = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 2));
		k->period_start = DatumGetTimestampTz(SPI_getbinval(tup, desc, 3, &isnull));
		k->period_end = DatumGetTimestampTz(SPI_getbinval(tup, desc, 4, &isnull));
		k->stripe_customer_id = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 5));
		k->stripe_account = acct ? MemoryContextStrdup(cxt, acct) : NULL;
		k->stripe_meter_id = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 7));
		k->exported = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 8));
		k->start_s = DatumGetInt64(SPI_getbinval(tup, desc, 9, &isnull));
		k->end_s = DatumGetInt64(SPI_getbinval(tup, desc, 10, &isnull));
	}
	SPI_finish();
	return keys;
}

/* Transaction 2: compares and corrects one key (usage_billing.reconcile_record); true when corrected. */
static bool
ub_reconcile_record(UbSummaryCheck *k)
{
	Oid			argtypes[9] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TEXTOID, TEXTOID,
	TEXTOID, TEXTOID, INT4OID};
	Datum		values[9];
	char		nulls[9] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	char	   *status;
	bool		corrected;

	values[0] = CStringGetTextDatum(k->customer_id);
	values[1] = CStringGetTextDatum(k->meter);
	values[2] = TimestampTzGetDatum(k->period_start);
	values[3] = TimestampTzGetDatum(k->period_end);
	values[4] = CStringGetTextDatum(k->value);
	nulls[4] = k->answered ? ' ' : 'n';
	values[5] = CStringGetTextDatum(k->exported);
	values[6] = CStringGetTextDatum(k->error);
	nulls[6] = k->answered ? 'n' : ' ';
	values[7] = CStringGetTextDatum(k->request_id);
	nulls[7] = k->request_id[0] ? ' ' : 'n';
	values[8] = Int32GetDatum(ub_reconcile_settle_s);

	SPI_connect();
	if (SPI_execute_with_args("SELECT usage_billing.reconcile_record($1, $2, $3, $4, $5::numeric,"
							  " $6::numeric, $7, $8, make_interval(secs => $9),"
							  " coalesce(nullif(pg_catalog.current_setting('usage_billing.export_cancel_window', true), ''),"
							  " '23h')::interval)",
							  9, argtypes, values, nulls, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "SPI failed while recording a reconciliation");
	status = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	corrected = status != NULL &&
		(strcmp(status, "resending") == 0 || strcmp(status, "cancelling") == 0);
	SPI_finish();
	return corrected;
}

/*
 * One run, when one is asked for or the interval has passed; called by the
 * worker with no transaction open, after the cycle's sending.  Returns true
 * when a key was corrected or more requests came in meanwhile: the worker
 * then runs another cycle at once (which plans and sends the correction).
 */
bool
ub_reconcile_run(const UbStripeConfig *cfg)
{
	char		customer_id[UB_RECONCILE_NAME_LEN];
	char		meter[UB_RECONCILE_NAME_LEN];
	int64		ticket;
	bool		asked;
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext cxt;
	MemoryContext old;
	UbSummaryCheck *keys;
	int			n;
	volatile int corrected = 0;
	bool		more = false;

	ub_reconcile_reached = true;
	asked = ub_reconcile_take(&ticket, customer_id, meter);
	if (!asked && !ub_reconcile_resume)
	{
		if (ub_reconcile_interval_s <= 0 ||
			(ub_reconcile_last != 0 &&
			 !TimestampDifferenceExceeds(ub_reconcile_last, now, ub_reconcile_interval_s * 1000)))
			return false;
	}
	/* a run of every key resets the schedule; a resumed one reads what its pass has not */
	if (asked || !ub_reconcile_resume)
		ub_reconcile_pass = now;
	if (customer_id[0] == '\0' && meter[0] == '\0' && !ub_reconcile_resume)
		ub_reconcile_last = now;
	ub_reconcile_resume = false;

	cxt = AllocSetContextCreate(CurrentMemoryContext, "usage_billing reconcile", ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		pgstat_report_activity(STATE_RUNNING, "reconciling with Stripe");
		ub_reconcile_begin();
		keys = ub_reconcile_candidates(customer_id, meter, ub_reconcile_pass, cxt, &n);
		ub_reconcile_commit(cxt);

		ub_http_init();
		for (int i = 0; i < n; i++)
		{
			UbSummaryCheck *k = &keys[i];

			CHECK_FOR_INTERRUPTS();
			if (TimestampDifferenceExceeds(now, GetCurrentTimestamp(), UB_RECONCILE_BUDGET_MS))
			{
				/* the least recently checked keys come first next time */
				ub_reconcile_resume = true;
				break;
			}
			if (i > 0 && cfg->max_rps > 0)	/* the requests-per-second ceiling, simply */
				pg_usleep((long) Min(1000000.0 / cfg->max_rps, 1000000.0));
			ub_reconcile_fetch(k, cfg);
			if (k->throttled)
				break;			/* the rest waits for the next run */
			ub_reconcile_begin();
			if (ub_reconcile_record(k))
				corrected++;
			ub_reconcile_commit(cxt);
		}
	}
	PG_FINALLY();
	{
		/* waiters stop waiting on every path; an error is reported by the worker */
		ub_reconcile_done(ticket);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);
	MemoryContextDelete(cxt);

	if (ub_rec != NULL)
	{
		SpinLockAcquire(&ub_rec->mutex);
		more = ub_rec->requested > ub_rec->taken;
		SpinLockRelease(&ub_rec->mutex);
	}
	/* a correction is planned and sent by the next cycle, and a cut run resumed: at once */
	return more || corrected > 0 || ub_reconcile_resume;
}

/* The earlier of due_ms (-1: none) and the next scheduled run, so that the worker wakes up for it. */
long
ub_reconcile_merge_due(long due_ms)
{
	long		ms;
	long		secs;
	int			usecs;
	TimestampTz next;

	if (ub_reconcile_interval_s <= 0 || ub_reconcile_last == 0)
		return due_ms;
	next = TimestampTzPlusMilliseconds(ub_reconcile_last, ub_reconcile_interval_s * 1000L);
	TimestampDifference(GetCurrentTimestamp(), next, &secs, &usecs);
	ms = secs * 1000 + usecs / 1000;
	return (due_ms < 0 || ms < due_ms) ? ms : due_ms;
}
