/*-------------------------------------------------------------------------
 * usage_billing.h
 *	  Module-wide settings and error codes of usage_billing.
 *-------------------------------------------------------------------------
 */
#ifndef USAGE_BILLING_H
#define USAGE_BILLING_H

#include "utils/elog.h"

/* SQLSTATE PT402: a hard cap would be exceeded (PostgREST answers HTTP 402) */
#define ERRCODE_UB_HARD_CAP			MAKE_SQLSTATE('P','T','4','0','2')
/* SQLSTATE PT403: the customer is not active (PostgREST answers HTTP 403) */
#define ERRCODE_UB_NOT_ACTIVE		MAKE_SQLSTATE('P','T','4','0','3')

/* longest customer id, meter, plan or idempotency key we accept */
#define UB_MAX_NAME_LEN				200
#define UB_MAX_KEY_LEN				255

/* false: read customers, overrides and aggregates with SQL only (Citus) */
extern bool ub_direct_reads;

/* late events: seconds after a period's end; -1 = accept any past period */
extern int	ub_late_event_grace_seconds;
extern int	ub_late_event_action;
/* how far ahead of now() an event's occurred_at may be, in seconds */
extern int	ub_max_future_skew_seconds;

/* the defaults: Stripe's own windows (35 days back, 5 minutes ahead) */
#define UB_DEFAULT_LATE_EVENT_GRACE	(35 * 86400)
#define UB_DEFAULT_MAX_FUTURE_SKEW	300

#define UB_LATE_REJECT				0
#define UB_LATE_CURRENT_PERIOD		1

/* defined in export_worker.c: GUCs, shared memory and the worker */
extern void ub_export_init(void);

/* defined in alerts.c: shared memory for alerts that outlive a failed call */
extern void ub_alerts_init(void);

#endif							/* USAGE_BILLING_H */
