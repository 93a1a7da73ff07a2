/*-------------------------------------------------------------------------
 * shmem.c
 *	  Shared memory of the export worker.
 *
 * One small struct, UbExportShared, lives in the main shared memory segment
 * when the library is preloaded: the worker's pid and latch, so that any
 * backend can wake it (export_now()), plus a few counters.  A spinlock
 * protects it; nothing here sleeps or allocates while holding it.
 *
 * Without shared_preload_libraries the struct does not exist and
 * ub_shmem_available() says so.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"

#include "shmem.h"

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
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void ub_shmem_request(void);
static void ub_shmem_startup(void);

/* Installs the hooks; called from _PG_init only while preloading. */
void
ub_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = ub_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = ub_shmem_startup;
}

/* Asks the postmaster for room for our struct (PG15 shmem_request_hook). */
static void
ub_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(UbExportShared)));
}

/* Creates or attaches to the struct; runs in the postmaster and in EXEC_BACKEND children. */
static void
ub_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	ub_shared = ShmemInitStruct("usage_billing export", sizeof(UbExportShared), &found);
	if (!found)
	{
		memset(ub_shared, 0, sizeof(UbExportShared));
		SpinLockInit(&ub_shared->mutex);
	}
	LWLockRelease(AddinShmemInitLock);
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
