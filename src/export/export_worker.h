/*-------------------------------------------------------------------------
 * export_worker.h
 *	  The Stripe export worker: settings, loop and its database side.
 *-------------------------------------------------------------------------
 */
#ifndef UB_EXPORT_WORKER_H
#define UB_EXPORT_WORKER_H

#include "postgres.h"
#include "fmgr.h"

#include "stripe_client.h"

/* export_worker.c */
extern void ub_export_init(void);
extern PGDLLEXPORT void ub_export_worker_main(Datum main_arg);

/* export_outbox.c */
extern bool ub_outbox_extension_installed(void);
extern bool ub_outbox_has_accounts(void);
extern int	ub_outbox_plan(int max_rows);
extern UbMeterEvent *ub_outbox_fetch(int limit, MemoryContext cxt, int *n);
extern void ub_outbox_record(UbMeterEvent *events, int n, int64 *sent, int64 *failed);
extern long ub_outbox_next_due_ms(void);

#endif							/* UB_EXPORT_WORKER_H */
