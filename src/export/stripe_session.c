/*-------------------------------------------------------------------------
 * stripe_session.c
 *	  The v2 meter event session: POST {stripe_api_base}/v2/billing/
 *	  meter_event_session with the secret key answers an authentication token
 *	  valid 15 minutes, which the meter event stream (stripe_stream.c) sends
 *	  instead of the key.  The request goes through the one HTTP layer
 *	  (stripe_http.c).
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

static uint32 ub_session_owner(const UbStripeConfig *cfg);
static bool ub_parse_rfc3339(const char *s, int64 *unix_secs);

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
	UbHttpAnswer *answer;
	UbHttpRequest req;
	char	   *url;
	CURLcode	rc;
	long		status = 0;
	volatile bool ok = false;

	ub_session_forget();
	error[0] = '\0';
	request_id[0] = '\0';
	*http_status = 0;

	memset(&req, 0, sizeof(req));
	answer = palloc0(sizeof(UbHttpAnswer));
	url = psprintf("%s/v2/billing/meter_event_session", cfg->api_base);
	req.answer = answer;
	PG_TRY();
	{
		/* the session belongs to the platform: no Stripe-Context */
		ub_http_prepare_json(&req, cfg, url, pstrdup("{}"), cfg->api_key, NULL);
		rc = ub_http_perform(&req, &status);
		strlcpy(request_id, answer->request_id, UB_REQUEST_ID_LEN);
		*http_status = (int) status;
		if (rc != CURLE_OK)
			snprintf(error, errlen, "could not open a meter event session: network error: %s",
					 answer->errbuf[0] ? answer->errbuf : curl_easy_strerror(rc));
		else if (status >= 200 && status < 300)
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
			ub_http_describe(error, errlen, "could not open a meter event session: ", status,
							 &err, answer, cfg->api_key);
		}
		ub_redact_keys(error, cfg->api_key);
	}
	PG_FINALLY();
	{
		/* wipes the Authorization line (the key) */
		ub_http_release(&req, NULL);
		/* the answer held the token */
		explicit_bzero(answer->body, sizeof(answer->body));
		pfree(answer);
		pfree(url);
	}
	PG_END_TRY();
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
