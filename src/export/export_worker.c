/*-------------------------------------------------------------------------
 * export_worker.c
 *	  The Stripe export worker: settings, registration and the main loop.
 *	  (usage_billing.export_now() lives in shmem.c, next to what it pokes.)
 *
 * Vocabulary
 *   cycle     one pass: plan (transaction 1), then batches of fetch, send
 *             (no transaction open), record (transaction 2) until no row is
 *             due.  A cycle runs every export_interval seconds, when a retry
 *             falls due, or at once when export_now() sets our latch.  An
 *             error in a cycle is reported, its transaction aborted, and the
 *             worker carries on: it does not restart for one bad batch.
 *   cycle context   memory of one cycle, reset after each one, so that the
 *             worker's memory stays flat over days of cycles.
 *
 * The worker connects to usage_billing.database, does nothing while the
 * extension is not installed there or while the server is a standby, and
 * idles (saying so once) while no API key is configured.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/stat.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "alerts.h"
#include "export_cancel.h"
#include "escrow.h"
#include "citus.h"
#include "export_worker.h"
#include "finalize.h"
#include "export_shmem.h"
#include "errors.h"
#include "reconcile.h"
#include "stripe_stream.h"

/* settings (see ub_export_init for their meaning) */
static char *ub_api_key = NULL;
static char *ub_api_key_file = NULL;
static char *ub_api_base = NULL;
static char *ub_stripe_version = NULL;
static char *ub_database = NULL;
static int	ub_export_interval = 60;
static double ub_max_rps = 20.0;
static int	ub_concurrency = 8;
static int	ub_batch_size = 500;
static int	ub_connect_timeout_ms = 5000;
static int	ub_timeout_ms = 30000;
static int	ub_backoff_base_ms = 1000;
static int	ub_backoff_max_ms = 300000;

/* rows planned per cycle: bounds transaction 1 */
#define UB_PLAN_MAX_ROWS	20000
/* a cycle stops sending after this long, so that new usage gets planned */
#define UB_CYCLE_BUDGET_MS	30000
/* pause after a cycle failed with an error */
#define UB_ERROR_PAUSE_MS	5000
/* longest key or key file we accept */
#define UB_MAX_KEY_FILE		4096

static bool said_no_key = false;
static MemoryContext ub_cycle_cxt = NULL;
static char *ub_cycle_key = NULL;	/* the key of the running cycle, wiped after it */
static bool said_no_extension = false;
static bool said_citus_worker = false;

static bool ub_check_api_base(char **newval, void **extra, GucSource source);
static bool ub_check_api_key(char **newval, void **extra, GucSource source);
static void ub_worker_exit(int code, Datum arg);
static char *ub_resolve_key(void);
static long ub_run_cycle(MemoryContext cxt, bool *more);
static long ub_guarded_cycle(MemoryContext cycle_cxt, bool *more);
static void ub_begin(void);
static void ub_commit(void);



