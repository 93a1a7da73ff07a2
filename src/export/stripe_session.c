/*-------------------------------------------------------------------------
 * stripe_session.c
 *	  The v2 meter event session: POST {stripe_api_base}/v2/billing/
 *	  meter_event_session with the secret key answers an authentication token
 *	  valid 15 minutes, which the meter event stream (stripe_stream.c) sends
 *	  instead of the key.  Also the fixed-size answer buffers and libcurl
 *	  callbacks of the v2 requests.
 *
 * Vocabulary
 *   session     the token, when to renew it, and which key and API base
 *               opened it (as a hash: the key is not kept); in static memory,
 *               never palloc'd, wiped when replaced and at exit
 *   generation  counts the sessions opened, so that a 401 for a request sent
 *               with an older token does not throw away a newer one
 *   renew       a minute before Stripe's expires_at (a quarter of the
 *               session's life for shorter ones), when the key or the API
 *               base changes, and after a 401
 *
 * The token is never logged, stored or shown; Stripe's messages are redacted
 * of the key before they are kept.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <cjson/cJSON.h>

#include "common/hashfn.h"
#include "miscadmin.h"
#include "utils/timestamp.h"

#include "stripe_http.h"
#include "stripe_session.h"

/* longest authentication token we keep */
#define UB_SESSION_TOKEN_LEN		1024
/* a session is renewed this long before Stripe's expires_at */
#define UB_SESSION_MARGIN_MS		60000
/* when expires_at cannot be read: renew after this long */
#define UB_SESSION_FALLBACK_MS		(5 * 60000)

static char ub_token[UB_SESSION_TOKEN_LEN];
static TimestampTz ub_token_renew_at = 0;
static uint32 ub_token_owner = 0;	/* hash of the key and API base that opened it */
static uint64 ub_session_gen = 0;

static int	ub_session_progress_cb(void *p, curl_off_t dltotal, curl_off_t dlnow,
								   curl_off_t ultotal, curl_off_t ulnow);
static uint32 ub_session_owner(const UbStripeConfig *cfg);
static bool ub_parse_rfc3339(const char *s, int64 *unix_secs);

/* Empties an answer before its request starts. */
void
ub_answer_reset(UbAnswer *a)
{
	a->len = 0;
	a->truncated = false;
	a->body[0] = '\0';
	a->request_id[0] = '\0';
	a->retry_after[0] = '\0';
	a->should_retry[0] = '\0';
	a->errbuf[0] = '\0';
}

/* libcurl write callback: copies into the answer's fixed buffer, drops the excess. */
size_t
ub_answer_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	UbAnswer   *a = (UbAnswer *) userdata;
	size_t		n = size * nmemb;
	size_t		room = UB_ANSWER_MAX - a->len;

	if (n > room)
	{
		a->truncated = true;
		n = room;
	}
	memcpy(a->body + a->len, ptr, n);
	a->len += n;
	a->body[a->len] = '\0';
	return size * nmemb;
}

/* libcurl header callback: keeps Request-Id, Retry-After and Stripe-Should-Retry. */
size_t
ub_answer_header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	UbAnswer   *a = (UbAnswer *) userdata;
	size_t		len = size * nitems;

	if (len > 11 && pg_strncasecmp(buffer, "request-id:", 11) == 0)
		ub_http_header_value(buffer, len, 11, a->request_id, sizeof(a->request_id));
	else if (len > 12 && pg_strncasecmp(buffer, "retry-after:", 12) == 0)
		ub_http_header_value(buffer, len, 12, a->retry_after, sizeof(a->retry_after));
	else if (len > 20 && pg_strncasecmp(buffer, "stripe-should-retry:", 20) == 0)
		ub_http_header_value(buffer, len, 20, a->should_retry, sizeof(a->should_retry));
	return len;
}

/* Progress callback of the (blocking) session request: a pending interrupt aborts it. */
static int
ub_session_progress_cb(void *p, curl_off_t dltotal, curl_off_t dlnow,
					   curl_off_t ultotal, curl_off_t ulnow)
{
	return InterruptPending ? 1 : 0;
}

/* Wipes the session token. */
void
ub_session_forget(void)
{
	explicit_bzero(ub_token, sizeof(ub_token));
	ub_token_renew_at = 0;
	ub_token_owner = 0;
}

