/*-------------------------------------------------------------------------
 * export_cancel.c
 *	  Export corrections: cancelling meter events in Stripe when a correction
 *	  lowered a total Stripe already holds.
 *
 * The rule.  For sum and count meters Stripe holds the sum of the deltas
 * sent.  When a correction (void_usage, adjust_usage) lowers a period's
 * total below what Stripe holds (planned > floor(total)), the worker cancels
 * the most recent meter events of that customer, meter and period that
 * Stripe received less than usage_billing.export_cancel_window ago (default
 * 23 h, a margin under Stripe's 24 h), newest first, until what Stripe holds
 * is <= floor(total); the planner (export_plan) then sends the positive
 * difference as a new event.  What cannot be cancelled (older events, or a
 * cancel Stripe refused) shows in export_status as needs_manual_credit, with
 * the amount.  Formula-last meters (max, last, unique_count) need no cancel:
 * the planner already sends the new, lower current value.
 *
 * Vocabulary (see the export corrections block of usage_billing--1.0.sql)
 *   cancel      one row of usage_billing.export_cancels: the intent to cancel
 *               one sent event (by its identifier) with POST
 *               /v1/billing/meter_event_adjustments (type=cancel), committed
 *               before the request, with a deterministic Idempotency-Key
 *   run         one pass per cycle, before the cycle's sending, in rounds:
 *               plan and fetch the due cancels (transaction 1), then for each
 *               cancel one synchronous request (no transaction open) and one
 *               export_cancel_record() call (its own transaction 2); a round
 *               with a refusal is followed by another (an older event may
 *               cover the excess), at most UB_CANCEL_ROUNDS
 *   outcome     cancelled (the event's value leaves planned and exported,
 *               once: only a pending row can change), refused (a 4xx that
 *               retrying cannot fix, e.g. the event is older than 24 h: the
 *               value becomes manual credit), retry (network error, 409,
 *               429, 5xx: same identifier later, same key unless an error
 *               answer was received, since Stripe replays saved answers)
 *
 * Cancels are rare, so they go one at a time with a libcurl easy handle
 * (never two requests for one customer and meter): the request and the
 * classification of its answer live in export_cancel_http.c, on top of the
 * shared HTTP layer (stripe_http.c), which alone handles the key.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "export_cancel.h"
#include "export_worker.h"
#include "stripe_http.h"

/* cancels planned per run: bounds transaction 1 */
#define UB_CANCEL_PLAN_ROWS		1000
/* cancels sent per run: the rest waits for the next cycle */
#define UB_CANCEL_SEND_ROWS		200
/* plan-and-send rounds per run (a refusal makes room for an older event) */
#define UB_CANCEL_ROUNDS		8

static int	ub_cancel_window_s = 82800;

static MemoryContext ub_cancel_begin(void);
static void ub_cancel_commit(MemoryContext cxt);
static bool ub_cancel_installed(void);
static UbCancel *ub_cancel_fetch(MemoryContext cxt, int *n);
static bool ub_cancel_record(UbCancel *c);
static int	ub_cancel_rounds(MemoryContext cxt, const UbStripeConfig *cfg, const char *url);

/* Defines usage_billing.export_cancel_window (called from _PG_init). */
void
ub_cancel_init(void)
{
	DefineCustomIntVariable("usage_billing.export_cancel_window",
							"How long after sending a meter event the export worker may still cancel it.",
							"Stripe cancels events only within 24 hours of receiving them; the default, "
							"23 hours, leaves a margin.  0 never cancels: a lowered sum/count total then "
							"always shows as needs_manual_credit in export_status.",
							&ub_cancel_window_s, 82800, 0, 86000, PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
}

/* Starts a transaction with a snapshot for SPI; returns the context to come back to. */
static MemoryContext
ub_cancel_begin(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	return cxt;
}

/* Commits what ub_cancel_begin started and goes back to the caller's context. */
static void
ub_cancel_commit(MemoryContext cxt)
{
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
}

/* True when this database's extension has the cancel table and functions (it may predate them). */
static bool
ub_cancel_installed(void)
{
	bool		isnull;
	bool		ok;

	SPI_connect();
	if (SPI_execute("SELECT to_regclass('usage_billing.export_cancels') IS NOT NULL"
					" AND to_regproc('usage_billing.export_cancel_plan') IS NOT NULL",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "SPI failed while looking for usage_billing.export_cancels");
	ok = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return ok && !isnull;
}

/* Transaction 1: plans the cancels a lowered total calls for and copies the due ones into cxt. */
static UbCancel *
ub_cancel_fetch(MemoryContext cxt, int *n)
{
	Oid			argtypes[2] = {INT4OID, INT4OID};
	Datum		values[2];
	UbCancel   *volatile cancels;
	uint64		i;

	*n = 0;
	if (!ub_cancel_installed())
		return NULL;

	SPI_connect();
	values[0] = Int32GetDatum(ub_cancel_window_s);
	values[1] = Int32GetDatum(UB_CANCEL_PLAN_ROWS);
	if (SPI_execute_with_args("SELECT usage_billing.export_cancel_plan(make_interval(secs => $1), $2)",
							  2, argtypes, values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "SPI failed while planning meter event cancels");

	/* Stripe Connect: a cancel goes to the account its event was sent to */
	values[0] = Int32GetDatum(UB_CANCEL_SEND_ROWS);
	if (SPI_execute_with_args(psprintf("SELECT x.cancel_id, x.identifier, x.idempotency_key, x.event_name,"
									   "       x.attempts, %s"
									   "  FROM usage_billing.export_cancels x"
									   " WHERE x.status = 'pending' AND x.next_attempt_at <= clock_timestamp()"
									   " ORDER BY x.next_attempt_at, x.cancel_id LIMIT $1",
									   ub_outbox_has_accounts()
									   ? "(SELECT o.stripe_account FROM usage_billing.export_outbox o"
									   "    WHERE o.customer_id = x.customer_id AND o.outbox_id = x.outbox_id)"
									   : "NULL::text"),
							  1, argtypes, values, NULL, true, UB_CANCEL_SEND_ROWS) != SPI_OK_SELECT)
		elog(ERROR, "SPI failed while fetching meter event cancels");

	*n = (int) SPI_processed;
	cancels = MemoryContextAllocZero(cxt, sizeof(UbCancel) * Max(*n, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		UbCancel   *c = &cancels[i];
		bool		isnull;

		c->cancel_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		c->identifier = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 2));
		c->idempotency_key = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 3));
		c->event_name = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 4));
		c->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 5, &isnull));
		c->stripe_account = SPI_getvalue(tup, desc, 6);
		if (c->stripe_account)
			c->stripe_account = MemoryContextStrdup(cxt, c->stripe_account);
	}
	SPI_finish();
	return cancels;
}

