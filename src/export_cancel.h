/*-------------------------------------------------------------------------
 * export_cancel.h
 *	  Export corrections: cancelling meter events above a lowered total, and
 *	  the export worker's per-cycle alert flush.
 *-------------------------------------------------------------------------
 */
#ifndef UB_EXPORT_CANCEL_H
#define UB_EXPORT_CANCEL_H

#include "postgres.h"

#include "stripe_client.h"

extern void ub_cancel_init(void);
extern void ub_cancel_flush_alerts(void);
extern int	ub_cancel_run(const UbStripeConfig *cfg);
extern long ub_cancel_merge_due(long due_ms);

#endif							/* UB_EXPORT_CANCEL_H */
