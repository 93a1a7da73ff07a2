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
 * The request (handle, headers, answer buffers, error parsing, the retry
 * rule, the backoff) is stripe_http.c's, shared with meter events; what is
 * particular to cancels lives here: the form and "already cancelled".  The
 * handle and header list are freed on every path (PG_FINALLY).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/stringinfo.h"

#include "export_cancel.h"
#include "stripe_http.h"

static void ub_cancel_classify(UbCancel *c, UbHttpAnswer *ans, long status,
							   const UbStripeConfig *cfg);
static bool ub_cancel_already_done(long status, const char *code, const char *message);

/*
 * One synchronous cancel request; fills the cancel's outcome.  The easy
 * handle and header list are freed on every path, errors included.
 */
void
ub_cancel_send(UbCancel *c, const UbStripeConfig *cfg, const char *url)
{
	UbHttpRequest req;
	UbHttpAnswer *ans = palloc0(sizeof(UbHttpAnswer));
	StringInfoData form;

	initStringInfo(&form);
	ub_http_form_add(&form, "event_name", c->event_name);
	ub_http_form_add(&form, "type", "cancel");
	ub_http_form_add(&form, "cancel%5Bidentifier%5D", c->identifier);

	memset(&req, 0, sizeof(req));
	req.answer = ans;
	PG_TRY();
	{
		CURLcode	res;
		long		status = 0;

		ub_http_prepare(&req, cfg, url, form.data, c->idempotency_key, c->stripe_account);
		res = ub_http_perform(&req, &status);
		if (res != CURLE_OK)
		{
			/* no answer: Stripe may or may not have cancelled; the same key goes again */
			c->outcome = "retry";
			c->http_status = 0;
			snprintf(c->error, sizeof(c->error), "network error: %s",
					 ans->errbuf[0] ? ans->errbuf : curl_easy_strerror(res));
			c->retry_in_ms = ub_http_backoff_ms(c->attempts, cfg);
		}
		else
			ub_cancel_classify(c, ans, status, cfg);
	}
	PG_FINALLY();
	{
		/* frees the form body too */
		ub_http_release(&req, NULL);
	}
	PG_END_TRY();
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
	char		text[UB_ERROR_LEN + UB_HTTP_HDR_LEN];

	if (status < 400 || status >= 500 || status == 429 || status == 409)
		return false;
	snprintf(text, sizeof(text), "%s %s", code, message);
	for (char *p = text; *p; p++)
		*p = pg_tolower((unsigned char) *p);
	return strstr(text, "already") != NULL && strstr(text, "cancel") != NULL;
}

/* Turns an HTTP answer into the cancel's outcome, by the rule all Stripe requests follow. */
static void
ub_cancel_classify(UbCancel *c, UbHttpAnswer *ans, long status, const UbStripeConfig *cfg)
{
	UbStripeError err;
	char		prefix[UB_ERROR_LEN];

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

	ub_http_parse_error(ans->body, ans->len, &err);
	snprintf(prefix, sizeof(prefix), "cancel %s: ", c->identifier);
	ub_http_describe(c->error, sizeof(c->error), prefix, status, &err, ans, cfg->api_key);

	if (ub_cancel_already_done(status, err.code, err.message))
		c->outcome = "cancelled";
	else if (ub_http_verdict(status, ans, &err, &c->rotate_key) == UB_HTTP_RETRY)
	{
		c->outcome = "retry";
		c->retry_in_ms = ub_http_retry_ms(ans, c->attempts, cfg);
		c->throttled = (status == 429);
	}
	else
		c->outcome = "refused";	/* e.g. older than 24 h: the value needs a manual credit */
}
