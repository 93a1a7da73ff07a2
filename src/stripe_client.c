/*-------------------------------------------------------------------------
 * stripe_client.c
 *	  HTTP side of the export: sends a batch of meter events to Stripe's
 *	  POST /v1/billing/meter_events with libcurl's multi interface.
 *
 * Vocabulary
 *   batch     an array of UbMeterEvent, at most one per (customer, meter),
 *             sent with up to `concurrency` requests in flight
 *   slot      one in-flight request: its easy handle, headers, form body
 *             and a fixed-size answer buffer (callbacks never allocate, so
 *             they can never throw through libcurl's stack frames)
 *   bucket    token bucket enforcing the requests-per-second ceiling; it
 *             lives across batches, as does the multi handle (which keeps
 *             the connection cache warm)
 *   outcome   SENT, RETRY (with a delay: Retry-After when given, else
 *             exponential backoff with jitter) or FAILED (a 4xx that retrying
 *             cannot fix, with Stripe's message)
 *
 * No transaction is open while this runs.  Everything libcurl and cJSON
 * allocate is freed on every path (PG_FINALLY); the API key only goes into
 * the Authorization header, and Stripe's error messages are redacted
 * (export_secrets.c) before they are stored.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include <curl/curl.h>
#include <cjson/cJSON.h>

#include "common/pg_prng.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/timestamp.h"

#include "stripe_client.h"

/* answers are small; anything bigger is cut (and still classified by status) */
#define UB_MAX_BODY		16384
#define UB_HEADER_LEN	64

typedef struct UbSlot
{
	CURL	   *easy;
	struct curl_slist *headers;
	char	   *form;			/* palloc'd form body */
	UbMeterEvent *ev;
	TimestampTz started;
	size_t		body_len;
	bool		body_truncated;
	char		body[UB_MAX_BODY + 1];
	char		request_id[UB_REQUEST_ID_LEN];
	char		retry_after[UB_HEADER_LEN];
	char		should_retry[UB_HEADER_LEN];
	char		errbuf[CURL_ERROR_SIZE];
} UbSlot;

static CURLM *ub_multi = NULL;
static bool ub_curl_initialized = false;
static double ub_tokens = 1.0;
static TimestampTz ub_tokens_at = 0;

static size_t ub_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata);
static size_t ub_header_cb(char *buffer, size_t size, size_t nitems, void *userdata);
static void ub_append_field(StringInfo buf, const char *name, const char *value);
static void ub_slot_start(UbSlot *slot, UbMeterEvent *ev, const UbStripeConfig *cfg,
						  const char *url, const char *auth);
static void ub_slot_release(UbSlot *slot);
static bool ub_slot_finish(UbSlot *slot, CURLcode result, const UbStripeConfig *cfg);
static bool ub_is_duplicate(long status, const char *code, const char *param);
static void ub_batch_loop(UbSlot *slots, int nslots, UbMeterEvent *events, int n,
						  const UbStripeConfig *cfg, const char *url, const char *auth,
						  bool *throttled);

/* libcurl write callback: copies into the slot's fixed buffer, drops the excess. */
static size_t
ub_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	UbSlot	   *slot = (UbSlot *) userdata;
	size_t		n = size * nmemb;
	size_t		room = UB_MAX_BODY - slot->body_len;

	if (n > room)
	{
		slot->body_truncated = true;
		n = room;
	}
	memcpy(slot->body + slot->body_len, ptr, n);
	slot->body_len += n;
	slot->body[slot->body_len] = '\0';
	return size * nmemb;
}

/* Copies a header line's value, trimmed, into a fixed buffer (also used for cancels). */
void
ub_stripe_header_value(const char *line, size_t len, size_t name_len, char *dst, size_t dstlen)
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
ub_header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	UbSlot	   *slot = (UbSlot *) userdata;
	size_t		len = size * nitems;

	if (len > 11 && pg_strncasecmp(buffer, "request-id:", 11) == 0)
		ub_stripe_header_value(buffer, len, 11, slot->request_id, sizeof(slot->request_id));
	else if (len > 12 && pg_strncasecmp(buffer, "retry-after:", 12) == 0)
		ub_stripe_header_value(buffer, len, 12, slot->retry_after, sizeof(slot->retry_after));
	else if (len > 20 && pg_strncasecmp(buffer, "stripe-should-retry:", 20) == 0)
		ub_stripe_header_value(buffer, len, 20, slot->should_retry, sizeof(slot->should_retry));
	return len;
}