/* Defines the export settings; when preloading, requests shared memory and registers the worker. */
void
ub_export_init(void)
{
	BackgroundWorker worker;

	DefineCustomStringVariable("usage_billing.stripe_api_key",
							   "Stripe secret key (sk_... or rk_...) the export worker sends with.",
							   "Visible to superusers only.  Set it in postgresql.conf or use "
							   "usage_billing.stripe_api_key_file: ALTER SYSTEM statements can be logged "
							   "(log_statement), and role or database settings are not allowed.",
							   &ub_api_key, "", PGC_SUSET,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   ub_check_api_key, NULL, NULL);
	DefineCustomStringVariable("usage_billing.stripe_api_key_file",
							   "File holding the Stripe secret key; used when stripe_api_key is empty.",
							   "Read by the export worker at every cycle; first line, blanks trimmed.",
							   &ub_api_key_file, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("usage_billing.stripe_api_base",
							   "Base URL of the Stripe API.",
							   "Tests point it at a loopback mock.",
							   &ub_api_base, "https://api.stripe.com", PGC_SIGHUP, 0,
							   ub_check_api_base, NULL, NULL);
	DefineCustomStringVariable("usage_billing.stripe_version",
							   "Stripe-Version header sent with every request.",
							   NULL, &ub_stripe_version, "2026-07-29.dahlia", PGC_SIGHUP, 0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("usage_billing.database",
							   "Database the export worker connects to.",
							   "Changing it makes the worker restart into the new database.",
							   &ub_database, "postgres", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.export_interval",
							"Seconds between export cycles; 0 disables periodic export.",
							"With 0, cycles run only on usage_billing.export_now() and to retry what is pending.",
							&ub_export_interval, 60, 0, 86400, PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomRealVariable("usage_billing.export_max_rps",
							 "Ceiling on meter event requests per second.",
							 "The default, 20, stays below Stripe's sandbox limit of 25 operations per second; live accounts allow 1000.",
							 &ub_max_rps, 20.0, 0.1, 100000.0, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.export_concurrency",
							"Meter event requests in flight at once.",
							NULL, &ub_concurrency, 8, 1, 256, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.export_batch_size",
							"Outbox rows fetched, sent and recorded per batch.",
							NULL, &ub_batch_size, 500, 1, 10000, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.export_connect_timeout",
							"Connect timeout of a Stripe request.",
							NULL, &ub_connect_timeout_ms, 5000, 10, 600000, PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.export_timeout",
							"Total timeout of a Stripe request.",
							"A request that times out is sent again later with the same identifier.",
							&ub_timeout_ms, 30000, 10, 600000, PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.export_backoff_base",
							"First retry delay after a failed attempt; doubles per attempt, with jitter.",
							NULL, &ub_backoff_base_ms, 1000, 10, 3600000, PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.export_backoff_max",
							"Longest retry delay.",
							NULL, &ub_backoff_max_ms, 300000, 10, 86400000, PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	ub_stream_init();			/* usage_billing.stripe_api, the v2 events base */
	ub_secrets_init();
	ub_reconcile_init();		/* reconcile.c: its settings */

	if (!process_shared_preload_libraries_in_progress)
		return;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 10;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "usage_billing");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "ub_export_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "usage_billing export worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "usage_billing export worker");
	RegisterBackgroundWorker(&worker);
}

/* GUC check hook: the API base must be an http(s) URL. */
static bool
ub_check_api_base(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL ||
		(strncmp(*newval, "https://", 8) != 0 && strncmp(*newval, "http://", 7) != 0))
	{
		GUC_check_errdetail("The Stripe API base must start with https:// or http://.");
		return false;
	}
	return true;
}

/*
 * GUC check hook of the key: refuses ALTER ROLE/DATABASE ... SET and function SET
 * clauses (validated with PGC_S_TEST), since pg_db_role_setting and pg_proc are
 * readable by every user.  Raises its own error: the generic "invalid value"
 * message would quote the key.
 */
static bool
ub_check_api_key(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (source == PGC_S_TEST)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("usage_billing.stripe_api_key cannot be stored in a role, database or function setting"),
				 errdetail("Those settings are readable by every user."),
				 errhint("Set it in postgresql.conf, or use usage_billing.stripe_api_key_file.")));
	return true;
}

/* Withdraws from shared memory and frees libcurl at exit. */
static void
ub_worker_exit(int code, Datum arg)
{
	ub_shmem_clear_worker();
	ub_stripe_shutdown();
	ub_stream_shutdown();
}

/* Starts a transaction with a snapshot, for SPI. */
static void
ub_begin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
}

/* Commits what ub_begin started; back in the cycle context (commit leaves us in TopMemoryContext). */
static void
ub_commit(void)
{
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(ub_cycle_cxt);
}

/*
 * The key to send with, palloc'd in the current context, or NULL: the
 * setting, else the key file's first line.  Messages name the file, never
 * its content.
 */
