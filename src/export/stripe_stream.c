/*-------------------------------------------------------------------------
 * stripe_stream.c
 *	  HTTP side of the export over Stripe's v2 meter event stream
 *	  (usage_billing.stripe_api = 'v2'):
 *	    POST {stripe_api_base}/v2/billing/meter_event_session with the secret
 *	      key opens a session: an authentication token valid 15 minutes;
 *	    POST {stripe_meter_events_base}/v2/billing/meter_event_stream with
 *	      that token carries up to 100 events as JSON and is answered {}.
 *
 * Vocabulary
 *   chunk     up to UB_STREAM_MAX_EVENTS events of the batch, one request, all
 *             of one account: the platform's, or (Connect) one connected
 *             account's, sent as Stripe-Context (v2's header for it; v1's
 *             Stripe-Account does not apply to v2).  The batch holds at most
 *             one event per (customer, meter), so no two requests in flight
 *             ever carry the same customer and meter.
 *   session   the token and its expiry (stripe_session.c), opened again
 *             before it expires, when the key or the API base changes, and
 *             when the stream answers 401 (then the chunk is resent at once:
 *             a 401 means nothing of it was processed).
 *   outcome   as for v1 (stripe_client.c), for every event of a chunk alike:
 *             2xx SENT; no answer, 5xx, 409, 429 RETRY with the same
 *             identifiers (Stripe drops the duplicates of what it already
 *             holds and answers {}: the resend of an ambiguous request is
 *             what settles it); a 400 naming events[i] FAILED for that event
 *             and RETRY for the others; any other 4xx FAILED.
 *
 * The stream validates events asynchronously: an accepted event that Stripe
 * later rejects (an unknown customer, say) is reported by Stripe, not in the
 * answer.  No Idempotency-Key is sent: the identifiers deduplicate, and a
 * resent chunk may be grouped differently.  The token and the key only go
 * into Authorization headers; Stripe's messages are redacted of both before
 * they are stored.  No transaction is open while this runs.  The requests
 * themselves (handle, headers, answer buffers, error parsing, the retry rule
 * and the backoff) are stripe_http.c's; the multi handle is its one too.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <time.h>

#include <curl/curl.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/timestamp.h"

#include "stripe_http.h"
#include "stripe_session.h"
#include "stripe_stream.h"

/* a chunk answered 401 is resent with a new session at most this many times per batch */
#define UB_STREAM_MAX_REAUTH	2

/* settings */
int			ub_stripe_api = UB_STRIPE_API_V1;
static char *ub_events_base = NULL;

static const struct config_enum_entry ub_stripe_api_options[] = {
	{"v1", UB_STRIPE_API_V1, false},
	{"v2", UB_STRIPE_API_V2, false},
	{NULL, 0, false}
};

typedef struct UbChunk
{
	UbMeterEvent **evs;
	int			n;
	const char *account;		/* Connect: every event's account, or NULL (the platform) */
	int			reauth;			/* resends after a 401 */
} UbChunk;

/* one stream request in flight: a chunk, its request and answer */
typedef struct UbStreamInflight
{
	UbHttpRequest http;			/* handle, headers, JSON body (stripe_http.c) */
	UbHttpAnswer ans;			/* fixed-size answer buffers */
	UbChunk    *chunk;			/* NULL: not in use */
	uint64		session;		/* generation of the token it was sent with */
} UbStreamInflight;

static CURLM *ub_stream_multi = NULL;	/* stripe_http.c's, set for each batch */

static bool ub_check_events_base(char **newval, void **extra, GucSource source);
static char *ub_chunk_json(UbChunk *chunk);
static const char *ub_event_account(const UbMeterEvent *ev);
static int	ub_event_account_cmp(const void *a, const void *b);
static void ub_stream_inflight_start(UbStreamInflight *req, UbChunk *chunk, const UbStripeConfig *cfg,
								 const char *url);