/* Which key and API base a session belongs to (a hash: the key itself is not kept). */
static uint32
ub_session_owner(const UbStripeConfig *cfg)
{
	uint32		h = hash_bytes((const unsigned char *) cfg->api_key, strlen(cfg->api_key));

	return hash_combine(h, hash_bytes((const unsigned char *) cfg->api_base,
									  strlen(cfg->api_base)));
}

/*
 * Reads an RFC 3339 date-time ("2026-07-29T12:15:00.000Z", or with an offset
 * such as +02:00) into Unix seconds; false when it is not one.
 */
static bool
ub_parse_rfc3339(const char *s, int64 *unix_secs)
{
	int			y,
				mo,
				d,
				h,
				mi,
				sec,
				consumed = 0;
	const char *p;
	int64		days;
	int			yy,
				era,
				yoe,
				doy,
				doe;

	if (s == NULL ||
		sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &consumed) != 6 ||
		consumed == 0)
		return false;
	if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60)
		return false;
	p = s + consumed;
	if (*p == '.')
		for (p++; *p >= '0' && *p <= '9'; p++)
			;
	/* days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm) */
	yy = y - (mo <= 2);
	era = (yy >= 0 ? yy : yy - 399) / 400;
	yoe = yy - era * 400;
	doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	days = (int64) era * 146097 + doe - 719468;
	*unix_secs = days * 86400 + h * 3600 + mi * 60 + sec;
	if (*p == 'Z' || *p == 'z')
		return p[1] == '\0';
	if ((*p == '+' || *p == '-') && strlen(p) == 6 && p[3] == ':')
	{
		int			oh = atoi(p + 1);
		int			om = atoi(p + 4);

		*unix_secs -= (*p == '+' ? 1 : -1) * (int64) (oh * 3600 + om * 60);
		return true;
	}
	return false;
}

/*
 * Opens a meter event session with the secret key (a blocking request,
 * bounded by the export timeouts and cut short by an interrupt).  On success
 * the token is in ub_token; otherwise error says why (redacted of the key),
 * with the HTTP status (0 = no answer) and Request-Id.
 */
