/*-------------------------------------------------------------------------
 * limits.c
 *	  check_limit: would increment_usage(requested) succeed, and what then?
 *
 * check_limit is read-only and sits on the hot path next to
 * increment_usage: the customer, meter and effective limit come from the
 * backend's catalog cache (catalog_cache.c; on a miss ub_lookup_usage_target
 * reads them through SPI and fills it), then one probe of usage_aggregates'
 * primary key reads the meter's aggregate in the customer's current billing
 * period: on a cache hit no SPI, no executor, no ledger.  The function is
 * declared without SET search_path (a function SET costs about a fifth of a
 * cached call); the SQL of a miss runs under the safe search path
 * (ub_push_safe_search_path), as every statement of ours does.
 * It never raises for bad input: an unknown customer or meter, or an
 * invalid requested quantity, answers allowed = false with a reason.
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
 * allowed, status and estimated_overage_cost use the projection.  So
 * status is a forecast where increment_usage's is a report: at 10 of 10
 * included increment_usage returned 'warning', and check_limit with the
 * default requested 1 answers 'over_limit' (the next unit would be over).
 * The status as it stands is current_usage.usage_status, or check_limit
 * with requested 0 on sum, count and max meters (doc/api.md, section 3).
 * remaining is included - current floored at 0, i.e. what is still left
 * before this request, the same quantity increment_usage reports after a
 * call; it is NULL when the meter is unlimited.  estimated_overage_cost is
 * NULL when the meter is not billed.  overage_allowed says that usage past
 * included is billed rather than refused: the meter is billed and has no
 * hard cap.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "catalog_cache.h"
#include "escrow.h"
#include "periods.h"
#include "pricing.h"
#include "period_usage.h"
#include "results.h"
#include "record.h"
#include "relations.h"
#include "holds.h"
#include "errors.h"
#include "citus.h"

PG_FUNCTION_INFO_V1(ub_check_limit);

#define CHECK_LIMIT_COLS 9		/* 8 before 1.4: the row's descriptor says which */

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
	Numeric		reserved;		/* live holds of the key (reservations.c) */
} CheckResult;

static Numeric CurrentTotal(const char *customer_id, const char *meter,
							TimestampTz period_start, bool *held);
static bool LookupTarget(const char *customer_id, const char *meter, UbCustomer *customer,
						 UbMeter *m, bool *meter_found, UbLimit *limit, bool *spi_connected);
static bool RequestedIsValid(Numeric requested, const UbMeter *m);
static Numeric ProjectTotal(UbAggregation agg, Numeric current, Numeric requested);
static void EmitResult(FunctionCallInfo fcinfo, const CheckResult *r);

/*
 * The meter's aggregate total in one period, 0 when nothing was recorded:
 * one probe of the primary key (customer_id, meter, period_start) with the
 * statement's snapshot.
 */
/* The same total read with SQL, for distributed tables (usage_billing.direct_reads = off). */
static Numeric
CurrentTotalSql(const char *customer_id, const char *meter, TimestampTz period_start)
{
	static SPIPlanPtr plans[2];	/* per schema: ub_totals_plan */
	static SPIPlanPtr routable;	/* distributed: no slots (citus.c) */
	Oid			types[3] = {TEXTOID, TEXTOID, TIMESTAMPTZOID};
	MemoryContext caller = CurrentMemoryContext;
	Datum		args[3];
	Numeric		total = NULL;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	if (SPI_execute_plan(ub_distributed() ?
						 ub_prepare_routable(&routable,
											 "SELECT total FROM usage_billing.usage_aggregates"
											 " WHERE customer_id = $1 AND meter = $2 AND period_start = $3",
											 3, types) :
						 ub_totals_plan(plans,
										"SELECT total FROM usage_billing.aggregate_totals"
										" WHERE customer_id = $1 AND meter = $2 AND period_start = $3",
										3, types),
						 args, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "aggregate read failed");
	if (SPI_processed > 0)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
		{
			MemoryContext spi = MemoryContextSwitchTo(caller);

			total = DatumGetNumericCopy(d);
			MemoryContextSwitchTo(spi);
		}
	}
	PopOverrideSearchPath();
	SPI_finish();
	return total != NULL ? total : ub_num_zero();
}

