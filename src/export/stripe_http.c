/*-------------------------------------------------------------------------
 * stripe_http.c
 *	  The one HTTP layer every Stripe request of the export goes through:
 *	  v1 meter events (stripe_client.c) and the v2 meter event stream
 *	  (stripe_stream.c), both on libcurl multi; the v2 session
 *	  (stripe_session.c), cancels (export_cancel_http.c) and event summaries
 *	  (reconcile_http.c), synchronous.
 *
 * Vocabulary
 *   request   an easy handle with its header list and body, set up in one
 *             place (ub_http_setup, through ub_http_prepare for v1's forms
 *             and GETs, ub_http_prepare_json for v2's JSON): timeouts, no
 *             redirects, http(s) only, and the headers Authorization (the
 *             key, or a v2 session token), Stripe-Version, Idempotency-Key
 *             (v1 POSTs) and, when the customer belongs to a connected
 *             account, Stripe-Account (v1) or Stripe-Context (v2)
 *   answer    status, body and the headers Request-Id, Retry-After and
 *             Stripe-Should-Retry, copied into fixed buffers by callbacks
 *             that never allocate (so they never throw through libcurl)
 *   verdict   OK (2xx), RETRY (no answer, 409, 429, 5xx, 401/403,
 *             idempotency_error, Stripe-Should-Retry: true) or REFUSED (any
 *             other 4xx, or Stripe-Should-Retry: false); after an error
 *             answer a retry needs a new Idempotency-Key, since Stripe
 *             replays saved answers, 500s included
 *   backoff   exponential with "equal jitter", capped; Retry-After wins
 *
 * The key (or a session token) only goes into the Authorization header:
 * the header line is wiped once libcurl copied it, and the copies are wiped
 * before they are freed (ub_http_release).  Messages built from Stripe's answers are redacted (redact.c).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <cjson/cJSON.h>

#include "common/pg_prng.h"
#include "miscadmin.h"

#include "stripe_http.h"

static bool ub_http_initialized = false;
static CURLM *ub_http_multi_handle = NULL;

static size_t ub_http_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata);
static size_t ub_http_header_cb(char *buffer, size_t size, size_t nitems, void *userdata);
static int	ub_http_progress_cb(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
								curl_off_t ultotal, curl_off_t ulnow);
static void ub_http_header_value(const char *line, size_t len, size_t name_len,
								 char *dst, size_t dstlen);
static struct curl_slist *ub_http_append(struct curl_slist *h, const char *line);

/* Initializes libcurl's globals once per process. */
void
ub_http_init(void)
{
	if (ub_http_initialized)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not initialize libcurl")));
	ub_http_initialized = true;
}

/*
 * The process's one multi handle, for the requests of a batch (v1 meter
 * events or v2 stream requests), with libcurl's globals initialized; it
 * lives across batches, keeping the connection cache warm.
 */
CURLM *
ub_http_multi(int maxconnects)
{
	ub_http_init();
	if (ub_http_multi_handle == NULL)
	{
		ub_http_multi_handle = curl_multi_init();
		if (ub_http_multi_handle == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("could not create a libcurl multi handle")));
	}
	curl_multi_setopt(ub_http_multi_handle, CURLMOPT_MAXCONNECTS, (long) Max(maxconnects, 1));
	return ub_http_multi_handle;
}

/* Frees the multi handle and libcurl's globals at worker exit; safe to call twice. */
void
ub_http_shutdown(void)
{
	if (ub_http_multi_handle)
	{
		curl_multi_cleanup(ub_http_multi_handle);
		ub_http_multi_handle = NULL;
	}
	if (ub_http_initialized)
	{
		curl_global_cleanup();
		ub_http_initialized = false;
	}
}

/* libcurl write callback: copies into the answer's fixed buffer, drops the excess. */
static size_t
ub_http_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	UbHttpAnswer *ans = (UbHttpAnswer *) userdata;
	size_t		n = size * nmemb;
	size_t		room = UB_HTTP_MAX_BODY - ans->len;

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

/* Copies a header line's value, trimmed, into a fixed buffer. */
static void
ub_http_header_value(const char *line, size_t len, size_t name_len, char *dst, size_t dstlen)
{
	size_t		i = name_len;
	size_t		j;

	while (i < len && (line[i] == ' ' || line[i] == '\t'))
		i++;
	j = len;
	while (j > i && (line[j - 1] == '\r' || line[j - 1] == '\n' || line[j - 1] == ' '))
		j--;
	if (j - i >= dstlen)
		j = i + dstlen - 1;
	memcpy(dst, line + i, j - i);
	dst[j - i] = '\0';
}

