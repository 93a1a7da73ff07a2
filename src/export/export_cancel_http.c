/*-------------------------------------------------------------------------
 * export_cancel_http.c
 *	  The HTTP side of export corrections: one synchronous
 *	  POST /v1/billing/meter_event_adjustments (type=cancel) per cancel,
 *	  with a libcurl easy handle, and the classification of its answer.
 *
 * Vocabulary (see export_cancel.c for the rule and the run)
 *   answer      the status, body and headers of one request, in fixed
 *               buffers: the callbacks never allocate, so they never throw
 *               through libcurl's stack frames
 *   outcome     cancelled (2xx, or a refusal saying "already cancelled"),
 *               retry (no answer, 409, 429, 5xx, 401/403,
 *               idempotency_error, or Stripe-Should-Retry: true; with a new
 *               Idempotency-Key after an error answer, since Stripe replays
 *               saved answers, 500s included) or refused (any other 4xx,
 *               e.g. the event is older than 24 h)
 *
 * The handle and header list are freed on every path (PG_FINALLY); the key
 * only goes into the Authorization header and never into a message.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>
#include <cjson/cJSON.h>

#include "common/pg_prng.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"

#include "export_cancel.h"

/* answers are small; anything bigger is cut (and still classified by status) */
#define UB_CANCEL_MAX_BODY		8192
#define UB_CANCEL_HDR_LEN		64

/* one answer, in fixed buffers: the callbacks never allocate */
typedef struct UbCancelAnswer
{
	size_t		len;
	bool		truncated;
	char		body[UB_CANCEL_MAX_BODY + 1];
	char		request_id[UB_REQUEST_ID_LEN];
	char		retry_after[UB_CANCEL_HDR_LEN];
	char		should_retry[UB_CANCEL_HDR_LEN];
	char		errbuf[CURL_ERROR_SIZE];
} UbCancelAnswer;

static void ub_cancel_classify(UbCancel *c, UbCancelAnswer *ans, long status,
							   const UbStripeConfig *cfg);
static int	ub_cancel_backoff_ms(int attempts, const UbStripeConfig *cfg);
static bool ub_cancel_already_done(long status, const char *code, const char *message);

/* libcurl write callback: copies into the answer's fixed buffer, drops the excess. */
static size_t
ub_cancel_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	UbCancelAnswer *ans = (UbCancelAnswer *) userdata;
	size_t		n = size * nmemb;
	size_t		room = UB_CANCEL_MAX_BODY - ans->len;

	if (n > room)
	{
		ans->truncated = true;
		n = room;
	}
	memcpy(ans->body + ans->len, ptr, n);
	ans->len += n;
	ans->body[ans->len] = '\0';
	return size * nmemb;
}

/* libcurl header callback: keeps Request-Id, Retry-After and Stripe-Should-Retry. */
static size_t
ub_cancel_header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	UbCancelAnswer *ans = (UbCancelAnswer *) userdata;
	size_t		len = size * nitems;

	if (len > 11 && pg_strncasecmp(buffer, "request-id:", 11) == 0)
		ub_stripe_header_value(buffer, len, 11, ans->request_id, sizeof(ans->request_id));
	else if (len > 12 && pg_strncasecmp(buffer, "retry-after:", 12) == 0)
		ub_stripe_header_value(buffer, len, 12, ans->retry_after, sizeof(ans->retry_after));
	else if (len > 20 && pg_strncasecmp(buffer, "stripe-should-retry:", 20) == 0)
		ub_stripe_header_value(buffer, len, 20, ans->should_retry, sizeof(ans->should_retry));
	return len;
}

/* libcurl progress callback: aborts the transfer when SIGTERM (or a cancel) is pending. */
static int
ub_cancel_progress_cb(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
					  curl_off_t ultotal, curl_off_t ulnow)
{
	return InterruptPending ? 1 : 0;
}