static void ub_stream_inflight_release(UbStreamInflight *req);
static bool ub_stream_inflight_finish(UbStreamInflight *req, CURLcode result, const UbStripeConfig *cfg,
								  bool *requeue);
static void ub_chunk_outcome(UbChunk *chunk, UbOutcome outcome, UbStreamInflight *req,
							 int http_status, const char *error, int retry_in_ms,
							 const UbStripeConfig *cfg);
static void ub_stream_loop(UbStreamInflight *reqs, int nreqs, UbChunk *chunks, int nchunks,
						   const UbStripeConfig *cfg, const char *url, bool *throttled);


/* Defines usage_billing.stripe_api and usage_billing.stripe_meter_events_base. */
void
ub_stream_init(void)
{
	DefineCustomEnumVariable("usage_billing.stripe_api",
							 "Stripe API the export worker sends meter events with: v1 or v2.",
							 "v1: POST /v1/billing/meter_events, one event per request.  "
							 "v2: the meter event stream, up to 100 events per request with a "
							 "session token; cancels stay on v1.",
							 &ub_stripe_api, UB_STRIPE_API_V1, ub_stripe_api_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("usage_billing.stripe_meter_events_base",
							   "Base URL of Stripe's meter event stream (v2).",
							   "Used with usage_billing.stripe_api = 'v2'; sessions are opened on "
							   "usage_billing.stripe_api_base.  Tests point it at a loopback mock.",
							   &ub_events_base, "https://meter-events.stripe.com", PGC_SIGHUP, 0,
							   ub_check_events_base, NULL, NULL);
}

/* GUC check hook: the events base must be an http(s) URL. */
static bool
ub_check_events_base(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL ||
		(strncmp(*newval, "https://", 8) != 0 && strncmp(*newval, "http://", 7) != 0))
	{
		GUC_check_errdetail("The meter events base must start with https:// or http://.");
		return false;
	}
	return true;
}

/* An event's connected account, or NULL for the platform. */
static const char *
ub_event_account(const UbMeterEvent *ev)
{
	return ev->stripe_account && ev->stripe_account[0] ? ev->stripe_account : NULL;
}

/* qsort order of the events to send: by account (the platform first), then as in the batch. */
static int
ub_event_account_cmp(const void *a, const void *b)
{
	const UbMeterEvent *ea = *(const UbMeterEvent *const *) a;
	const UbMeterEvent *eb = *(const UbMeterEvent *const *) b;
	const char *xa = ub_event_account(ea);
	const char *xb = ub_event_account(eb);
	int			c = strcmp(xa ? xa : "", xb ? xb : "");

	if (c != 0)
		return c;
	return ea < eb ? -1 : (ea > eb ? 1 : 0);
}

/* The request body of a chunk: {"events":[{...}, ...]} with RFC 3339 timestamps. */
static char *
ub_chunk_json(UbChunk *chunk)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"events\":[");
	for (i = 0; i < chunk->n; i++)
	{
		UbMeterEvent *ev = chunk->evs[i];
		time_t		t = (time_t) ev->timestamp;
		struct tm	tm;
		char		ts[40];

		if (gmtime_r(&t, &tm) == NULL ||
			strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S.000Z", &tm) == 0)
			elog(ERROR, "could not format the timestamp " INT64_FORMAT, ev->timestamp);
		if (i > 0)
			appendStringInfoChar(&buf, ',');
		appendStringInfoString(&buf, "{\"event_name\":");
		escape_json(&buf, ev->event_name);
		appendStringInfoString(&buf, ",\"identifier\":");
		escape_json(&buf, ev->identifier);
		appendStringInfo(&buf, ",\"timestamp\":\"%s\",\"payload\":{\"stripe_customer_id\":", ts);
		escape_json(&buf, ev->stripe_customer_id);
		appendStringInfoString(&buf, ",\"value\":");
		escape_json(&buf, ev->value);
		appendStringInfoString(&buf, "}}");
	}
	appendStringInfoString(&buf, "]}");
	return buf.data;
}