static Numeric
CurrentTotal(const char *customer_id, const char *meter, TimestampTz period_start, bool *held)
{
	Relation	rel;
	Relation	idx;
	Oid			relid;
	Oid			pkey;
	AttrNumber	total_attnum;
	AttrNumber	slotted_attnum;
	AttrNumber	reserved_attnum;
	Oid			slots;
	Oid			slots_index;
	bool		slotted = false;
	Snapshot	snapshot;
	ScanKeyData keys[3];
	TupleTableSlot *tuple;
	IndexScanDesc scan;
	Numeric		total = NULL;

	/* on the SQL path the caller reads the holds whenever there may be some */
	*held = true;
	if (!ub_use_direct_reads())
		return CurrentTotalSql(customer_id, meter, period_start);
	*held = false;
	{
		/* keep our own copies: opening a relation may process an invalidation */
		const UbRelations *rels = ub_relations();

		relid = rels->aggregates;
		pkey = rels->aggregates_pkey;
		total_attnum = rels->agg_total;
		slotted_attnum = OidIsValid(rels->slots) ? rels->agg_slotted : InvalidAttrNumber;
		reserved_attnum = rels->agg_reserved;
		slots = rels->slots;
		slots_index = rels->slots_pkey;
	}
	rel = table_open(relid, AccessShareLock);
	idx = index_open(pkey, AccessShareLock);

	ub_key_scankeys(idx, CStringGetTextDatum(customer_id), CStringGetTextDatum(meter),
					period_start, keys);

	snapshot = ActiveSnapshotSet() ? GetActiveSnapshot() : GetTransactionSnapshot();
	tuple = table_slot_create(rel, NULL);
	scan = index_beginscan(rel, idx, snapshot, 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	if (index_getnext_slot(scan, ForwardScanDirection, tuple))
	{
		bool		isnull;
		Datum		d = slot_getattr(tuple, total_attnum, &isnull);

		if (!isnull)
			total = DatumGetNumericCopy(d);
		if (slotted_attnum != InvalidAttrNumber)
		{
			d = slot_getattr(tuple, slotted_attnum, &isnull);
			slotted = !isnull && DatumGetBool(d);
		}
		if (reserved_attnum != InvalidAttrNumber)
		{
			d = slot_getattr(tuple, reserved_attnum, &isnull);
			*held = !isnull && ub_num_cmp(DatumGetNumeric(d), ub_num_zero()) != 0;
		}
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(tuple);

	/* part of a contended key's total is in its escrow slots, under the same snapshot */
	if (slotted && total != NULL)
	{
		Relation	srel = table_open(slots, AccessShareLock);
		Relation	sidx = index_open(slots_index, AccessShareLock);
		Numeric		held;
		int64		events;

		ub_escrow_slot_sum(srel, sidx, keys[0].sk_argument, keys[1].sk_argument, period_start,
						   snapshot, &held, &events);
		total = ub_num_add(total, held);
		index_close(sidx, AccessShareLock);
		table_close(srel, AccessShareLock);
	}
	index_close(idx, AccessShareLock);
	table_close(rel, AccessShareLock);

	return total != NULL ? total : ub_num_zero();
}

/*
 * The usage target from the backend's catalog cache; on a miss, connects SPI
 * (the caller must SPI_finish when *spi_connected) and reads it with a safe
 * search_path.
 */
static bool
LookupTarget(const char *customer_id, const char *meter, UbCustomer *customer, UbMeter *m,
			 bool *meter_found, UbLimit *limit, bool *spi_connected)
{
	bool		found;

	if (ub_cache_get(customer_id, meter, customer, m, meter_found, limit))
		return true;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	*spi_connected = true;
	ub_push_safe_search_path();
	found = ub_lookup_usage_target(customer_id, meter, customer, m, meter_found, limit);
	PopOverrideSearchPath();
	return found;
}

/*
 * increment_usage's rules for amounts: finite, not negative where it adds
 * up, and within the meter's decimals and max_amount.  For a count meter
 * requested is a number of events: a whole number, with no max_amount.
 */
static bool
RequestedIsValid(Numeric requested, const UbMeter *m)
{
	UbAggregation agg = m->aggregation;
	Numeric		normalized;
	char	   *message;
	char	   *detail;
	char	   *hint;

	if (requested == NULL || ub_num_is_special(requested))
		return false;
	if ((agg == UB_AGG_SUM || agg == UB_AGG_COUNT || agg == UB_AGG_UNIQUE_COUNT) &&
		ub_num_cmp(requested, ub_num_zero()) < 0)
		return false;
	if (agg == UB_AGG_COUNT || agg == UB_AGG_UNIQUE_COUNT)
		return ub_num_cmp(DatumGetNumeric(DirectFunctionCall1(numeric_floor,
															  NumericGetDatum(requested))),
						  requested) == 0;
	return ub_check_amount_limits("requested", m->meter, m, requested, &normalized, &message,
								  &detail, &hint);
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
	/* from 1.4: the key's live holds */
	if (r->reserved == NULL)
		nulls[8] = true;
	else
		values[8] = NumericGetDatum(r->reserved);

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
	bool		spi_connected = false;

	ub_init_srf(fcinfo);
	memset(&r, 0, sizeof(r));

	/* on a miss the target lives in SPI memory: emit the row before SPI_finish */
	if (customer_id == NULL ||
		!LookupTarget(customer_id, meter != NULL ? meter : "", &customer, &m,
					  &meter_found, &limit, &spi_connected))
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
	{
		bool		held;

		r.current = CurrentTotal(customer_id, meter, period_start, &held);
		r.reserved = ub_num_zero();
		/* the row says the key has holds: sum the live ones (expired ones count for nothing) */
		if (held && ub_reservations_installed())
		{
			MemoryContext caller = CurrentMemoryContext;
			Numeric		live;

			if (!spi_connected)
			{
				if (SPI_connect() != SPI_OK_CONNECT)
					elog(ERROR, "SPI_connect failed");
				spi_connected = true;
			}
			ub_push_safe_search_path();
			live = ub_reservations_live(customer_id, meter, period_start);
			PopOverrideSearchPath();
			{
				MemoryContext spi = MemoryContextSwitchTo(caller);

				r.reserved = DatumGetNumericCopy(NumericGetDatum(live));
				MemoryContextSwitchTo(spi);
			}
		}
	}
	r.included = limit.exists ? limit.included : NULL;
	r.remaining = ub_remaining(&limit, r.current);
	r.has_overage_allowed = true;
	r.overage_allowed = ub_limit_is_billed(&limit) && !limit.hard_cap;

	if (r.reason != NULL)
	{
		/* refused anyway; still say where the request would land */
		if (RequestedIsValid(requested, &m))
		{
			projection = ProjectTotal(m.aggregation, r.current, requested);
			r.status = ub_usage_status(&limit, projection);
			r.estimated_overage_cost = ub_usage_cost(&limit, projection);
		}
		goto done;
	}
	if (!RequestedIsValid(requested, &m))
	{
		r.reason = "invalid requested quantity";
		goto done;
	}

	projection = ProjectTotal(m.aggregation, r.current, requested);
	r.status = ub_usage_status(&limit, projection);
	r.estimated_overage_cost = ub_usage_cost(&limit, projection);
	if (limit.exists && limit.hard_cap && limit.included != NULL &&
		ub_num_cmp(ub_num_add(projection, r.reserved), limit.included) > 0)
	{
		r.reason = ub_num_cmp(projection, limit.included) > 0 ? "hard cap" : "hard cap (reserved)";
		goto done;
	}
	r.allowed = true;

done:
	EmitResult(fcinfo, &r);
	if (spi_connected)
		SPI_finish();
	return (Datum) 0;
}
