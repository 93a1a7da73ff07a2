/*-------------------------------------------------------------------------
 * usage_billing.c
 *	  Module entry point: _PG_init and the one shared-memory hook chain.
 *
 * Every subsystem defines its settings next to their variables (catalog.c,
 * record_prepare.c, escrow.c, finalize.c, export_worker.c, export_cancel.c)
 * and exposes an init function, called here.  When the library is
 * preloaded, the shared memory of the export worker (export_shmem.c), of
 * reconciliation requests (reconcile.c) and of the alert queue (alerts.c)
 * is requested and created through one pair of
 * hooks, and the export worker is registered.  The SQL functions also work
 * when the library is not preloaded: then the worker simply does not run
 * and the alert queue is the backend's own.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/guc.h"

#include "alerts.h"
#include "catalog.h"
#include "catalog_preload.h"
#include "escrow.h"
#include "export_cancel.h"
#include "export_shmem.h"
#include "export_worker.h"
#include "finalize.h"
#include "reconcile.h"
#include "record.h"
#include "usage_billing.h"

PG_MODULE_MAGIC;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void ub_shmem_request(void);
static void ub_shmem_startup(void);

/* Defines the settings and, when preloaded, the shared memory and the worker. */
void
_PG_init(void)
{
	ub_catalog_init();
	ub_input_init();
	ub_escrow_init();
	ub_catalog_preload_init();
	ub_invoice_init();
	ub_export_init();
	ub_cancel_init();

	MarkGUCPrefixReserved("usage_billing");

	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = ub_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = ub_shmem_startup;
}

/* Asks the postmaster for the room of every subsystem (PG15 shmem_request_hook). */
static void
ub_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	ub_export_shmem_request();
	ub_reconcile_shmem_request();
	ub_alerts_shmem_request();
}

/* Creates or attaches to every subsystem's struct; runs in the postmaster and in EXEC_BACKEND children. */
static void
ub_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	ub_export_shmem_startup();
	ub_reconcile_shmem_startup();
	ub_alerts_shmem_startup();
	LWLockRelease(AddinShmemInitLock);
}