/* Appends name=value, form-urlencoded, to the body. */
static void
ub_append_field(StringInfo buf, const char *name, const char *value)
{
	char	   *esc;

	esc = curl_easy_escape(NULL, value, 0);
	if (esc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while encoding a meter event")));
	if (buf->len > 0)
		appendStringInfoChar(buf, '&');
	appendStringInfo(buf, "%s=%s", name, esc);
	curl_free(esc);
}

/* Prepares and adds one request to the multi handle. */
static void
ub_slot_start(UbSlot *slot, UbMeterEvent *ev, const UbStripeConfig *cfg,
			  const char *url, const char *auth)
{
	StringInfoData form;
	char		ts[32];
	char	   *line;
	struct curl_slist *h;

	slot->ev = ev;
	slot->body_len = 0;
	slot->body[0] = '\0';
	slot->body_truncated = false;
	slot->request_id[0] = '\0';
	slot->retry_after[0] = '\0';
	slot->should_retry[0] = '\0';
	slot->errbuf[0] = '\0';

	initStringInfo(&form);
	snprintf(ts, sizeof(ts), INT64_FORMAT, ev->timestamp);
	ub_append_field(&form, "event_name", ev->event_name);
	ub_append_field(&form, "payload%5Bstripe_customer_id%5D", ev->stripe_customer_id);
	ub_append_field(&form, "payload%5Bvalue%5D", ev->value);
	ub_append_field(&form, "identifier", ev->identifier);
	ub_append_field(&form, "timestamp", ts);
	slot->form = form.data;

	slot->easy = curl_easy_init();
	if (slot->easy == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));

	line = psprintf("Idempotency-Key: %s", ev->idempotency_key);
	h = curl_slist_append(NULL, auth);
	if (h)
		slot->headers = h;
	h = h ? curl_slist_append(h, line) : NULL;
	if (h)
		h = curl_slist_append(h, "Content-Type: application/x-www-form-urlencoded");
	if (h)
		h = curl_slist_append(h, "Expect:");
	if (h && cfg->stripe_version && cfg->stripe_version[0])
	{
		char	   *v = psprintf("Stripe-Version: %s", cfg->stripe_version);

		h = curl_slist_append(h, v);
		pfree(v);
	}
	pfree(line);
	if (h == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while building request headers")));
	slot->headers = h;

	curl_easy_setopt(slot->easy, CURLOPT_URL, url);
	curl_easy_setopt(slot->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(slot->easy, CURLOPT_POST, 1L);
	curl_easy_setopt(slot->easy, CURLOPT_POSTFIELDS, slot->form);
	curl_easy_setopt(slot->easy, CURLOPT_POSTFIELDSIZE, (long) strlen(slot->form));
	curl_easy_setopt(slot->easy, CURLOPT_HTTPHEADER, slot->headers);
	curl_easy_setopt(slot->easy, CURLOPT_USERAGENT, "usage_billing/1.0 (PostgreSQL extension)");
	curl_easy_setopt(slot->easy, CURLOPT_WRITEFUNCTION, ub_write_cb);
	curl_easy_setopt(slot->easy, CURLOPT_WRITEDATA, slot);
	curl_easy_setopt(slot->easy, CURLOPT_HEADERFUNCTION, ub_header_cb);
	curl_easy_setopt(slot->easy, CURLOPT_HEADERDATA, slot);
	curl_easy_setopt(slot->easy, CURLOPT_ERRORBUFFER, slot->errbuf);
	curl_easy_setopt(slot->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) cfg->connect_timeout_ms);
	curl_easy_setopt(slot->easy, CURLOPT_TIMEOUT_MS, (long) cfg->timeout_ms);
	curl_easy_setopt(slot->easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(slot->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(slot->easy, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(slot->easy, CURLOPT_PRIVATE, slot);

	if (curl_multi_add_handle(ub_multi, slot->easy) != CURLM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not add a request to the libcurl multi handle")));
	slot->started = GetCurrentTimestamp();
}

/* Frees what libcurl allocated for a slot; safe to call twice. */
static void
ub_slot_release(UbSlot *slot)
{
	if (slot->easy)
	{
		curl_multi_remove_handle(ub_multi, slot->easy);
		curl_easy_cleanup(slot->easy);
		slot->easy = NULL;
	}
	if (slot->headers)
	{
		curl_slist_free_all(slot->headers);
		slot->headers = NULL;
	}
	if (slot->form)
	{
		pfree(slot->form);
		slot->form = NULL;
	}
	slot->ev = NULL;
}

/* Pulls type, code, param and message out of a Stripe error body; malformed bodies give empty strings. */
void
ub_parse_error(const char *body, size_t len, char *type, char *code, char *param, char *message)
{
	cJSON	   *root;
	cJSON	   *err;
	cJSON	   *item;

	type[0] = code[0] = param[0] = message[0] = '\0';
	if (len == 0)
		return;
	root = cJSON_ParseWithLength(body, len);
	if (root == NULL)
		return;
	/* nothing below can throw: copy into fixed buffers, then free */
	err = cJSON_GetObjectItemCaseSensitive(root, "error");
	if (cJSON_IsObject(err))
	{
		item = cJSON_GetObjectItemCaseSensitive(err, "type");
		if (cJSON_IsString(item) && item->valuestring)
			strlcpy(type, item->valuestring, UB_HEADER_LEN);
		item = cJSON_GetObjectItemCaseSensitive(err, "code");
		if (cJSON_IsString(item) && item->valuestring)
			strlcpy(code, item->valuestring, UB_HEADER_LEN);
		item = cJSON_GetObjectItemCaseSensitive(err, "param");
		if (cJSON_IsString(item) && item->valuestring)
			strlcpy(param, item->valuestring, UB_HEADER_LEN);
		item = cJSON_GetObjectItemCaseSensitive(err, "message");
		if (cJSON_IsString(item) && item->valuestring)
			strlcpy(message, item->valuestring, UB_ERROR_LEN - 64);
	}
	cJSON_Delete(root);
}

/*
 * True when an error answer says that Stripe already holds an event with this
 * identifier.  v1 does not document the form: a 400 with code
 * duplicate_meter_event (v2's documented code) or resource_already_exists, or
 * with no code and only param "identifier", are all taken as "already there"
 * (a plain 200 needs no test).  The identifier is ours alone (its installation
 * epoch, customer, meter, period and sequence number) and always valid (at
 * most 100 characters, never empty), so an answer about it can only mean a
 * duplicate: an attempt Stripe processed but whose answer was lost, a 5xx
 * after processing, or a send whose outcome a crash kept from being recorded
 * (which is why no earlier "ambiguous" attempt is required: it may not have
 * been recorded).
 */
static bool
ub_is_duplicate(long status, const char *code, const char *param)
{
	if (status != 400 && status != 409)
		return false;
	if (strcmp(code, "duplicate_meter_event") == 0 ||
		strcmp(code, "resource_already_exists") == 0)
		return true;
	return code[0] == '\0' && strcmp(param, "identifier") == 0;
}

/* Exponential backoff with "equal jitter": half fixed, half random, capped. */
int
ub_backoff_ms(int attempts, const UbStripeConfig *cfg)
{
	double		d = cfg->backoff_base_ms;
	int			i;

	for (i = 0; i < attempts && d < cfg->backoff_max_ms; i++)
		d *= 2;
	if (d > cfg->backoff_max_ms)
		d = cfg->backoff_max_ms;
	return (int) (d / 2 + pg_prng_double(&pg_global_prng_state) * d / 2);
}

/* Classifies a finished request into the event's outcome; returns true when throttled (429). */
static bool
ub_slot_finish(UbSlot *slot, CURLcode result, const UbStripeConfig *cfg)
{
	UbMeterEvent *ev = slot->ev;
	long		status = 0;
	char		type[UB_HEADER_LEN];
	char		code[UB_HEADER_LEN];
	char		param[UB_HEADER_LEN];
	char		message[UB_ERROR_LEN];
	bool		throttled = false;
	int			retry_after_ms = -1;

	ev->duration_ms = (int) ((GetCurrentTimestamp() - slot->started) / 1000);
	strlcpy(ev->request_id, slot->request_id, sizeof(ev->request_id));
	ev->rotate_key = false;

	if (result != CURLE_OK)
	{
		/* no answer: Stripe may or may not have it; the same identifier and key go again */
		ev->outcome = UB_OUT_RETRY;
		ev->http_status = 0;
		snprintf(ev->error, sizeof(ev->error), "network error: %s",
				 slot->errbuf[0] ? slot->errbuf : curl_easy_strerror(result));
		ev->retry_in_ms = ub_backoff_ms(ev->attempts, cfg);
		return false;
	}

	curl_easy_getinfo(slot->easy, CURLINFO_RESPONSE_CODE, &status);
	ev->http_status = (int) status;
	if (slot->retry_after[0])
	{
		char	   *end;
		long		secs = strtol(slot->retry_after, &end, 10);

		if (end != slot->retry_after && secs >= 0)
			retry_after_ms = (int) Min(secs, 3600) * 1000;
	}

	if (status >= 200 && status < 300)
	{
		ev->outcome = UB_OUT_SENT;
		ev->error[0] = '\0';
		return false;
	}

	ub_parse_error(slot->body, slot->body_len, type, code, param, message);
	snprintf(ev->error, sizeof(ev->error), "HTTP %ld%s%s%s%s: %s", status,
			 type[0] ? " " : "", type, code[0] ? "/" : "", code,
			 message[0] ? message : (slot->body_truncated ? "(answer too large)" : "(no message)"));
	ub_redact_keys(ev->error, cfg->api_key);

	/* a duplicate identifier means Stripe already holds this very event, in any form */
	if (ub_is_duplicate(status, code, param))
	{
		ev->outcome = UB_OUT_SENT;
		return false;
	}

	if (strcmp(slot->should_retry, "false") == 0)
		ev->outcome = UB_OUT_FAILED;
	else if (strcmp(slot->should_retry, "true") == 0 ||
			 status == 409 || status == 429 || status >= 500 ||
			 status == 401 || status == 403 ||
			 strcmp(type, "idempotency_error") == 0)
		ev->outcome = UB_OUT_RETRY;
	else
		ev->outcome = UB_OUT_FAILED;

	if (ev->outcome == UB_OUT_RETRY)
	{
		ev->retry_in_ms = retry_after_ms >= 0 ? retry_after_ms : ub_backoff_ms(ev->attempts, cfg);
		/* Stripe replays a saved answer (500s included) for the same key: use a new key */
		ev->rotate_key = (status >= 500 || strcmp(type, "idempotency_error") == 0);
		throttled = (status == 429);
	}
	return throttled;
}

/* Takes one token from the rate bucket, or says how long to wait for one. */
bool
ub_take_token(double rps, long *wait_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	/*
	 * A bucket of capacity C refilled at R per second lets C + R requests
	 * into some one-second window, and the ceiling must hold in every window
	 * (Stripe counts per second): refill at rps - (C - 1).  The small burst
	 * keeps the dispatcher from starving between polls.
	 */
	double		capacity = Max(1.0, rps / 20.0);
	double		refill = rps - (capacity - 1.0);

	if (ub_tokens_at == 0)
		ub_tokens_at = now;
	ub_tokens += (double) (now - ub_tokens_at) / 1000000.0 * refill;
	if (ub_tokens > capacity)
		ub_tokens = capacity;
	ub_tokens_at = now;
	if (ub_tokens >= 1.0)
	{
		ub_tokens -= 1.0;
		return true;
	}
	*wait_ms = (long) ((1.0 - ub_tokens) * 1000.0 / refill) + 1;
	return false;
}

/*
 * Stripe refuses (or silently drops, since it checks customers only after
 * accepting an event) a customer id that is empty, longer than 100
 * characters (payload values are at most 100) or holds blanks or control
 * characters, and an event name that is empty or longer than 100.  Such an
 * event is never sent: it is marked failed with a message saying what to
 * fix, so that it waits for the operator (export_status shows it; after the
 * fix, retry_failed_exports() plans it again with the corrected id).
 * Returns true when the event was refused here.
 */
bool
ub_refuse_unsendable(UbMeterEvent *ev)
{
	const char *cus = ev->stripe_customer_id;
	size_t		len = strlen(cus);
	const char *why = NULL;

	if (len == 0)
		why = "is empty";
	else if (len > 100)
		why = "is longer than 100 characters";
	else
	{
		for (const char *p = cus; *p; p++)
			if (isspace((unsigned char) *p) || iscntrl((unsigned char) *p))
			{
				why = "contains a blank or a control character";
				break;
			}
	}
	if (why != NULL)
		snprintf(ev->error, sizeof(ev->error),
				 "not sent: stripe_customer_id %s (Stripe would refuse it); "
				 "correct it with usage_billing.upsert_customer(), then call "
				 "usage_billing.retry_failed_exports()", why);
	else if (ev->event_name[0] == '\0' || strlen(ev->event_name) > 100)
		snprintf(ev->error, sizeof(ev->error),
				 "not sent: the meter's Stripe event name is empty or longer than 100 characters; "
				 "correct it, then call usage_billing.retry_failed_exports()");
	else
		return false;
	ev->outcome = UB_OUT_FAILED;
	ev->http_status = 0;
	ev->request_id[0] = '\0';
	ev->duration_ms = 0;
	ev->rotate_key = false;
	return true;
}

/* The dispatch/poll loop of one batch; slots are released by the caller. */
static void
ub_batch_loop(UbSlot *slots, int nslots, UbMeterEvent *events, int n,
			  const UbStripeConfig *cfg, const char *url, const char *auth, bool *throttled)
{
	int			next = 0;
	int			inflight = 0;
	int			i;

	while (next < n || inflight > 0)
	{
		int			running;
		CURLMsg    *msg;
		int			queued;
		int			completed;
		long		wait_ms = 50;

		CHECK_FOR_INTERRUPTS();

		/* dispatch while there is a free slot, work left and a token */
		while (!*throttled && next < n && inflight < nslots)
		{
			UbSlot	   *free_slot = NULL;

			for (i = 0; i < nslots; i++)
				if (slots[i].ev == NULL)
				{
					free_slot = &slots[i];
					break;
				}
			if (ub_refuse_unsendable(&events[next]))
			{
				next++;
				continue;
			}
			if (free_slot == NULL || !ub_take_token(cfg->max_rps, &wait_ms))
				break;
			ub_slot_start(free_slot, &events[next], cfg, url, auth);
			next++;
			inflight++;
		}

		if (inflight == 0 && (*throttled || next >= n))
			break;

		curl_multi_perform(ub_multi, &running);
		completed = 0;
		while ((msg = curl_multi_info_read(ub_multi, &queued)) != NULL)
		{
			UbSlot	   *slot = NULL;

			if (msg->msg != CURLMSG_DONE)
				continue;
			curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &slot);
			if (slot == NULL)
				continue;
			if (ub_slot_finish(slot, msg->data.result, cfg))
				*throttled = true;
			ub_slot_release(slot);
			inflight--;
			completed++;
		}
		/* a slot came free: dispatch at once rather than sleep in poll */
		if (completed > 0 && next < n && !*throttled)
			continue;
		if (inflight > 0 || next < n)
		{
			if (inflight > 0 && wait_ms > 50)
				wait_ms = 50;
			curl_multi_poll(ub_multi, NULL, 0, (int) Max(wait_ms, 1), NULL);
		}
	}
}

/*
 * Sends the batch; fills each event's outcome.  *throttled is set when Stripe
 * answered 429: the rest of the batch is then left NOT_TRIED.
 */
void
ub_stripe_send_batch(UbMeterEvent *events, int n, const UbStripeConfig *cfg, bool *throttled)
{
	UbSlot	   *slots;
	volatile int nslots = Max(1, Min(cfg->concurrency, n));
	int			i;
	char	   *url;
	char	   *auth;

	*throttled = false;
	if (n == 0)
		return;

	if (!ub_curl_initialized)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_SYSTEM_ERROR),
					 errmsg("could not initialize libcurl")));
		ub_curl_initialized = true;
	}
	if (ub_multi == NULL)
	{
		ub_multi = curl_multi_init();
		if (ub_multi == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("could not create a libcurl multi handle")));
	}
	curl_multi_setopt(ub_multi, CURLMOPT_MAXCONNECTS, (long) Max(cfg->concurrency, 1));

	slots = palloc0(sizeof(UbSlot) * nslots);
	url = psprintf("%s/v1/billing/meter_events", cfg->api_base);
	auth = psprintf("Authorization: Bearer %s", cfg->api_key);

	PG_TRY();
	{
		ub_batch_loop(slots, nslots, events, n, cfg, url, auth, throttled);
	}
	PG_FINALLY();
	{
		for (i = 0; i < nslots; i++)
			ub_slot_release(&slots[i]);
		/* the key must not linger in freed memory */
		explicit_bzero(auth, strlen(auth));
		pfree(auth);
		pfree(url);
		pfree(slots);
	}
	PG_END_TRY();
}

/* Frees the multi handle and libcurl's globals at worker exit. */
void
ub_stripe_shutdown(void)
{
	if (ub_multi)
	{
		curl_multi_cleanup(ub_multi);
		ub_multi = NULL;
	}
	if (ub_curl_initialized)
	{
		curl_global_cleanup();
		ub_curl_initialized = false;
	}
}
