/*-------------------------------------------------------------------------
 * reconcile.h
 *	  Reconciliation with Stripe: reading event summaries back and
 *	  correcting the export's bookkeeping where Stripe differs.
 *-------------------------------------------------------------------------
 */
#ifndef UB_RECONCILE_H
#define UB_RECONCILE_H

#include "postgres.h"

#include "utils/timestamp.h"

#include "stripe_client.h"

/* one customer, meter and period to compare with Stripe, and what Stripe answered */
typedef struct UbSummaryCheck
{
	/* what to read (from usage_billing.reconcile_candidates) */
	char	   *customer_id;
	char	   *meter;
	TimestampTz period_start;
	TimestampTz period_end;
	int64		start_s;		/* the period in Unix seconds */
	int64		end_s;
	char	   *stripe_customer_id;
	char	   *stripe_account;	/* Connect: sent as Stripe-Account, or NULL */
	char	   *stripe_meter_id;
	char	   *exported;		/* what the database said Stripe holds, as text */

	/* what happened */
	bool		answered;		/* a value was read (else error says why) */
	bool		throttled;		/* 429: stop this run */
	int			http_status;
	char		value[64];		/* Stripe's aggregated_value, as numeric text */
	char		request_id[UB_REQUEST_ID_LEN];
	char		error[UB_ERROR_LEN];
} UbSummaryCheck;

/* reconcile.c */
extern void ub_reconcile_init(void);
extern void ub_reconcile_shmem_request(void);
extern void ub_reconcile_shmem_startup(void);
extern bool ub_reconcile_run(const UbStripeConfig *cfg);
extern void ub_reconcile_cycle_begin(void);
extern void ub_reconcile_cycle_end(void);
extern long ub_reconcile_merge_due(long due_ms);

/* reconcile_http.c */
extern void ub_reconcile_fetch(UbSummaryCheck *k, const UbStripeConfig *cfg);

#endif							/* UB_RECONCILE_H */
