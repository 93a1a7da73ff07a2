/*-------------------------------------------------------------------------
 * stripe_client.c
 *	  HTTP side of the export: sends a batch of meter events to Stripe's
 *	  POST /v1/billing/meter_events with libcurl's multi interface.
 *
 * Vocabulary
 *   batch     an array of UbMeterEvent, at most one per (customer, meter),
 *             sent with up to `concurrency` requests in flight
 *   in flight one request on its way (UbInflight): its easy handle,
 *             headers, form body and a fixed-size answer buffer (callbacks
 *             never allocate, so they can never throw through libcurl's
 *             stack frames)
 *   bucket    token bucket enforcing the requests-per-second ceiling; it
 *             lives across batches, as does the multi handle (stripe_http.c's,
 *             which keeps the connection cache warm)
 *   outcome   SENT, RETRY (with a delay: Retry-After when given, else
 *             exponential backoff with jitter) or FAILED (a 4xx that retrying
 *             cannot fix, with Stripe's message)
 *
 * No transaction is open while this runs.  Everything libcurl and cJSON
 * allocate is freed on every path (PG_FINALLY).  The request itself (handle,
 * headers, form encoding, answer buffers, error parsing, the retry rule and
 * the backoff) is stripe_http.c's, shared with cancels and summaries; what
 * is particular to meter events lives here: the form, duplicates, pacing.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include <curl/curl.h>

#include "miscadmin.h"
#include "utils/timestamp.h"

#include "stripe_client.h"
#include "stripe_http.h"

typedef struct UbInflight
{
	UbHttpRequest http;			/* handle, headers, form body */
	UbHttpAnswer ans;			/* fixed-size answer buffers */
	UbMeterEvent *ev;			/* NULL: not in use */
} UbInflight;

static CURLM *ub_multi = NULL;	/* stripe_http.c's, set for each batch */
static double ub_tokens = 1.0;
static TimestampTz ub_tokens_at = 0;

static void ub_inflight_start(UbInflight *req, UbMeterEvent *ev, const UbStripeConfig *cfg,
						  const char *url);
static void ub_inflight_release(UbInflight *req);
static bool ub_inflight_finish(UbInflight *req, CURLcode result, const UbStripeConfig *cfg);
static bool ub_is_duplicate(long status, const char *code, const char *param);
static void ub_batch_loop(UbInflight *reqs, int nreqs, UbMeterEvent *events, int n,
						  const UbStripeConfig *cfg, const char *url, bool *throttled);