/* Transaction 2: records one attempt's outcome; true when Stripe confirmed the cancel now. */
static bool
ub_cancel_record(UbCancel *c)
{
	Oid			argtypes[7] = {INT8OID, TEXTOID, INT4OID, TEXTOID, TEXTOID, INT4OID, BOOLOID};
	Datum		values[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	bool		isnull;
	bool		done;

	values[0] = Int64GetDatum(c->cancel_id);
	values[1] = CStringGetTextDatum(c->outcome);
	values[2] = Int32GetDatum(c->http_status);
	if (c->http_status == 0)
		nulls[2] = 'n';
	values[3] = CStringGetTextDatum(c->request_id);
	if (c->request_id[0] == '\0')
		nulls[3] = 'n';
	values[4] = CStringGetTextDatum(c->error);
	if (c->error[0] == '\0')
		nulls[4] = 'n';
	values[5] = Int32GetDatum(c->retry_in_ms);
	values[6] = BoolGetDatum(c->rotate_key);

	SPI_connect();
	if (SPI_execute_with_args("SELECT usage_billing.export_cancel_record($1, $2, $3, $4, $5, $6, $7)",
							  7, argtypes, values, nulls, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "SPI failed while recording a meter event cancel");
	done = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return done && !isnull;
}

/*
 * Rounds of plan and fetch (transaction 1), then per cancel one request and
 * one record (transaction 2).  A refused cancel leaves its excess uncovered,
 * so the next round may pick an older event; bounded by UB_CANCEL_ROUNDS.
 */
static int
ub_cancel_rounds(MemoryContext cxt, const UbStripeConfig *cfg, const char *url)
{
	int			confirmed = 0;

	for (int round = 0; round < UB_CANCEL_ROUNDS; round++)
	{
		MemoryContext back = ub_cancel_begin();
		UbCancel   *cancels;
		int			n;
		int			refused = 0;
		bool		throttled = false;

		cancels = ub_cancel_fetch(cxt, &n);
		ub_cancel_commit(back);
		if (n == 0)
			break;
		pgstat_report_activity(STATE_RUNNING, "cancelling meter events");
		for (int i = 0; i < n && !throttled; i++)
		{
			UbCancel   *c = &cancels[i];

			CHECK_FOR_INTERRUPTS();
			if (i > 0 && cfg->max_rps > 0)	/* the requests-per-second ceiling, simply */
				pg_usleep((long) Min(1000000.0 / cfg->max_rps, 1000000.0));
			ub_cancel_send(c, cfg, url);
			back = ub_cancel_begin();
			if (ub_cancel_record(c))
				confirmed++;
			ub_cancel_commit(back);
			if (strcmp(c->outcome, "refused") == 0)
				refused++;
			throttled = c->throttled;
		}
		if (refused == 0 || throttled)
			break;
	}
	return confirmed;
}

/*
 * One run per export cycle, called with no transaction open.  Returns how
 * many cancels Stripe confirmed, so that the caller plans again (the
 * difference up to the lowered total is then sent as a new event).
 */
int
ub_cancel_run(const UbStripeConfig *cfg)
{
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "usage_billing export cancels",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	int			confirmed;
	char	   *url;

	ub_http_init();
	url = psprintf("%s/v1/billing/meter_event_adjustments", cfg->api_base);
	confirmed = ub_cancel_rounds(cxt, cfg, url);
	MemoryContextSwitchTo(old);
	MemoryContextDelete(cxt);
	return confirmed;
}

/*
 * The earlier of due_ms (the outbox's next retry, -1: none) and the next
 * pending cancel's retry, so that the worker wakes up for either.  Runs in
 * the caller's transaction.
 */
long
ub_cancel_merge_due(long due_ms)
{
	bool		isnull;
	Datum		d;
	long		ms;

	if (!ub_cancel_installed())
		return due_ms;
	SPI_connect();
	/* min() over no rows is NULL: nothing pending (greatest() would turn it into 0) */
	if (SPI_execute("SELECT CASE WHEN d IS NOT NULL THEN greatest(0, d) END FROM"
					" (SELECT ceil(extract(epoch FROM min(next_attempt_at) - clock_timestamp())"
					" * 1000)::bigint AS d FROM usage_billing.export_cancels"
					" WHERE status = 'pending') x",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "SPI failed while finding the next cancel retry");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	ms = isnull ? -1 : (long) DatumGetInt64(d);
	SPI_finish();
	if (ms < 0)
		return due_ms;
	return (due_ms < 0 || ms < due_ms) ? ms : due_ms;
}