static char *
ub_resolve_key(void)
{
	FILE	   *f;
	char	   *buf;
	size_t		len;

	if (ub_api_key && ub_api_key[0])
		return pstrdup(ub_api_key);
	if (ub_api_key_file == NULL || ub_api_key_file[0] == '\0')
		return NULL;

	f = AllocateFile(ub_api_key_file, "r");
	if (f == NULL)
	{
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("could not open Stripe API key file \"%s\": %m", ub_api_key_file)));
		return NULL;
	}
	buf = palloc0(UB_MAX_KEY_FILE + 1);
	len = fread(buf, 1, UB_MAX_KEY_FILE, f);
	FreeFile(f);
	buf[len] = '\0';
	len = strcspn(buf, "\r\n");
	buf[len] = '\0';
	while (len > 0 && (buf[len - 1] == ' ' || buf[len - 1] == '\t'))
		buf[--len] = '\0';
	if (len == 0)
		return NULL;
	return buf;
}

/*
 * One export cycle.  Returns the milliseconds until a pending retry falls due
 * (-1: none); *more is set when planning stopped at its row limit.
 */
static long
ub_run_cycle(MemoryContext cxt, bool *more)
{
	UbStripeConfig cfg;
	char	   *key;
	char	   *base;
	int			planned;
	int64		total_sent = 0;
	int64		total_failed = 0;
	long		due_ms = -1;
	TimestampTz started;
	int64		round_sent = 0;

	*more = false;
	if (RecoveryInProgress())
		return -1;

	ub_begin();
	if (!ub_outbox_extension_installed())
	{
		ub_commit();
		if (!said_no_extension)
			ereport(LOG,
					(errmsg("usage_billing export worker: extension not installed in database \"%s\", waiting",
							ub_database)));
		said_no_extension = true;
		return -1;
	}
	said_no_extension = false;

	/* hard_cap_blocked alerts queued by refused calls reach alert_log (export_cancel.c) */
	ub_alerts_flush_in_worker();

	/* escrow slots of keys that cooled down go back into their rows, so they do not pile up */
	pgstat_report_activity(STATE_RUNNING, "folding idle escrow slots");
	(void) ub_escrow_fold_all(NULL, ub_escrow_fold_idle);

	/*
	 * On a Citus cluster (citus.c) the coordinator's worker exports for every
	 * shard: one planner, one rate ceiling for the Stripe account (see
	 * doc/scaling.md).  The workers' workers only flush and fold above.
	 */
	if (ub_distributed() && !ub_citus_coordinator())
	{
		ub_commit();
		if (!said_citus_worker)
			ereport(LOG,
					(errmsg("usage_billing export worker: this is a Citus worker node, the coordinator's worker exports")));
		said_citus_worker = true;
		return -1;
	}

	/* invoices of the periods that ended (finalize.c) */
	pgstat_report_activity(STATE_RUNNING, "finalizing invoices");
	ub_finalize_invoices_in_worker();

	/* in the cycle context: the transaction's memory goes at commit */
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		key = ub_resolve_key();
		MemoryContextSwitchTo(old);
	}
	ub_cycle_key = key;
	if (key == NULL)
	{
		ub_commit();
		if (!said_no_key)
			ereport(LOG,
					(errmsg("usage_billing export worker: no Stripe API key configured, not exporting"),
					 errhint("Set usage_billing.stripe_api_key or usage_billing.stripe_api_key_file and reload.")));
		said_no_key = true;
		return -1;
	}
	said_no_key = false;

	pgstat_report_activity(STATE_RUNNING, "planning meter events");
	planned = ub_outbox_plan(UB_PLAN_MAX_ROWS);
	ub_commit();
	*more = (planned >= UB_PLAN_MAX_ROWS);

	base = pstrdup(ub_api_base);
	while (strlen(base) > 0 && base[strlen(base) - 1] == '/')
		base[strlen(base) - 1] = '\0';
	cfg.api_base = base;
	cfg.api_key = key;
	cfg.stripe_version = ub_stripe_version;
	cfg.concurrency = ub_concurrency;
	cfg.max_rps = ub_max_rps;
	cfg.connect_timeout_ms = ub_connect_timeout_ms;
	cfg.timeout_ms = ub_timeout_ms;
	cfg.backoff_base_ms = ub_backoff_base_ms;
	cfg.backoff_max_ms = Max(ub_backoff_max_ms, ub_backoff_base_ms);

	/* corrections: cancel events above a lowered total, then plan the rest (export_cancel.c) */
	if (ub_cancel_run(&cfg) > 0)
	{
		ub_begin();
		planned = ub_outbox_plan(UB_PLAN_MAX_ROWS);
		ub_commit();
		*more = *more || (planned >= UB_PLAN_MAX_ROWS);
	}

	started = GetCurrentTimestamp();
	for (;;)
	{
		UbMeterEvent *events;
		int			n;
		bool		throttled;
		int64		sent;
		int64		failed;
		MemoryContext batch_cxt;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
			break;				/* pick up new settings first */
		if (TimestampDifferenceExceeds(started, GetCurrentTimestamp(), UB_CYCLE_BUDGET_MS))
		{
			*more = true;		/* plan again, then carry on sending */
			break;
		}

		batch_cxt = AllocSetContextCreate(cxt, "usage_billing export batch", ALLOCSET_DEFAULT_SIZES);
		ub_begin();
		events = ub_outbox_fetch(ub_batch_size, batch_cxt, &n);
		ub_commit();
		if (n == 0)
		{
			MemoryContextDelete(batch_cxt);
			if (round_sent == 0)
				break;
			/* rows confirmed since the last plan unblock usage recorded meanwhile */
			round_sent = 0;
			ub_begin();
			planned = ub_outbox_plan(UB_PLAN_MAX_ROWS);
			ub_commit();
			*more = *more || (planned >= UB_PLAN_MAX_ROWS);
			continue;
		}

		pgstat_report_activity(STATE_RUNNING, "sending meter events");
		MemoryContextSwitchTo(batch_cxt);
		if (ub_stripe_api == UB_STRIPE_API_V2)
			ub_stream_send_batch(events, n, &cfg, &throttled);	/* stripe_stream.c */
		else
			ub_stripe_send_batch(events, n, &cfg, &throttled);

		pgstat_report_activity(STATE_RUNNING, "recording meter event outcomes");
		ub_begin();
		ub_outbox_record(events, n, &sent, &failed);
		ub_commit();
		MemoryContextSwitchTo(cxt);
		MemoryContextDelete(batch_cxt);
		total_sent += sent;
		total_failed += failed;
		round_sent += sent;
		if (throttled)
			break;
	}

	/* reading Stripe's summaries back, when due or asked for (reconcile.c) */
	if (ub_reconcile_run(&cfg))
		*more = true;

	ub_begin();
	due_ms = ub_outbox_next_due_ms();
	due_ms = ub_cancel_merge_due(due_ms);	/* export_cancel.c */
	ub_commit();
	due_ms = ub_reconcile_merge_due(due_ms);

	ub_shmem_count_cycle(total_sent, total_failed);
	if (total_sent > 0 || total_failed > 0)
		elog(DEBUG1, "usage_billing export cycle: " INT64_FORMAT " sent, " INT64_FORMAT " failed",
			 total_sent, total_failed);
	return due_ms;
}

