/*-------------------------------------------------------------------------
 * export_shmem.c
 *	  Shared memory of the export worker.
 *
 * One small struct, UbExportShared, lives in the main shared memory segment
 * when the library is preloaded: the worker's pid and latch, so that any
 * backend can wake it (export_now()), plus a few counters.  A spinlock
 * protects it; nothing here sleeps or allocates while holding it.
 *
 * Without shared_preload_libraries the struct does not exist and
 * ub_shmem_available() says so.  The SQL functions that reach the worker
 * through it, usage_billing.export_now() and export_worker_info(), live
 * here too.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"

#include "export_shmem.h"

typedef struct UbExportShared
{
	slock_t		mutex;
	pid_t		worker_pid;		/* 0 when no worker runs */
	Latch	   *worker_latch;	/* the worker's MyLatch, NULL when none */
	bool		wake_requested; /* export_now() was called since the last cycle */
	int64		cycles;			/* export cycles completed */
	int64		events_sent;	/* meter events Stripe confirmed */
	int64		events_failed;	/* meter events Stripe refused for good */
} UbExportShared;

static UbExportShared *ub_shared = NULL;

static bool ub_wake_at_commit = false;
static bool ub_xact_cb_registered = false;

static void ub_export_now_xact_cb(XactEvent event, void *arg);

PG_FUNCTION_INFO_V1(ub_export_now);
PG_FUNCTION_INFO_V1(ub_export_worker_info);

/* Asks for room for our struct; from the module's shmem_request_hook. */
void
ub_export_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(UbExportShared)));
}

/*
 * Creates or attaches to the struct; from the module's shmem_startup_hook,
 * which holds AddinShmemInitLock.
 */
void
ub_export_shmem_startup(void)
{
	bool		found;

	ub_shared = ShmemInitStruct("usage_billing export", sizeof(UbExportShared), &found);
	if (!found)
	{
		memset(ub_shared, 0, sizeof(UbExportShared));
		SpinLockInit(&ub_shared->mutex);
	}
}

/* True when the library was preloaded and the struct exists. */
bool
ub_shmem_available(void)
{
	return ub_shared != NULL;
}

/* The worker announces itself so that export_now() can reach it. */
void
ub_shmem_set_worker(Latch *latch)
{
	if (!ub_shared)
		return;
	SpinLockAcquire(&ub_shared->mutex);
	ub_shared->worker_pid = MyProcPid;
	ub_shared->worker_latch = latch;
	SpinLockRelease(&ub_shared->mutex);
}

/* The worker withdraws on exit (before_shmem_exit), so nobody sets a dead latch. */
void
ub_shmem_clear_worker(void)
{
	if (!ub_shared)
		return;
	SpinLockAcquire(&ub_shared->mutex);
	if (ub_shared->worker_pid == MyProcPid)
	{
		ub_shared->worker_pid = 0;
		ub_shared->worker_latch = NULL;
	}
	SpinLockRelease(&ub_shared->mutex);
}

/* Sets the worker's latch; returns its pid, or 0 when no worker runs. */
pid_t
ub_shmem_wake_worker(void)
{
	pid_t		pid;
	Latch	   *latch;

	if (!ub_shared)
		return 0;
	SpinLockAcquire(&ub_shared->mutex);
	pid = ub_shared->worker_pid;
	latch = ub_shared->worker_latch;
	ub_shared->wake_requested = true;
	SpinLockRelease(&ub_shared->mutex);
	/* SetLatch is safe on a shared latch whose owner just exited: it only writes flags */
	if (latch)
		SetLatch(latch);
	return pid;
}

/*
 * True once per export_now() call (or several coalesced): the latch is also set by
 * signals, reloads and barriers, which must not count as a request.
 */
bool
ub_shmem_take_wake(void)
{
	bool		requested;

	if (!ub_shared)
		return false;
	SpinLockAcquire(&ub_shared->mutex);
	requested = ub_shared->wake_requested;
	ub_shared->wake_requested = false;
	SpinLockRelease(&ub_shared->mutex);
	return requested;
}

/* Adds one cycle's outcome to the counters. */
void
ub_shmem_count_cycle(int64 sent, int64 failed)
{
	if (!ub_shared)
		return;
	SpinLockAcquire(&ub_shared->mutex);
	ub_shared->cycles++;
	ub_shared->events_sent += sent;
	ub_shared->events_failed += failed;
	SpinLockRelease(&ub_shared->mutex);
}

/* Copies the worker's pid and counters, for usage_billing.export_worker_info(). */
void
ub_shmem_read_stats(pid_t *pid, int64 *cycles, int64 *sent, int64 *failed)
{
	*pid = 0;
	*cycles = *sent = *failed = 0;
	if (!ub_shared)
		return;
	SpinLockAcquire(&ub_shared->mutex);
	*pid = ub_shared->worker_pid;
	*cycles = ub_shared->cycles;
	*sent = ub_shared->events_sent;
	*failed = ub_shared->events_failed;
	SpinLockRelease(&ub_shared->mutex);
}

/* usage_billing.export_now(): sets the worker's latch so that it exports at once. */
Datum
ub_export_now(PG_FUNCTION_ARGS)
{
	if (!ub_shmem_available())
	{
		ereport(NOTICE,
				(errmsg("the usage_billing export worker is not running"),
				 errdetail("The library usage_billing is not in shared_preload_libraries."),
				 errhint("Add usage_billing to shared_preload_libraries and restart the server.")));
		PG_RETURN_VOID();
	}
	/* wake now, and again once this transaction's usage is visible to the worker */
	if (!ub_xact_cb_registered)
	{
		RegisterXactCallback(ub_export_now_xact_cb, NULL);
		ub_xact_cb_registered = true;
	}
	ub_wake_at_commit = true;
	if (ub_shmem_wake_worker() == 0)
		ereport(NOTICE,
				(errmsg("the usage_billing export worker is not running"),
				 errdetail("It starts with the server and restarts within 10 seconds after a crash."),
				 errhint("Check the server log for its last messages.")));
	PG_RETURN_VOID();
}

/* Wakes the worker at commit of a transaction that called export_now(). */
static void
ub_export_now_xact_cb(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && ub_wake_at_commit)
		(void) ub_shmem_wake_worker();
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT)
		ub_wake_at_commit = false;
}

/* usage_billing.export_worker_info(): the worker's pid and counters since server start. */
Datum
ub_export_worker_info(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};
	pid_t		pid;
	int64		cycles;
	int64		sent;
	int64		failed;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	ub_shmem_read_stats(&pid, &cycles, &sent, &failed);
	values[0] = BoolGetDatum(ub_shmem_available());
	values[1] = Int32GetDatum((int32) pid);
	nulls[1] = (pid == 0);
	values[2] = Int64GetDatum(cycles);
	values[3] = Int64GetDatum(sent);
	values[4] = Int64GetDatum(failed);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
