/*-------------------------------------------------------------------------
 * stripe_http.h
 *	  The one HTTP layer of the Stripe export: request setup (v1 forms and
 *	  GETs, v2 JSON), form encoding, answer reading, error parsing,
 *	  classification and backoff.
 *-------------------------------------------------------------------------
 */
#ifndef UB_STRIPE_HTTP_H
#define UB_STRIPE_HTTP_H

#include <curl/curl.h>

#include "lib/stringinfo.h"
#include "utils/timestamp.h"

#include "stripe_client.h"

/* answers are small; anything bigger is cut (and still classified by status) */
#define UB_HTTP_MAX_BODY	16384
#define UB_HTTP_HDR_LEN		64

/* one answer, in fixed buffers: the libcurl callbacks never allocate, so never throw */
typedef struct UbHttpAnswer
{
	size_t		len;
	bool		truncated;
	char		body[UB_HTTP_MAX_BODY + 1];
	char		request_id[UB_REQUEST_ID_LEN];
	char		retry_after[UB_HTTP_HDR_LEN];
	char		should_retry[UB_HTTP_HDR_LEN];
	char		errbuf[CURL_ERROR_SIZE];
} UbHttpAnswer;

/* the fields of a Stripe error body ({"error": {...}}); empty strings when absent */
typedef struct UbStripeError
{
	char		type[UB_HTTP_HDR_LEN];
	char		code[UB_HTTP_HDR_LEN];
	char		param[UB_HTTP_HDR_LEN];
	char		message[UB_ERROR_LEN - 64];
} UbStripeError;

/* what an answer means for any Stripe request */
typedef enum UbHttpVerdict
{
	UB_HTTP_OK,					/* 2xx */
	UB_HTTP_RETRY,				/* unknown or temporary: the same request later */
	UB_HTTP_REFUSED				/* a 4xx that retrying cannot fix */
} UbHttpVerdict;

/* one request: its easy handle, headers, body and answer */
typedef struct UbHttpRequest
{
	CURL	   *easy;
	struct curl_slist *headers;
	char	   *body;			/* palloc'd form or JSON body; NULL for a GET */
	UbHttpAnswer *answer;		/* the caller's; reset by ub_http_prepare */
	TimestampTz started;
} UbHttpRequest;

extern void ub_http_init(void);
extern void ub_http_shutdown(void);
extern CURLM *ub_http_multi(int maxconnects);
extern void ub_http_form_add(StringInfo buf, const char *name, const char *value);
extern void ub_http_prepare(UbHttpRequest *req, const UbStripeConfig *cfg, const char *url,
							char *form, const char *idempotency_key,
							const char *stripe_account);
extern void ub_http_prepare_json(UbHttpRequest *req, const UbStripeConfig *cfg, const char *url,
								 char *json, const char *bearer, const char *stripe_context);
extern CURLcode ub_http_perform(UbHttpRequest *req, long *status);
extern void ub_http_release(UbHttpRequest *req, CURLM *multi);
extern void ub_http_parse_error(const char *body, size_t len, UbStripeError *err);
extern UbHttpVerdict ub_http_verdict(long status, const UbHttpAnswer *ans,
									 const UbStripeError *err, bool *rotate_key);
extern int	ub_http_retry_ms(const UbHttpAnswer *ans, int attempts, const UbStripeConfig *cfg);
extern int	ub_http_backoff_ms(int attempts, const UbStripeConfig *cfg);
extern void ub_http_describe(char *dst, size_t dstlen, const char *prefix, long status,
							 const UbStripeError *err, const UbHttpAnswer *ans,
							 const char *api_key);

#endif							/* UB_STRIPE_HTTP_H */
