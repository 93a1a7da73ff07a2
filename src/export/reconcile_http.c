/*-------------------------------------------------------------------------
 * reconcile_http.c
 *	  The HTTP side of reconciliation: one synchronous
 *	  GET /v1/billing/meters/{id}/event_summaries per customer, meter and
 *	  period, and the reading of its answer.
 *
 * Vocabulary (see reconcile.c for the run and the rule)
 *   window    [start_time, end_time): Stripe wants both on minute
 *             boundaries, so the period is widened to whole minutes (billing
 *             periods normally start on one)
 *   summary   a billing.meter_event_summary; without value_grouping_window
 *             Stripe answers one for the whole window, whose aggregated_value
 *             is what Stripe holds for the period (sum: the sum of the not
 *             cancelled events; last: the latest value)
 *
 * The request is stripe_http.c's (GET: no Idempotency-Key; Stripe-Account
 * for a customer of a connected account).  cJSON's allocations are freed
 * before anything can throw.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include <cjson/cJSON.h>

#include "lib/stringinfo.h"

#include "reconcile.h"
#include "stripe_http.h"

static bool ub_reconcile_parse(const UbHttpAnswer *ans, double *value);

/* Sums aggregated_value over the summaries of a list answer; false when the answer is not one. */
static bool
ub_reconcile_parse(const UbHttpAnswer *ans, double *value)
{
	cJSON	   *root;
	cJSON	   *data;
	cJSON	   *item;
	bool		ok = true;

	*value = 0;
	if (ans->truncated || ans->len == 0)
		return false;
	root = cJSON_ParseWithLength(ans->body, ans->len);
	if (root == NULL)
		return false;
	data = cJSON_GetObjectItemCaseSensitive(root, "data");
	if (!cJSON_IsArray(data))
		ok = false;
	else
		cJSON_ArrayForEach(item, data)
		{
			cJSON	   *v = cJSON_GetObjectItemCaseSensitive(item, "aggregated_value");

			if (!cJSON_IsNumber(v) || isnan(v->valuedouble) || isinf(v->valuedouble))
			{
				ok = false;
				break;
			}
			*value += v->valuedouble;
		}
	cJSON_Delete(root);
	return ok;
}

/* Reads Stripe's summary of one customer, meter and period into k (synchronous). */
void
ub_reconcile_fetch(UbSummaryCheck *k, const UbStripeConfig *cfg)
{
	UbHttpRequest req;
	UbHttpAnswer *ans = palloc0(sizeof(UbHttpAnswer));
	StringInfoData url;
	StringInfoData query;
	char		num[32];
	int64		start = k->start_s - ((k->start_s % 60) + 60) % 60;
	int64		end = k->end_s + (60 - ((k->end_s % 60) + 60) % 60) % 60;
	char	   *esc;

	k->answered = false;
	k->throttled = false;
	k->http_status = 0;
	k->value[0] = k->request_id[0] = k->error[0] = '\0';

	initStringInfo(&query);
	ub_http_form_add(&query, "customer", k->stripe_customer_id);
	snprintf(num, sizeof(num), INT64_FORMAT, start);
	ub_http_form_add(&query, "start_time", num);
	snprintf(num, sizeof(num), INT64_FORMAT, end);
	ub_http_form_add(&query, "end_time", num);
	esc = curl_easy_escape(NULL, k->stripe_meter_id, 0);
	if (esc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while encoding a Stripe request")));
	initStringInfo(&url);
	appendStringInfo(&url, "%s/v1/billing/meters/%s/event_summaries?%s", cfg->api_base, esc, query.data);
	curl_free(esc);

	memset(&req, 0, sizeof(req));
	req.answer = ans;
	PG_TRY();
	{
		CURLcode	res;
		long		status = 0;

		ub_http_prepare(&req, cfg, url.data, NULL, NULL, k->stripe_account);
		res = ub_http_perform(&req, &status);
		k->http_status = (int) status;
		strlcpy(k->request_id, ans->request_id, sizeof(k->request_id));
		if (res != CURLE_OK)
			snprintf(k->error, sizeof(k->error), "network error: %s",
					 ans->errbuf[0] ? ans->errbuf : curl_easy_strerror(res));
		else if (status >= 200 && status < 300)
		{
			double		v;

			if (ub_reconcile_parse(ans, &v))
			{
				snprintf(k->value, sizeof(k->value), "%.17g", v);
				k->answered = true;
			}
			else
				snprintf(k->error, sizeof(k->error),
						 "HTTP %ld: the answer is not a list of meter event summaries", status);
		}
		else
		{
			UbStripeError err;

			ub_http_parse_error(ans->body, ans->len, &err);
			ub_http_describe(k->error, sizeof(k->error), "event summaries: ", status, &err, ans,
							 cfg->api_key);
			k->throttled = (status == 429);
		}
	}
	PG_FINALLY();
	{
		ub_http_release(&req, NULL);
	}
	PG_END_TRY();
	pfree(url.data);
	pfree(query.data);
	pfree(ans);
}