/* Prepares and adds one request to the multi handle. */
static void
ub_inflight_start(UbInflight *req, UbMeterEvent *ev, const UbStripeConfig *cfg, const char *url)
{
	StringInfoData form;
	char		ts[32];

	req->ev = ev;
	initStringInfo(&form);
	snprintf(ts, sizeof(ts), INT64_FORMAT, ev->timestamp);
	ub_http_form_add(&form, "event_name", ev->event_name);
	ub_http_form_add(&form, "payload%5Bstripe_customer_id%5D", ev->stripe_customer_id);
	ub_http_form_add(&form, "payload%5Bvalue%5D", ev->value);
	ub_http_form_add(&form, "identifier", ev->identifier);
	ub_http_form_add(&form, "timestamp", ts);

	req->http.answer = &req->ans;
	ub_http_prepare(&req->http, cfg, url, form.data, ev->idempotency_key, ev->stripe_account);
	curl_easy_setopt(req->http.easy, CURLOPT_PRIVATE, req);
	if (curl_multi_add_handle(ub_multi, req->http.easy) != CURLM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not add a request to the libcurl multi handle")));
	req->http.started = GetCurrentTimestamp();
}

/* Frees what libcurl allocated for a request; safe to call twice. */
static void
ub_inflight_release(UbInflight *req)
{
	ub_http_release(&req->http, ub_multi);
	req->ev = NULL;
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

/* Classifies a finished request into the event's outcome; returns true when throttled (429). */
static bool
ub_inflight_finish(UbInflight *req, CURLcode result, const UbStripeConfig *cfg)
{
	UbMeterEvent *ev = req->ev;
	UbHttpAnswer *ans = &req->ans;
	long		status = 0;
	UbStripeError err;
	UbHttpVerdict verdict;

	ev->duration_ms = (int) ((GetCurrentTimestamp() - req->http.started) / 1000);
	strlcpy(ev->request_id, ans->request_id, sizeof(ev->request_id));
	ev->rotate_key = false;

	if (result != CURLE_OK)
	{
		/* no answer: Stripe may or may not have it; the same identifier and key go again */
		ev->outcome = UB_OUT_RETRY;
		ev->http_status = 0;
		snprintf(ev->error, sizeof(ev->error), "network error: %s",
				 ans->errbuf[0] ? ans->errbuf : curl_easy_strerror(result));
		ev->retry_in_ms = ub_http_backoff_ms(ev->attempts, cfg);
		return false;
	}

	curl_easy_getinfo(req->http.easy, CURLINFO_RESPONSE_CODE, &status);
	ev->http_status = (int) status;
	if (status >= 200 && status < 300)
	{
		ev->outcome = UB_OUT_SENT;
		ev->error[0] = '\0';
		return false;
	}

	ub_http_parse_error(ans->body, ans->len, &err);
	ub_http_describe(ev->error, sizeof(ev->error), NULL, status, &err, ans, cfg->api_key);

	/* a duplicate identifier means Stripe already holds this very event, in any form */
	if (ub_is_duplicate(status, err.code, err.param))
	{
		ev->outcome = UB_OUT_SENT;
		return false;
	}

	verdict = ub_http_verdict(status, ans, &err, &ev->rotate_key);
	if (verdict != UB_HTTP_RETRY)
	{
		ev->outcome = UB_OUT_FAILED;
		return false;
	}
	ev->outcome = UB_OUT_RETRY;
	ev->retry_in_ms = ub_http_retry_ms(ans, ev->attempts, cfg);
	return (status == 429);
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

/* The dispatch/poll loop of one batch; its requests are released by the caller. */
static void
ub_batch_loop(UbInflight *reqs, int nreqs, UbMeterEvent *events, int n,
			  const UbStripeConfig *cfg, const char *url, bool *throttled)
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

		/* dispatch while a request is free, work left and a token */
		while (!*throttled && next < n && inflight < nreqs)
		{
			UbInflight *free_req = NULL;

			for (i = 0; i < nreqs; i++)
				if (reqs[i].ev == NULL)
				{
					free_req = &reqs[i];
					break;
				}
			if (ub_refuse_unsendable(&events[next]))
			{
				next++;
				continue;
			}
			if (free_req == NULL || !ub_take_token(cfg->max_rps, &wait_ms))
				break;
			ub_inflight_start(free_req, &events[next], cfg, url);
			next++;
			inflight++;
		}

		if (inflight == 0 && (*throttled || next >= n))
			break;

		curl_multi_perform(ub_multi, &running);
		completed = 0;
		while ((msg = curl_multi_info_read(ub_multi, &queued)) != NULL)
		{
			UbInflight *req = NULL;

			if (msg->msg != CURLMSG_DONE)
				continue;
			curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &req);
			if (req == NULL)
				continue;
			if (ub_inflight_finish(req, msg->data.result, cfg))
				*throttled = true;
			ub_inflight_release(req);
			inflight--;
			completed++;
		}
		/* a request came free: dispatch at once rather than sleep in poll */
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
	UbInflight *reqs;
	volatile int nreqs = Max(1, Min(cfg->concurrency, n));
	int			i;
	char	   *url;

	*throttled = false;
	if (n == 0)
		return;

	ub_multi = ub_http_multi(cfg->concurrency);

	reqs = palloc0(sizeof(UbInflight) * nreqs);
	url = psprintf("%s/v1/billing/meter_events", cfg->api_base);

	PG_TRY();
	{
		ub_batch_loop(reqs, nreqs, events, n, cfg, url, throttled);
	}
	PG_FINALLY();
	{
		for (i = 0; i < nreqs; i++)
			ub_inflight_release(&reqs[i]);
		pfree(url);
		pfree(reqs);
	}
	PG_END_TRY();
}

/* Frees the multi handle and libcurl's globals at worker exit. */
void
ub_stripe_shutdown(void)
{
	ub_multi = NULL;
	ub_http_shutdown();
}
