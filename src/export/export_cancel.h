/*-------------------------------------------------------------------------
 * export_cancel.h
 *	  Export corrections: cancelling meter events above a lowered total.
 *-------------------------------------------------------------------------
 */
#ifndef UB_EXPORT_CANCEL_H
#define UB_EXPORT_CANCEL_H

#include "postgres.h"

#include "stripe_client.h"

/* one cancel of one sent meter event: a row of usage_billing.export_cancels, and its outcome */
typedef struct UbCancel
{
	/* what to send (from the export_cancels row) */
	int64		cancel_id;
	char	   *identifier;
	char	   *idempotency_key;
	char	   *event_name;
	char	   *stripe_account;	/* Connect: acct_... sent as Stripe-Account, or NULL */
	int			attempts;

	/* what happened */
	const char *outcome;		/* "cancelled", "refused" or "retry" */
	int			http_status;	/* 0 = no HTTP answer */
	int			retry_in_ms;
	bool		rotate_key;
	bool		throttled;
	char		request_id[UB_REQUEST_ID_LEN];
	char		error[UB_ERROR_LEN];
} UbCancel;

/* export_cancel.c */
extern void ub_cancel_init(void);
extern int	ub_cancel_run(const UbStripeConfig *cfg);
extern long ub_cancel_merge_due(long due_ms);

/* export_cancel_http.c */
extern void ub_cancel_send(UbCancel *c, const UbStripeConfig *cfg, const char *url);

#endif							/* UB_EXPORT_CANCEL_H */
