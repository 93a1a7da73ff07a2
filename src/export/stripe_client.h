/*-------------------------------------------------------------------------
 * stripe_client.h
 *	  Sending meter events to Stripe: libcurl multi, pacing, classification
 *	  (the request itself is stripe_http.c's).
 *-------------------------------------------------------------------------
 */
#ifndef UB_STRIPE_CLIENT_H
#define UB_STRIPE_CLIENT_H

#define UB_REQUEST_ID_LEN	128
#define UB_ERROR_LEN		512

typedef struct UbStripeConfig
{
	const char *api_base;		/* e.g. https://api.stripe.com, no trailing / */
	const char *api_key;		/* secret: only ever goes into the Authorization header */
	const char *stripe_version;
	int			concurrency;	/* requests in flight */
	double		max_rps;		/* requests per second ceiling */
	int			connect_timeout_ms;
	int			timeout_ms;
	int			backoff_base_ms;
	int			backoff_max_ms;
} UbStripeConfig;

typedef enum UbOutcome
{
	UB_OUT_NOT_TRIED = 0,		/* not sent in this batch (shutdown, throttled) */
	UB_OUT_SENT,				/* Stripe holds the event */
	UB_OUT_RETRY,				/* unknown or refused for now: send again later */
	UB_OUT_FAILED				/* Stripe refused it for good (a 4xx retrying cannot fix) */
} UbOutcome;

typedef struct UbMeterEvent
{
	/* what to send (from the outbox row) */
	int64		outbox_id;
	char	   *identifier;
	char	   *idempotency_key;
	char	   *event_name;
	char	   *stripe_customer_id;
	char	   *stripe_account;	/* Connect: acct_... sent as Stripe-Account, or NULL */
	char	   *value;			/* whole number as decimal text */
	int64		timestamp;		/* Unix seconds */
	int			attempts;		/* earlier attempts, for the backoff */

	/* what happened */
	UbOutcome	outcome;
	int			http_status;	/* 0 = no HTTP answer */
	int			retry_in_ms;	/* when outcome is RETRY */
	bool		rotate_key;		/* an error answer was received: Stripe would replay it */
	int			duration_ms;
	char		request_id[UB_REQUEST_ID_LEN];
	char		error[UB_ERROR_LEN];
} UbMeterEvent;

extern void ub_stripe_send_batch(UbMeterEvent *events, int n, const UbStripeConfig *cfg,
								 bool *throttled);
extern void ub_stripe_shutdown(void);

/* shared with the v2 stream (stripe_stream.c) */
extern bool ub_take_token(double rps, long *wait_ms);
extern bool ub_refuse_unsendable(UbMeterEvent *ev);

/* export_secrets.c */
extern void ub_secrets_init(void);

#include "redact.h"

#endif							/* UB_STRIPE_CLIENT_H */
