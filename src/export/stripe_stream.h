/*-------------------------------------------------------------------------
 * stripe_stream.h
 *	  Sending meter events through Stripe's v2 meter event stream: a session
 *	  token, up to 100 events per request.
 *-------------------------------------------------------------------------
 */
#ifndef UB_STRIPE_STREAM_H
#define UB_STRIPE_STREAM_H

#include "stripe_client.h"

/* usage_billing.stripe_api */
typedef enum UbStripeApi
{
	UB_STRIPE_API_V1 = 1,		/* POST /v1/billing/meter_events, one event per request */
	UB_STRIPE_API_V2 = 2		/* POST /v2/billing/meter_event_stream, up to 100 */
} UbStripeApi;

/* Stripe's limit of events in one meter event stream request */
#define UB_STREAM_MAX_EVENTS	100

extern int	ub_stripe_api;

extern void ub_stream_init(void);
extern void ub_stream_send_batch(UbMeterEvent *events, int n, const UbStripeConfig *cfg,
								 bool *throttled);
extern void ub_stream_shutdown(void);

#endif							/* UB_STRIPE_STREAM_H */