/* Appends name=value, form-urlencoded, to the body. */
static void
ub_cancel_field(StringInfo buf, const char *name, const char *value)
{
	char	   *esc = curl_easy_escape(NULL, value, 0);

	if (esc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while encoding a meter event cancel")));
	if (buf->len > 0)
		appendStringInfoChar(buf, '&');
	appendStringInfo(buf, "%s=%s", name, esc);
	curl_free(esc);
}

/* Exponential backoff with "equal jitter", as for meter events. */
static int
ub_cancel_backoff_ms(int attempts, const UbStripeConfig *cfg)
{
	double		d = cfg->backoff_base_ms;

	for (int i = 0; i < attempts && d < cfg->backoff_max_ms; i++)
		d *= 2;
	if (d > cfg->backoff_max_ms)
		d = cfg->backoff_max_ms;
	return (int) (d / 2 + pg_prng_double(&pg_global_prng_state) * d / 2);
}

/*
 * One synchronous cancel request; fills the cancel's outcome.  The easy
 * handle and header list are freed on every path, errors included.
 */
void
ub_cancel_send(UbCancel *c, const UbStripeConfig *cfg, const char *url, const char *auth)
{
	CURL	   *volatile easy = NULL;
	struct curl_slist *volatile headers = NULL;
	UbCancelAnswer *ans = palloc0(sizeof(UbCancelAnswer));
	StringInfoData form;
	char	   *idem = psprintf("Idempotency-Key: %s", c->idempotency_key);
	char	   *version = psprintf("Stripe-Version: %s", cfg->stripe_version ? cfg->stripe_version : "");

	initStringInfo(&form);
	ub_cancel_field(&form, "event_name", c->event_name);
	ub_cancel_field(&form, "type", "cancel");
	ub_cancel_field(&form, "cancel%5Bidentifier%5D", c->identifier);

	PG_TRY();
	{
		struct curl_slist *h;
		CURLcode	res;
		long		status = 0;

		easy = curl_easy_init();
		if (easy == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("could not create a libcurl handle")));
		h = curl_slist_append(NULL, auth);
		if (h)
			headers = h;
		h = h ? curl_slist_append(h, idem) : NULL;
		h = h ? curl_slist_append(h, "Content-Type: application/x-www-form-urlencoded") : NULL;
		h = h ? curl_slist_append(h, "Expect:") : NULL;
		if (h && cfg->stripe_version && cfg->stripe_version[0])
			h = curl_slist_append(h, version);
		if (h == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory while building request headers")));

		curl_easy_setopt(easy, CURLOPT_URL, url);
		curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
		curl_easy_setopt(easy, CURLOPT_POST, 1L);
		curl_easy_setopt(easy, CURLOPT_POSTFIELDS, form.data);
		curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, (long) form.len);
		curl_easy_setopt(easy, CURLOPT_HTTPHEADER, headers);
		curl_easy_setopt(easy, CURLOPT_USERAGENT, "usage_billing/1.0 (PostgreSQL extension)");
		curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, ub_cancel_write_cb);
		curl_easy_setopt(easy, CURLOPT_WRITEDATA, ans);
		curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, ub_cancel_header_cb);
		curl_easy_setopt(easy, CURLOPT_HEADERDATA, ans);
		curl_easy_setopt(easy, CURLOPT_XFERINFOFUNCTION, ub_cancel_progress_cb);
		curl_easy_setopt(easy, CURLOPT_NOPROGRESS, 0L);
		curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, ans->errbuf);
		curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, (long) cfg->connect_timeout_ms);
		curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long) cfg->timeout_ms);
		curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
		curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");

		res = curl_easy_perform(easy);
		CHECK_FOR_INTERRUPTS();
		if (res != CURLE_OK)
		{
			/* no answer: Stripe may or may not have cancelled; the same key goes again */
			c->outcome = "retry";
			c->http_status = 0;
			snprintf(c->error, sizeof(c->error), "network error: %s",
					 ans->errbuf[0] ? ans->errbuf : curl_easy_strerror(res));
			c->retry_in_ms = ub_cancel_backoff_ms(c->attempts, cfg);
		}
		else
		{
			curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
			ub_cancel_classify(c, ans, status, cfg);
		}
	}
	PG_FINALLY();
	{
		if (easy)
			curl_easy_cleanup(easy);
		if (headers)
			curl_slist_free_all(headers);
	}
	PG_END_TRY();
	pfree(form.data);
	pfree(idem);
	pfree(version);
	pfree(ans);
}