bool
ub_session_open(const UbStripeConfig *cfg, char *error, size_t errlen, int *http_status,
				char *request_id)
{
	UbAnswer   *answer;
	CURL	   *easy;
	struct curl_slist *volatile headers = NULL;
	char	   *url;
	char	   *auth;
	CURLcode	rc;
	long		status = 0;
	volatile bool ok = false;

	ub_session_forget();
	error[0] = '\0';
	request_id[0] = '\0';
	*http_status = 0;

	easy = curl_easy_init();
	if (easy == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));
	/* from here on the key's copy is wiped on every path (PG_FINALLY) */
	answer = palloc0(sizeof(UbAnswer));
	url = psprintf("%s/v2/billing/meter_event_session", cfg->api_base);
	auth = psprintf("Authorization: Bearer %s", cfg->api_key);
	PG_TRY();
	{
		struct curl_slist *h;

		h = curl_slist_append(NULL, auth);
		if (h)
			headers = h;
		h = h ? curl_slist_append(h, "Content-Type: application/json") : NULL;
		h = h ? curl_slist_append(h, "Expect:") : NULL;
		if (h && cfg->stripe_version && cfg->stripe_version[0])
		{
			char	   *v = psprintf("Stripe-Version: %s", cfg->stripe_version);

			h = curl_slist_append(h, v);
			pfree(v);
		}
		if (h == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory while building request headers")));
		headers = h;

		curl_easy_setopt(easy, CURLOPT_URL, url);
		curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
		curl_easy_setopt(easy, CURLOPT_POST, 1L);
		curl_easy_setopt(easy, CURLOPT_POSTFIELDS, "{}");
		curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, 2L);
		curl_easy_setopt(easy, CURLOPT_HTTPHEADER, headers);
		curl_easy_setopt(easy, CURLOPT_USERAGENT, "usage_billing/1.0 (PostgreSQL extension)");
		curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, ub_answer_write_cb);
		curl_easy_setopt(easy, CURLOPT_WRITEDATA, answer);
		curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, ub_answer_header_cb);
		curl_easy_setopt(easy, CURLOPT_HEADERDATA, answer);
		curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, answer->errbuf);
		curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, (long) cfg->connect_timeout_ms);
		curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long) cfg->timeout_ms);
		curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
		curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
		curl_easy_setopt(easy, CURLOPT_NOPROGRESS, 0L);
		curl_easy_setopt(easy, CURLOPT_XFERINFOFUNCTION, ub_session_progress_cb);

		rc = curl_easy_perform(easy);
		strlcpy(request_id, answer->request_id, UB_REQUEST_ID_LEN);
		if (rc != CURLE_OK)
			snprintf(error, errlen, "could not open a meter event session: network error: %s",
					 answer->errbuf[0] ? answer->errbuf : curl_easy_strerror(rc));
		else
		{
			curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
			*http_status = (int) status;
			if (status >= 200 && status < 300)
			{
				cJSON	   *root = cJSON_ParseWithLength(answer->body, answer->len);
				cJSON	   *tok = root ? cJSON_GetObjectItemCaseSensitive(root, "authentication_token") : NULL;
				cJSON	   *exp = root ? cJSON_GetObjectItemCaseSensitive(root, "expires_at") : NULL;
				int64		expires;
				TimestampTz now = GetCurrentTimestamp();

				/* nothing below throws before cJSON_Delete */
				if (cJSON_IsString(tok) && tok->valuestring && tok->valuestring[0] &&
					strlen(tok->valuestring) < sizeof(ub_token))
				{
					strlcpy(ub_token, tok->valuestring, sizeof(ub_token));
					if (cJSON_IsString(exp) && ub_parse_rfc3339(exp->valuestring, &expires))
					{
						TimestampTz at = time_t_to_timestamptz((pg_time_t) expires);
						int64		margin_ms = Min(UB_SESSION_MARGIN_MS,
													Max((at - now) / 4000, 0));

						/* renewed a minute early, or a quarter early for a short session */
						ub_token_renew_at = TimestampTzPlusMilliseconds(at, -margin_ms);
					}
					else
						ub_token_renew_at = TimestampTzPlusMilliseconds(now, UB_SESSION_FALLBACK_MS);
					ub_token_owner = ub_session_owner(cfg);
					ub_session_gen++;
					ok = true;
				}
				else
					snprintf(error, errlen, "could not open a meter event session: HTTP %ld without an authentication_token",
							 status);
				if (root)
				{
					/* the token must not linger in freed memory either */
					if (cJSON_IsString(tok) && tok->valuestring)
						explicit_bzero(tok->valuestring, strlen(tok->valuestring));
					cJSON_Delete(root);
				}
			}
			else
			{
				UbStripeError err;

				ub_http_parse_error(answer->body, answer->len, &err);
				snprintf(error, errlen, "could not open a meter event session: HTTP %ld%s%s%s%s: %s",
						 status, err.type[0] ? " " : "", err.type, err.code[0] ? "/" : "", err.code,
						 err.message[0] ? err.message : "(no message)");
			}
		}
		ub_redact_keys(error, cfg->api_key);
	}
	PG_FINALLY();
	{
		curl_easy_cleanup(easy);
		if (headers)
			curl_slist_free_all(headers);
		explicit_bzero(answer->body, sizeof(answer->body));
		pfree(answer);
		explicit_bzero(auth, strlen(auth));
		pfree(auth);
		pfree(url);
	}
	PG_END_TRY();
	CHECK_FOR_INTERRUPTS();
	return ok;
}

/* True when the session may carry requests: opened with this key and API base, not due for renewal. */
bool
ub_session_usable(const UbStripeConfig *cfg)
{
	return ub_token[0] != '\0' && GetCurrentTimestamp() < ub_token_renew_at &&
		ub_token_owner == ub_session_owner(cfg);
}

/* The token, for an Authorization header only. */
const char *
ub_session_token(void)
{
	return ub_token;
}

/* Counts the sessions opened: a request remembers the one it was sent with. */
uint64
ub_session_generation(void)
{
	return ub_session_gen;
}

/* A request of session generation was answered 401: forget that session, not a newer one. */
void
ub_session_expired(uint64 generation)
{
	if (generation == ub_session_gen)
		ub_session_forget();
}