/* Prepares and adds one stream request to the multi handle. */
static void
ub_stream_inflight_start(UbStreamInflight *req, UbChunk *chunk, const UbStripeConfig *cfg,
					 const char *url)
{
	req->chunk = chunk;
	req->session = ub_session_generation();
	req->http.answer = &req->ans;
	ub_http_prepare_json(&req->http, cfg, url, ub_chunk_json(chunk), ub_session_token(),
						 chunk->account);
	curl_easy_setopt(req->http.easy, CURLOPT_PRIVATE, req);
	if (curl_multi_add_handle(ub_stream_multi, req->http.easy) != CURLM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not add a request to the libcurl multi handle")));
	req->http.started = GetCurrentTimestamp();
}

/* Frees what libcurl allocated for a request (the token's header line wiped); safe to call twice. */
static void
ub_stream_inflight_release(UbStreamInflight *req)
{
	ub_http_release(&req->http, ub_stream_multi);
	req->chunk = NULL;
}

/*
 * Gives every event of a chunk the same outcome, answer and error; a RETRY
 * waits retry_in_ms when given (>= 0), else the answer's Retry-After or the
 * event's own backoff (ub_http_retry_ms).
 */
static void
ub_chunk_outcome(UbChunk *chunk, UbOutcome outcome, UbStreamInflight *req, int http_status,
				 const char *error, int retry_in_ms, const UbStripeConfig *cfg)
{
	int			duration_ms = 0;
	int			i;

	if (req)
		duration_ms = (int) ((GetCurrentTimestamp() - req->http.started) / 1000);
	for (i = 0; i < chunk->n; i++)
	{
		UbMeterEvent *ev = chunk->evs[i];

		ev->outcome = outcome;
		ev->http_status = http_status;
		ev->duration_ms = duration_ms;
		ev->rotate_key = false; /* no Idempotency-Key on the stream */
		strlcpy(ev->request_id, req ? req->ans.request_id : "", sizeof(ev->request_id));
		strlcpy(ev->error, error ? error : "", sizeof(ev->error));
		if (outcome == UB_OUT_RETRY)
			ev->retry_in_ms = retry_in_ms >= 0 ? retry_in_ms :
				ub_http_retry_ms(req ? &req->ans : NULL, ev->attempts, cfg);
	}
}

/*
 * Classifies a finished stream request into its events' outcomes: the one
 * layer's verdict (stripe_http.c), except where v2 differs: a 401 renews the
 * session and resends, and a 400 naming events[i] fails that event only.
 * Returns true when throttled (429).  *requeue is set when the chunk must go
 * again with a new session (401): its events stay undecided.
 */
static bool
ub_stream_inflight_finish(UbStreamInflight *req, CURLcode result, const UbStripeConfig *cfg, bool *requeue)
{
	UbChunk    *chunk = req->chunk;
	UbHttpAnswer *ans = &req->ans;
	long		status = 0;
	UbStripeError err;
	char		error[UB_ERROR_LEN];
	bool		rotate_key;
	UbOutcome	outcome;
	int			bad = -1;

	*requeue = false;
	if (result != CURLE_OK)
	{
		/* no answer: Stripe may hold some or all of it; the same identifiers go again */
		snprintf(error, sizeof(error), "network error: %s",
				 ans->errbuf[0] ? ans->errbuf : curl_easy_strerror(result));
		ub_chunk_outcome(chunk, UB_OUT_RETRY, req, 0, error, -1, cfg);
		return false;
	}

	curl_easy_getinfo(req->http.easy, CURLINFO_RESPONSE_CODE, &status);
	if (status >= 200 && status < 300)
	{
		ub_chunk_outcome(chunk, UB_OUT_SENT, req, (int) status, NULL, -1, cfg);
		return false;
	}

	ub_http_parse_error(ans->body, ans->len, &err);
	ub_http_describe(error, sizeof(error), NULL, status, &err, ans, cfg->api_key);
	ub_redact_keys(error, ub_session_token());

	if (status == 401)
	{
		/* the session expired or was refused: nothing was processed */
		ub_session_expired(req->session);
		if (chunk->reauth < UB_STREAM_MAX_REAUTH)
		{
			chunk->reauth++;
			*requeue = true;
			return false;
		}
		ub_chunk_outcome(chunk, UB_OUT_RETRY, req, (int) status, error, -1, cfg);
		return false;
	}

	/* no Idempotency-Key on the stream: rotate_key does not apply */
	outcome = ub_http_verdict(status, ans, &err, &rotate_key) == UB_HTTP_RETRY ?
		UB_OUT_RETRY : UB_OUT_FAILED;

	/* a refusal that names one event ("events[7].payload") fails that event only */
	if (outcome == UB_OUT_FAILED && status == 400 &&
		sscanf(err.param, "events[%d]", &bad) == 1 && bad >= 0 && bad < chunk->n)
	{
		UbMeterEvent *culprit = chunk->evs[bad];
		char		others[UB_ERROR_LEN];

		snprintf(others, sizeof(others), "resent: Stripe refused another event of the request (%s)",
				 error);
		ub_chunk_outcome(chunk, UB_OUT_RETRY, req, (int) status, others, 0, cfg);
		culprit->outcome = UB_OUT_FAILED;
		strlcpy(culprit->error, error, sizeof(culprit->error));
		return false;
	}

	ub_chunk_outcome(chunk, outcome, req, (int) status, error, -1, cfg);
	return outcome == UB_OUT_RETRY && status == 429;
}

/* The dispatch/poll loop of one batch; its requests are released by the caller. */
static void
ub_stream_loop(UbStreamInflight *reqs, int nreqs, UbChunk *chunks, int nchunks,
			   const UbStripeConfig *cfg, const char *url, bool *throttled)
{
	int		   *queue;
	int			qhead = 0;
	int			qtail = 0;
	int			qcap = nchunks * (UB_STREAM_MAX_REAUTH + 1) + 1;
	int			inflight = 0;
	bool		no_session = false;
	int			i;

	queue = palloc(sizeof(int) * qcap);
	for (i = 0; i < nchunks; i++)
		queue[qtail++] = i;

	while (qhead < qtail || inflight > 0)
	{
		int			running;
		CURLMsg    *msg;
		int			queued;
		int			completed;
		long		wait_ms = 50;

		CHECK_FOR_INTERRUPTS();

		/* dispatch while a request is free, work left, a session and a token */
		while (!*throttled && !no_session && qhead < qtail && inflight < nreqs)
		{
			UbStreamInflight *free_req = NULL;

			for (i = 0; i < nreqs; i++)
				if (reqs[i].chunk == NULL)
				{
					free_req = &reqs[i];
					break;
				}
			if (free_req == NULL)
				break;
			if (!ub_session_usable(cfg))
			{
				char		error[UB_ERROR_LEN];
				char		request_id[UB_REQUEST_ID_LEN];
				int			http_status;

				if (!ub_session_open(cfg, error, sizeof(error), &http_status, request_id))
				{
					/* every chunk not yet sent waits for the backoff */
					for (i = qhead; i < qtail; i++)
					{
						int			j;

						ub_chunk_outcome(&chunks[queue[i]], UB_OUT_RETRY, NULL, http_status, error, -1, cfg);
						for (j = 0; j < chunks[queue[i]].n; j++)
							strlcpy(chunks[queue[i]].evs[j]->request_id, request_id, UB_REQUEST_ID_LEN);
					}
					qhead = qtail;
					no_session = true;
					break;
				}
			}
			if (!ub_take_token(cfg->max_rps, &wait_ms))
				break;
			ub_stream_inflight_start(free_req, &chunks[queue[qhead++]], cfg, url);
			inflight++;
		}

		if (inflight == 0 && (*throttled || no_session || qhead >= qtail))
			break;

		curl_multi_perform(ub_stream_multi, &running);
		completed = 0;
		while ((msg = curl_multi_info_read(ub_stream_multi, &queued)) != NULL)
		{
			UbStreamInflight *req = NULL;
			bool		requeue;

			if (msg->msg != CURLMSG_DONE)
				continue;
			curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &req);
			if (req == NULL)
				continue;
			if (ub_stream_inflight_finish(req, msg->data.result, cfg, &requeue))
				*throttled = true;
			if (requeue)
			{
				Assert(qtail < qcap);
				queue[qtail++] = (int) (req->chunk - chunks);
			}
			ub_stream_inflight_release(req);
			inflight--;
			completed++;
		}
		/* a request came free: dispatch at once rather than sleep in poll */
		if (completed > 0 && qhead < qtail && !*throttled && !no_session)
			continue;
		if (inflight > 0 || qhead < qtail)
		{
			if (inflight > 0 && wait_ms > 50)
				wait_ms = 50;
			curl_multi_poll(ub_stream_multi, NULL, 0, (int) Max(wait_ms, 1), NULL);
		}
	}
	pfree(queue);
}