/* libcurl header callback: keeps Request-Id, Retry-After and Stripe-Should-Retry. */
static size_t
ub_http_header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	UbHttpAnswer *ans = (UbHttpAnswer *) userdata;
	size_t		len = size * nitems;

	if (len > 11 && pg_strncasecmp(buffer, "request-id:", 11) == 0)
		ub_http_header_value(buffer, len, 11, ans->request_id, sizeof(ans->request_id));
	else if (len > 12 && pg_strncasecmp(buffer, "retry-after:", 12) == 0)
		ub_http_header_value(buffer, len, 12, ans->retry_after, sizeof(ans->retry_after));
	else if (len > 20 && pg_strncasecmp(buffer, "stripe-should-retry:", 20) == 0)
		ub_http_header_value(buffer, len, 20, ans->should_retry, sizeof(ans->should_retry));
	return len;
}

/* libcurl progress callback of synchronous requests: aborts when SIGTERM (or a cancel) is pending. */
static int
ub_http_progress_cb(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
					curl_off_t ultotal, curl_off_t ulnow)
{
	return InterruptPending ? 1 : 0;
}

/* Appends name=value, form-urlencoded, to a body (or a query string). */
void
ub_http_form_add(StringInfo buf, const char *name, const char *value)
{
	char	   *esc = curl_easy_escape(NULL, value, 0);

	if (esc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while encoding a Stripe request")));
	if (buf->len > 0)
		appendStringInfoChar(buf, '&');
	appendStringInfo(buf, "%s=%s", name, esc);
	curl_free(esc);
}

/* Appends one header line (NULL list stays NULL: out of memory is raised by the caller). */
static struct curl_slist *
ub_http_append(struct curl_slist *h, const char *line)
{
	struct curl_slist *n = curl_slist_append(h, line);

	if (n == NULL && h != NULL)
		curl_slist_free_all(h);
	return n;
}

/*
 * Sets up one request, the one place every Stripe request is built.  body is
 * a palloc'd body the request takes over (NULL: a GET), sent as JSON when
 * json is set, else form-urlencoded.  bearer goes into the Authorization
 * header (the secret key, or a v2 session token); idempotency_key and the
 * account are optional, the account sent in the header account_header
 * names.  The answer buffer must be set in req->answer.  On error
 * everything allocated so far is left in req for ub_http_release.
 */
static void
ub_http_setup(UbHttpRequest *req, const UbStripeConfig *cfg, const char *url, char *body,
			  bool json, const char *bearer, const char *idempotency_key,
			  const char *account_header, const char *account)
{
	UbHttpAnswer *ans = req->answer;
	struct curl_slist *h;
	char	   *line;

	ans->len = 0;
	ans->truncated = false;
	ans->body[0] = '\0';
	ans->request_id[0] = ans->retry_after[0] = ans->should_retry[0] = ans->errbuf[0] = '\0';
	req->body = body;
	req->headers = NULL;

	req->easy = curl_easy_init();
	if (req->easy == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));

	/* the key or token: only here, and the line is wiped once libcurl copied it */
	line = psprintf("Authorization: Bearer %s", bearer ? bearer : "");
	h = ub_http_append(NULL, line);
	explicit_bzero(line, strlen(line));
	pfree(line);
	if (h && cfg->stripe_version && cfg->stripe_version[0])
	{
		line = psprintf("Stripe-Version: %s", cfg->stripe_version);
		h = ub_http_append(h, line);
		pfree(line);
	}
	if (h && account && account[0])
	{
		line = psprintf("%s: %s", account_header, account);
		h = ub_http_append(h, line);
		pfree(line);
	}
	if (h && body != NULL)
	{
		if (idempotency_key && idempotency_key[0])
		{
			line = psprintf("Idempotency-Key: %s", idempotency_key);
			h = ub_http_append(h, line);
			pfree(line);
		}
		if (h)
			h = ub_http_append(h, json ? "Content-Type: application/json" :
							   "Content-Type: application/x-www-form-urlencoded");
		if (h)
			h = ub_http_append(h, "Expect:");
	}
	if (h == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while building request headers")));
	req->headers = h;

	curl_easy_setopt(req->easy, CURLOPT_URL, url);
	curl_easy_setopt(req->easy, CURLOPT_NOSIGNAL, 1L);
	if (body != NULL)
	{
		curl_easy_setopt(req->easy, CURLOPT_POST, 1L);
		curl_easy_setopt(req->easy, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(req->easy, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	}
	else
		curl_easy_setopt(req->easy, CURLOPT_HTTPGET, 1L);
	curl_easy_setopt(req->easy, CURLOPT_HTTPHEADER, req->headers);
	curl_easy_setopt(req->easy, CURLOPT_USERAGENT, "usage_billing/1.0 (PostgreSQL extension)");
	curl_easy_setopt(req->easy, CURLOPT_WRITEFUNCTION, ub_http_write_cb);
	curl_easy_setopt(req->easy, CURLOPT_WRITEDATA, ans);
	curl_easy_setopt(req->easy, CURLOPT_HEADERFUNCTION, ub_http_header_cb);
	curl_easy_setopt(req->easy, CURLOPT_HEADERDATA, ans);
	curl_easy_setopt(req->easy, CURLOPT_ERRORBUFFER, ans->errbuf);
	curl_easy_setopt(req->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) cfg->connect_timeout_ms);
	curl_easy_setopt(req->easy, CURLOPT_TIMEOUT_MS, (long) cfg->timeout_ms);
	curl_easy_setopt(req->easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(req->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(req->easy, CURLOPT_TCP_KEEPALIVE, 1L);
	req->started = GetCurrentTimestamp();
}

/*
 * A v1 request with the secret key: form is a palloc'd form body the request
 * takes over (NULL: a GET); idempotency_key (POSTs) and stripe_account
 * (Connect, sent as Stripe-Account) are optional.
 */
void
ub_http_prepare(UbHttpRequest *req, const UbStripeConfig *cfg, const char *url, char *form,
				const char *idempotency_key, const char *stripe_account)
{
	ub_http_setup(req, cfg, url, form, false, cfg->api_key, idempotency_key,
				  "Stripe-Account", stripe_account);
}

/*
 * A v2 JSON POST: json is a palloc'd body the request takes over, bearer the
 * secret key (opening a session) or a session token (the stream).  A
 * connected account goes into Stripe-Context, v2's header for it (it
 * supersedes Stripe-Account); NULL or empty: the platform.  No
 * Idempotency-Key: v2's meter events deduplicate by identifier.
 */
void
ub_http_prepare_json(UbHttpRequest *req, const UbStripeConfig *cfg, const char *url, char *json,
					 const char *bearer, const char *stripe_context)
{
	ub_http_setup(req, cfg, url, json, true, bearer, NULL, "Stripe-Context", stripe_context);
}

/*
 * Runs a prepared request synchronously; *status is the HTTP status (0: no
 * answer).  A pending interrupt aborts the transfer and is then serviced.
 */
CURLcode
ub_http_perform(UbHttpRequest *req, long *status)
{
	CURLcode	res;

	*status = 0;
	curl_easy_setopt(req->easy, CURLOPT_XFERINFOFUNCTION, ub_http_progress_cb);
	curl_easy_setopt(req->easy, CURLOPT_NOPROGRESS, 0L);
	res = curl_easy_perform(req->easy);
	CHECK_FOR_INTERRUPTS();
	if (res == CURLE_OK)
		curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, status);
	return res;
}

/* Frees what libcurl allocated for a request (removing it from multi first); safe to call twice. */
void
ub_http_release(UbHttpRequest *req, CURLM *multi)
{
	if (req->easy)
	{
		if (multi)
			curl_multi_remove_handle(multi, req->easy);
		curl_easy_cleanup(req->easy);
		req->easy = NULL;
	}
	if (req->headers)
	{
		/* the Authorization line holds the key: wipe every copy before freeing */
		for (struct curl_slist *h = req->headers; h; h = h->next)
			if (h->data)
				explicit_bzero(h->data, strlen(h->data));
		curl_slist_free_all(req->headers);
		req->headers = NULL;
	}
	if (req->body)
	{
		pfree(req->body);
		req->body = NULL;
	}
}

/* Pulls type, code, param and message out of a Stripe error body; malformed bodies give empty strings. */
void
ub_http_parse_error(const char *body, size_t len, UbStripeError *err)
{
	cJSON	   *root;
	cJSON	   *e;
	cJSON	   *item;

	err->type[0] = err->code[0] = err->param[0] = err->message[0] = '\0';
	if (len == 0)
		return;
	root = cJSON_ParseWithLength(body, len);
	if (root == NULL)
		return;
	/* nothing below can throw: copy into fixed buffers, then free */
	e = cJSON_GetObjectItemCaseSensitive(root, "error");
	if (cJSON_IsObject(e))
	{
		item = cJSON_GetObjectItemCaseSensitive(e, "type");
		if (cJSON_IsString(item) && item->valuestring)
			strlcpy(err->type, item->valuestring, sizeof(err->type));
		item = cJSON_GetObjectItemCaseSensitive(e, "code");
		if (cJSON_IsString(item) && item->valuestring)
			strlcpy(err->code, item->valuestring, sizeof(err->code));
		item = cJSON_GetObjectItemCaseSensitive(e, "param");
		if (cJSON_IsString(item) && item->valuestring)
			strlcpy(err->param, item->valuestring, sizeof(err->param));
		item = cJSON_GetObjectItemCaseSensitive(e, "message");
		if (cJSON_IsString(item) && item->valuestring)
			strlcpy(err->message, item->valuestring, sizeof(err->message));
	}
	cJSON_Delete(root);
}

/*
 * The rule every Stripe request follows: 2xx OK; Stripe-Should-Retry
 * decides when present; else 409, 429, 5xx, 401/403 and idempotency_error
 * are retried and any other 4xx is refused.  *rotate_key: a retry after an
 * error answer needs a new Idempotency-Key (Stripe replays saved answers).
 */
UbHttpVerdict
ub_http_verdict(long status, const UbHttpAnswer *ans, const UbStripeError *err, bool *rotate_key)
{
	UbHttpVerdict v;

	*rotate_key = false;
	if (status >= 200 && status < 300)
		return UB_HTTP_OK;
	if (strcmp(ans->should_retry, "false") == 0)
		v = UB_HTTP_REFUSED;
	else if (strcmp(ans->should_retry, "true") == 0 ||
			 status == 409 || status == 429 || status >= 500 ||
			 status == 401 || status == 403 ||
			 strcmp(err->type, "idempotency_error") == 0)
		v = UB_HTTP_RETRY;
	else
		v = UB_HTTP_REFUSED;
	if (v == UB_HTTP_RETRY)
		*rotate_key = (status >= 500 || strcmp(err->type, "idempotency_error") == 0);
	return v;
}

/* Exponential backoff with "equal jitter": half fixed, half random, capped. */
int
ub_http_backoff_ms(int attempts, const UbStripeConfig *cfg)
{
	double		d = cfg->backoff_base_ms;

	for (int i = 0; i < attempts && d < cfg->backoff_max_ms; i++)
		d *= 2;
	if (d > cfg->backoff_max_ms)
		d = cfg->backoff_max_ms;
	return (int) (d / 2 + pg_prng_double(&pg_global_prng_state) * d / 2);
}

/* The delay before a retry: Retry-After when the answer has one (at most an hour), else the backoff. */
int
ub_http_retry_ms(const UbHttpAnswer *ans, int attempts, const UbStripeConfig *cfg)
{
	if (ans != NULL && ans->retry_after[0])
	{
		char	   *end;
		long		secs = strtol(ans->retry_after, &end, 10);

		if (end != ans->retry_after && secs >= 0)
			return (int) Min(secs, 3600) * 1000;
	}
	return ub_http_backoff_ms(attempts, cfg);
}

/* "<prefix>HTTP <status> <type>/<code>: <message>", with keys masked. */
void
ub_http_describe(char *dst, size_t dstlen, const char *prefix, long status,
				 const UbStripeError *err, const UbHttpAnswer *ans, const char *api_key)
{
	snprintf(dst, dstlen, "%sHTTP %ld%s%s%s%s: %s", prefix ? prefix : "", status,
			 err->type[0] ? " " : "", err->type, err->code[0] ? "/" : "", err->code,
			 err->message[0] ? err->message : (ans->truncated ? "(answer too large)" : "(no message)"));
	ub_redact_keys(dst, api_key);
}
