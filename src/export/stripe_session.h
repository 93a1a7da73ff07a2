/*-------------------------------------------------------------------------
 * stripe_session.h
 *	  The v2 meter event session (its token and expiry) and the fixed-size
 *	  HTTP answer buffers of the v2 requests.
 *-------------------------------------------------------------------------
 */
#ifndef UB_STRIPE_SESSION_H
#define UB_STRIPE_SESSION_H

#include <curl/curl.h>

#include "stripe_client.h"

/* answers are small; anything bigger is cut (and still classified by status) */
#define UB_ANSWER_MAX		16384
#define UB_ANSWER_HEADER_LEN	64

/* One HTTP answer in fixed buffers: libcurl's callbacks never allocate, so never throw. */
typedef struct UbAnswer
{
	size_t		len;
	bool		truncated;
	char		body[UB_ANSWER_MAX + 1];
	char		request_id[UB_REQUEST_ID_LEN];
	char		retry_after[UB_ANSWER_HEADER_LEN];
	char		should_retry[UB_ANSWER_HEADER_LEN];
	char		errbuf[CURL_ERROR_SIZE];
} UbAnswer;

extern void ub_answer_reset(UbAnswer *a);
extern size_t ub_answer_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata);
extern size_t ub_answer_header_cb(char *buffer, size_t size, size_t nitems, void *userdata);

extern bool ub_session_usable(const UbStripeConfig *cfg);
extern bool ub_session_open(const UbStripeConfig *cfg, char *error, size_t errlen,
							int *http_status, char *request_id);
extern const char *ub_session_token(void);
extern uint64 ub_session_generation(void);
extern void ub_session_expired(uint64 generation);
extern void ub_session_forget(void);

#endif							/* UB_STRIPE_SESSION_H */