/*
 * True when a refusal says that the event is already cancelled.  The answer's
 * form is not documented: its code (if any) or message mentions "already" and
 * "cancel" (or "cancelled"/"canceled").  That means the event no longer
 * counts in Stripe, whoever cancelled it: typically our own earlier attempt,
 * processed but answered with a 5xx or lost, then retried with a new
 * Idempotency-Key.  It is recorded as cancelled, so that the value leaves
 * "planned" exactly once and no other (older) event is cancelled for it.
 */
static bool
ub_cancel_already_done(long status, const char *code, const char *message)
{
	char		text[UB_ERROR_LEN + UB_CANCEL_HDR_LEN];

	if (status < 400 || status >= 500 || status == 429 || status == 409)
		return false;
	snprintf(text, sizeof(text), "%s %s", code, message);
	for (char *p = text; *p; p++)
		*p = pg_tolower((unsigned char) *p);
	return strstr(text, "already") != NULL && strstr(text, "cancel") != NULL;
}

/* Turns an HTTP answer into the cancel's outcome, as stripe_client.c does for meter events. */
static void
ub_cancel_classify(UbCancel *c, UbCancelAnswer *ans, long status, const UbStripeConfig *cfg)
{
	char		type[UB_CANCEL_HDR_LEN] = "";
	char		code[UB_CANCEL_HDR_LEN] = "";
	char		message[UB_ERROR_LEN - 64] = "";
	int			retry_after_ms = -1;

	c->http_status = (int) status;
	strlcpy(c->request_id, ans->request_id, sizeof(c->request_id));
	c->rotate_key = false;
	c->throttled = false;
	c->retry_in_ms = 0;
	if (status >= 200 && status < 300)
	{
		c->outcome = "cancelled";
		c->error[0] = '\0';
		return;
	}

	if (ans->len > 0)
	{
		cJSON	   *root = cJSON_ParseWithLength(ans->body, ans->len);
		cJSON	   *err = root ? cJSON_GetObjectItemCaseSensitive(root, "error") : NULL;

		/* nothing here can throw: copy into fixed buffers, then free */
		if (cJSON_IsObject(err))
		{
			cJSON	   *item = cJSON_GetObjectItemCaseSensitive(err, "type");

			if (cJSON_IsString(item) && item->valuestring)
				strlcpy(type, item->valuestring, sizeof(type));
			item = cJSON_GetObjectItemCaseSensitive(err, "code");
			if (cJSON_IsString(item) && item->valuestring)
				strlcpy(code, item->valuestring, sizeof(code));
			item = cJSON_GetObjectItemCaseSensitive(err, "message");
			if (cJSON_IsString(item) && item->valuestring)
				strlcpy(message, item->valuestring, sizeof(message));
		}
		cJSON_Delete(root);
	}
	snprintf(c->error, sizeof(c->error), "cancel %s: HTTP %ld%s%s%s%s: %s", c->identifier, status,
			 type[0] ? " " : "", type, code[0] ? "/" : "", code,
			 message[0] ? message : (ans->truncated ? "(answer too large)" : "(no message)"));
	ub_redact_keys(c->error, cfg->api_key);

	if (ans->retry_after[0])
	{
		char	   *end;
		long		secs = strtol(ans->retry_after, &end, 10);

		if (end != ans->retry_after && secs >= 0)
			retry_after_ms = (int) Min(secs, 3600) * 1000;
	}
	if (ub_cancel_already_done(status, code, message))
		c->outcome = "cancelled";
	else if (strcmp(ans->should_retry, "false") == 0)
		c->outcome = "refused";
	else if (strcmp(ans->should_retry, "true") == 0 ||
			 status == 409 || status == 429 || status >= 500 ||
			 status == 401 || status == 403 ||
			 strcmp(type, "idempotency_error") == 0)
		c->outcome = "retry";
	else
		c->outcome = "refused";	/* e.g. older than 24 h: the value needs a manual credit */

	if (strcmp(c->outcome, "retry") == 0)
	{
		c->retry_in_ms = retry_after_ms >= 0 ? retry_after_ms : ub_cancel_backoff_ms(c->attempts, cfg);
		c->rotate_key = (status >= 500 || strcmp(type, "idempotency_error") == 0);
		c->throttled = (status == 429);
	}
}
