/*-------------------------------------------------------------------------
 * limits.c
 *	  check_limit: would increment_usage(requested) succeed, and what then?
 *
 * check_limit is read-only and sits on the hot path next to
 * increment_usage: the customer, meter and effective limit come from the
 * backend's target cache (target_cache.c, filled by ub_lookup_usage_target
 * and emptied on every catalog change), then one probe of usage_aggregates'
 * primary key reads the meter's aggregate in the customer's current billing
 * period; no SPI, no executor, no ledger.  It never raises for bad input: an unknown
 * customer or meter, or an invalid requested quantity, answers
 * allowed = false with a reason.
 *
 * Words used here:
 *   current     the meter's aggregate in the current billing period (0
 *               when nothing was recorded yet)
 *   projection  the aggregate increment_usage(requested) would leave:
 *               current + requested (sum, count), greatest(current,
 *               requested) (max), requested (last), current + 1
 *               (unique_count: we cannot know whether the value is new, so
 *               we assume the worst case)
 *
 * allowed, status and estimated_overage_cost use the projection.
 * remaining is included - current floored at 0, i.e. what is still left
 * before this request, the same quantity increment_usage reports after a
 * call; it is NULL when the meter is unlimited.  estimated_overage_cost is
 * NULL when the meter is not billed.  overage_allowed says that usage past
 * included is billed rather than refused: the meter is billed and has no
 * hard cap.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "periods.h"
#include "pricing.h"
#include "reading.h"
#include "usage_billing.h"

PG_FUNCTION_INFO_V1(ub_check_limit);

#define CHECK_LIMIT_COLS 8

/* One result row of check_limit; NULL pointers become SQL NULLs. */
typedef struct CheckResult
{
	bool		allowed;
	Numeric		current;
	Numeric		included;
	Numeric		remaining;
	const char *status;
	bool		has_overage_allowed;
	bool		overage_allowed;
	Numeric		estimated_overage_cost;
	const char *reason;
} CheckResult;

static bool RequestedIsValid(Numeric requested, UbAggregation agg);
static Numeric ProjectTotal(UbAggregation agg, Numeric current, Numeric requested);
static void EmitResult(FunctionCallInfo fcinfo, const CheckResult *r);

/* The same rule increment_usage applies to its amount: finite, and not negative where it adds up. */
static bool
RequestedIsValid(Numeric requested, UbAggregation agg)
{
	if (requested == NULL || ub_num_is_special(requested))
		return false;
	if ((agg == UB_AGG_SUM || agg == UB_AGG_COUNT || agg == UB_AGG_UNIQUE_COUNT) &&
		ub_num_cmp(requested, ub_num_zero()) < 0)
		return false;
	return true;
}

/* The aggregate the period would have after increment_usage(requested). */
static Numeric
ProjectTotal(UbAggregation agg, Numeric current, Numeric requested)
{
	switch (agg)
	{
		case UB_AGG_SUM:
		case UB_AGG_COUNT:
			return ub_num_add(current, requested);
		case UB_AGG_MAX:
			return ub_num_max(current, requested);
		case UB_AGG_LAST:
			return requested;
		case UB_AGG_UNIQUE_COUNT:
			return ub_num_add(current, ub_num_int(1));
	}
	elog(ERROR, "unknown aggregation %d", (int) agg);
	pg_unreachable();
}

/* Puts the single result row into the materialized result set. */
static void
EmitResult(FunctionCallInfo fcinfo, const CheckResult *r)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		values[CHECK_LIMIT_COLS];
	bool		nulls[CHECK_LIMIT_COLS];

	memset(nulls, 0, sizeof(nulls));
	values[0] = BoolGetDatum(r->allowed);
#define NUMERIC_COL(i, v) \
	do { if ((v) == NULL) nulls[i] = true; else values[i] = NumericGetDatum(v); } while (0)
	NUMERIC_COL(1, r->current);
	NUMERIC_COL(2, r->included);
	NUMERIC_COL(3, r->remaining);
#undef NUMERIC_COL
	if (r->status == NULL)
		nulls[4] = true;
	else
		values[4] = CStringGetTextDatum(r->status);
	if (!r->has_overage_allowed)
		nulls[5] = true;
	else
		values[5] = BoolGetDatum(r->overage_allowed);
	if (r->estimated_overage_cost == NULL)
		nulls[6] = true;
	else
		values[6] = NumericGetDatum(r->estimated_overage_cost);
	if (r->reason == NULL)
		nulls[7] = true;
	else
		values[7] = CStringGetTextDatum(r->reason);

	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/*
 * SQL: check_limit(customer_id, meter, requested) answers without writing
 * whether increment_usage(requested) would succeed, and with which status.
 */
Datum
ub_check_limit(PG_FUNCTION_ARGS)
{
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *meter = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	Numeric		requested = PG_ARGISNULL(2) ? NULL : PG_GETARG_NUMERIC(2);
	UbCustomer	customer;
	UbMeter		m;
	UbLimit		limit;
	bool		meter_found = false;
	CheckResult r;
	TimestampTz period_start;
	TimestampTz period_end;
	Numeric		projection;

	ub_init_srf(fcinfo);
	memset(&r, 0, sizeof(r));

	if (customer_id == NULL ||
		!ub_cached_usage_target(customer_id, meter != NULL ? meter : "", &customer, &m,
								&meter_found, &limit))
	{
		r.reason = "unknown customer";
		goto done;
	}
	/* the same order of refusals as increment_usage: status, then meter, then amount */
	if (strcmp(customer.status, "active") != 0)
		r.reason = psprintf("customer %s", customer.status);
	if (meter == NULL || !meter_found)
	{
		if (r.reason == NULL)
			r.reason = "unknown meter";
		goto done;
	}

	ub_period_containing(customer.billing_anchor, &customer.period,
						 GetCurrentTransactionStartTimestamp(), &period_start, &period_end);
	r.current = ub_current_total(customer_id, meter, period_start);
	r.included = limit.exists ? limit.included : NULL;
	r.remaining = ub_remaining(&limit, r.current);
	r.has_overage_allowed = true;
	r.overage_allowed = ub_limit_is_billed(&limit) && !limit.hard_cap;

	if (r.reason != NULL)
	{
		/* refused anyway; still say where the request would land */
		if (RequestedIsValid(requested, m.aggregation))
		{
			projection = ProjectTotal(m.aggregation, r.current, requested);
			r.status = ub_usage_status(&limit, projection);
			r.estimated_overage_cost = ub_usage_cost(&limit, projection);
		}
		goto done;
	}
	if (!RequestedIsValid(requested, m.aggregation))
	{
		r.reason = "invalid requested quantity";
		goto done;
	}

	projection = ProjectTotal(m.aggregation, r.current, requested);
	r.status = ub_usage_status(&limit, projection);
	r.estimated_overage_cost = ub_usage_cost(&limit, projection);
	if (limit.exists && limit.hard_cap && limit.included != NULL &&
		ub_num_cmp(projection, limit.included) > 0)
	{
		r.reason = "hard cap";
		goto done;
	}
	r.allowed = true;

done:
	EmitResult(fcinfo, &r);
	return (Datum) 0;
}
