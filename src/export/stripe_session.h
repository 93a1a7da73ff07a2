/*-------------------------------------------------------------------------
 * stripe_session.h
 *	  The v2 meter event session: its token and expiry.
 *-------------------------------------------------------------------------
 */
#ifndef UB_STRIPE_SESSION_H
#define UB_STRIPE_SESSION_H

#include "stripe_client.h"

extern bool ub_session_usable(const UbStripeConfig *cfg);
extern bool ub_session_open(const UbStripeConfig *cfg, char *error, size_t errlen,
							int *http_status, char *request_id);
extern const char *ub_session_token(void);
extern uint64 ub_session_generation(void);
extern void ub_session_expired(uint64 generation);
extern void ub_session_forget(void);

#endif							/* UB_STRIPE_SESSION_H */