/*
 * Runs one cycle; an error is reported, its transaction aborted and the
 * worker carries on: one bad cycle must not restart it.  Resets the cycle
 * context.  Returns the milliseconds until the next retry (-1: none).
 */
static long
ub_guarded_cycle(MemoryContext cycle_cxt, bool *more)
{
	volatile long due_ms = -1;

	*more = false;
	MemoryContextSwitchTo(cycle_cxt);
	ub_reconcile_cycle_begin();
	PG_TRY();
	{
		due_ms = ub_run_cycle(cycle_cxt, more);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(TopMemoryContext);
		EmitErrorReport();
		AbortCurrentTransaction();
		FlushErrorState();
		due_ms = UB_ERROR_PAUSE_MS;
		*more = false;
	}
	PG_END_TRY();
	/* reconciliation requests this cycle could not serve stop waiting (reconcile.c) */
	ub_reconcile_cycle_end();
	/* on every path: the key must not linger in freed memory */
	if (ub_cycle_key)
		explicit_bzero(ub_cycle_key, strlen(ub_cycle_key));
	ub_cycle_key = NULL;
	MemoryContextSwitchTo(TopMemoryContext);
	MemoryContextReset(cycle_cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return due_ms;
}

/* Entry point of the background worker. */
void
ub_export_worker_main(Datum main_arg)
{
	MemoryContext cycle_cxt;
	char	   *database;
	TimestampTz next_cycle = 0;
	TimestampTz next_retry = 0;	/* 0: nothing pending */
	bool		run_now = true;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	/* SIGUSR1 stays procsignal_sigusr1_handler: barriers, DROP DATABASE, latch */
	BackgroundWorkerUnblockSignals();

	database = pstrdup(ub_database);
	BackgroundWorkerInitializeConnection(database, NULL, 0);
	pgstat_report_appname("usage_billing export worker");

	ub_shmem_set_worker(MyLatch);
	before_shmem_exit(ub_worker_exit, (Datum) 0);

	cycle_cxt = AllocSetContextCreate(TopMemoryContext, "usage_billing export cycle",
									  ALLOCSET_DEFAULT_SIZES);
	ub_cycle_cxt = cycle_cxt;
	ereport(LOG,
			(errmsg("usage_billing export worker started in database \"%s\"", database)));

	for (;;)
	{
		long		timeout;
		int			rc;
		TimestampTz now = GetCurrentTimestamp();

		if (run_now || (ub_export_interval > 0 && now >= next_cycle) ||
			(next_retry != 0 && now >= next_retry))
		{
			bool		more = false;
			long		due_ms;

			run_now = false;
			due_ms = ub_guarded_cycle(cycle_cxt, &more);
			now = GetCurrentTimestamp();
			/* remembered across wake-ups that run no cycle (signals, barriers) */
			next_retry = due_ms >= 0 ? TimestampTzPlusMilliseconds(now, due_ms) : 0;
			if (ub_export_interval > 0)
				next_cycle = TimestampTzPlusMilliseconds(now, ub_export_interval * 1000L);
			run_now = more;
		}

		/*
		 * Sleep until the next periodic cycle or the next retry.  With
		 * interval 0, cycles run on export_now() and for retries only.
		 */
		timeout = -1;
		if (run_now)
			timeout = 0;
		else
		{
			if (ub_export_interval > 0)
				timeout = (long) Max((next_cycle - now) / 1000, 0);
			if (next_retry != 0)
			{
				long		r = (long) Max((next_retry - now) / 1000, 0);

				if (timeout < 0 || r < timeout)
					timeout = r;
			}
		}

		rc = WaitLatch(MyLatch,
					   WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | (timeout >= 0 ? WL_TIMEOUT : 0),
					   timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();

		/* the latch is also set by signals and barriers: only export_now() counts */
		if ((rc & WL_LATCH_SET) && ub_shmem_take_wake())
			run_now = true;

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			said_no_key = false;
			if (strcmp(database, ub_database) != 0)
			{
				ereport(LOG,
						(errmsg("usage_billing export worker: usage_billing.database changed to \"%s\", restarting",
								ub_database)));
				proc_exit(1);
			}
			/* a new interval counts from now */
			if (ub_export_interval > 0)
				next_cycle = Min(next_cycle,
								 TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
															 ub_export_interval * 1000L));
			run_now = true;
		}
	}
}