/*
 * Sends the batch through the meter event stream, up to 100 events per
 * request; fills each event's outcome.  *throttled is set when Stripe
 * answered 429: the chunks not yet sent are then left NOT_TRIED.
 */
void
ub_stream_send_batch(UbMeterEvent *events, int n, const UbStripeConfig *cfg, bool *throttled)
{
	UbChunk    *chunks;
	UbMeterEvent **order;
	UbStreamInflight *reqs;
	volatile int nchunks = 0;
	int			nsend = 0;
	volatile int nreqs;
	char	   *base;
	char	   *url;
	int			i;

	*throttled = false;
	if (n == 0)
		return;

	ub_stream_multi = ub_http_multi(cfg->concurrency);

	/* events Stripe would refuse are never sent (stripe_client.c says why) */
	order = palloc(sizeof(UbMeterEvent *) * n);
	for (i = 0; i < n; i++)
		if (!ub_refuse_unsendable(&events[i]))
			order[nsend++] = &events[i];
	if (nsend == 0)
	{
		pfree(order);
		return;
	}

	/*
	 * Connect: a request speaks for one account (its Stripe-Context), so the
	 * events are grouped by account and a chunk never mixes two.
	 */
	qsort(order, nsend, sizeof(UbMeterEvent *), ub_event_account_cmp);
	chunks = palloc0(sizeof(UbChunk) * nsend);
	for (i = 0; i < nsend;)
	{
		const char *account = ub_event_account(order[i]);
		int			j = i + 1;

		while (j < nsend && j - i < UB_STREAM_MAX_EVENTS &&
			   strcmp(ub_event_account(order[j]) ? ub_event_account(order[j]) : "",
					  account ? account : "") == 0)
			j++;
		chunks[nchunks].evs = &order[i];
		chunks[nchunks].n = j - i;
		chunks[nchunks].account = account;
		nchunks++;
		i = j;
	}

	nreqs = Max(1, Min(cfg->concurrency, nchunks));
	reqs = palloc0(sizeof(UbStreamInflight) * nreqs);
	base = pstrdup(ub_events_base);
	while (strlen(base) > 0 && base[strlen(base) - 1] == '/')
		base[strlen(base) - 1] = '\0';
	url = psprintf("%s/v2/billing/meter_event_stream", base);

	PG_TRY();
	{
		ub_stream_loop(reqs, nreqs, chunks, nchunks, cfg, url, throttled);
	}
	PG_FINALLY();
	{
		for (i = 0; i < nreqs; i++)
			ub_stream_inflight_release(&reqs[i]);
		pfree(reqs);
		pfree(url);
		pfree(base);
		pfree(chunks);
		pfree(order);
	}
	PG_END_TRY();
}

/* Wipes the session and frees libcurl's handles at worker exit. */
void
ub_stream_shutdown(void)
{
	ub_session_forget();
	ub_stream_multi = NULL;
	ub_http_shutdown();
}
