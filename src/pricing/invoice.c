/*-------------------------------------------------------------------------
 * invoice.c
 *	  calculate_overage and preview_invoice: the money of a billing period.
 *
 * Both price one billing period of a customer: the one that contains the
 * instant period_start (NULL: now), by segments of its plan history
 * (period_pricing.c): per segment a base line (the plan's base price
 * prorated by time) and a usage line per billed meter, priced under that
 * segment's plan.  A period without a plan change is one segment, whose
 * totals come from usage_aggregates.  A meter is "billed" when its
 * effective limit has tiers, or both an overage price and an included
 * quantity (ub_limit_is_billed); only billed meters appear.  Every row has
 * the segment_start of its segment (the total line: NULL).
 *
 * preview_invoice of a finalized period (finalize.c) returns the lines of
 * the finalized invoice, as they were written: corrections made since go
 * to a later invoice.  price_period is the same pricing for finalize.c,
 * with what a correction is priced with later (the usage total and a
 * snapshot of the limit of each usage line).
 *
 * calculate_overage returns exact numeric costs.  preview_invoice rounds
 * each line to the currency's minor unit, half away from zero, and its
 * 'total' line is the sum of the rounded lines, so the lines always add up.
 *
 * Usage lines: quantity is the overage quantity (tiers: the total, since
 * tiers price the whole quantity) and unit_price the price of one unit,
 * overage_price / overage_unit (tiers: NULL, there is no single price).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "catalog/pg_type.h"
#include "lib/stringinfo.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "catalog/namespace.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "period_pricing.h"
#include "periods.h"
#include "pricing.h"
#include "period_usage.h"
#include "results.h"
#include "errors.h"
#include "relations.h"
#include "citus.h"

PG_FUNCTION_INFO_V1(ub_calculate_overage);
PG_FUNCTION_INFO_V1(ub_preview_invoice);
PG_FUNCTION_INFO_V1(ub_price_period_sql);

#define OVERAGE_COLS 7
#define INVOICE_COLS 6
#define PRICE_PERIOD_COLS 8

/* One billing period of a customer, priced by segments. */
typedef struct PricedPeriod
{
	UbCustomer	customer;
	TimestampTz period_start;
	TimestampTz period_end;
	List	   *segments;		/* UbPricedSegment *, in time order */
} PricedPeriod;

/* One line as preview_invoice and price_period return it. */
typedef struct PricedLine
{
	const char *line;
	const char *meter;
	TimestampTz segment_start;
	bool		has_segment;
	Numeric		quantity;
	Numeric		unit_price;
	Numeric		amount;			/* rounded */
	Numeric		usage_total;
	const UbLimit *limit;
} PricedLine;

static void LoadPricedPeriod(const char *customer_id, TimestampTz at, PricedPeriod *pp);
static Numeric NullableNumeric(Numeric v, bool *isnull);
static List *PeriodLines(const PricedPeriod *pp);
static bool FinalizedLines(ReturnSetInfo *rsinfo, const char *customer_id, TimestampTz period_start);
static char *PricingJson(const UbLimit *limit);

/* Reads the customer (P0002 when unknown), its period and the period's segments. */
static void
LoadPricedPeriod(const char *customer_id, TimestampTz at, PricedPeriod *pp)
{
	ub_require_customer(customer_id, &pp->customer);
	ub_period_containing(pp->customer.billing_anchor, &pp->customer.period, at,
						 &pp->period_start, &pp->period_end);
	pp->segments = ub_price_period(&pp->customer, pp->period_start, pp->period_end);
}

/* A numeric column value; NULL pointers become SQL NULL. */
static Numeric
NullableNumeric(Numeric v, bool *isnull)
{
	*isnull = (v == NULL);
	return v;
}

/* The base and usage lines of a priced period, rounded, in invoice order (no total line). */
static List *
PeriodLines(const PricedPeriod *pp)
{
	List	   *lines = NIL;
	ListCell   *sc;

	foreach(sc, pp->segments)
	{
		UbPricedSegment *seg = lfirst(sc);
		PricedLine *base = palloc0(sizeof(PricedLine));
		ListCell   *lc;

		base->line = "base";
		base->segment_start = seg->start;
		base->has_segment = true;
		base->amount = ub_round_money(seg->base_amount, seg->currency);
		lines = lappend(lines, base);

		foreach(lc, seg->limits)
		{
			UbLimit    *limit = lfirst(lc);
			Numeric		total;
			PricedLine *pl;

			if (!ub_limit_is_billed(limit))
				continue;
			total = ub_segment_total(seg, limit->meter);
			pl = palloc0(sizeof(PricedLine));
			pl->line = "usage";
			pl->meter = limit->meter;
			pl->segment_start = seg->start;
			pl->has_segment = true;
			pl->usage_total = total;
			pl->limit = limit;
			if (limit->tiers != NULL)
			{
				pl->quantity = total;
				pl->unit_price = NULL;
			}
			else
			{
				pl->quantity = ub_overage_quantity(limit, total);
				/* keep the price as configured when the unit is 1 (0.10 stays 0.10) */
				pl->unit_price = ub_num_cmp(limit->overage_unit, ub_num_int(1)) == 0 ?
					limit->overage_price : ub_num_div(limit->overage_price, limit->overage_unit);
			}
			pl->amount = ub_round_money(ub_usage_cost(limit, total), seg->currency);
			lines = lappend(lines, pl);
		}
	}
	return lines;
}

/* SQL: calculate_overage(customer_id, period_start), exact costs of the billed meters per segment. */
Datum
ub_calculate_overage(PG_FUNCTION_ARGS)
{
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	TimestampTz at = PG_ARGISNULL(1) ? GetCurrentTransactionStartTimestamp() :
		PG_GETARG_TIMESTAMPTZ(1);
	ReturnSetInfo *rsinfo;
	PricedPeriod pp;
	ListCell   *sc;

	ub_init_srf(fcinfo);
	rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	LoadPricedPeriod(customer_id, at, &pp);

	foreach(sc, pp.segments)
	{
		UbPricedSegment *seg = lfirst(sc);
		ListCell   *lc;

		foreach(lc, seg->limits)
		{
			UbLimit    *limit = lfirst(lc);
			Numeric		total;
			Datum		values[OVERAGE_COLS];
			bool		nulls[OVERAGE_COLS];
			Numeric		v;

			if (!ub_limit_is_billed(limit))
				continue;
			total = ub_segment_total(seg, limit->meter);
			memset(nulls, 0, sizeof(nulls));
			values[0] = CStringGetTextDatum(limit->meter);
			values[1] = NumericGetDatum(total);
			v = NullableNumeric(limit->included, &nulls[2]);
			values[2] = PointerGetDatum(v);
			v = NullableNumeric(ub_overage_quantity(limit, total), &nulls[3]);
			values[3] = PointerGetDatum(v);
			v = NullableNumeric(ub_usage_cost(limit, total), &nulls[4]);
			values[4] = PointerGetDatum(v);
			values[5] = CStringGetTextDatum(seg->currency);
			values[6] = TimestampTzGetDatum(seg->start);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}

	SPI_finish();
	return (Datum) 0;
}

/* Appends one preview line. */
static void
PutInvoiceLine(ReturnSetInfo *rsinfo, const PricedLine *pl)
{
	Datum		values[INVOICE_COLS];
	bool		nulls[INVOICE_COLS];

	memset(nulls, 0, sizeof(nulls));
	values[0] = CStringGetTextDatum(pl->line);
	if (pl->meter == NULL)
		nulls[1] = true;
	else
		values[1] = CStringGetTextDatum(pl->meter);
	values[2] = PointerGetDatum(NullableNumeric(pl->quantity, &nulls[2]));
	values[3] = PointerGetDatum(NullableNumeric(pl->unit_price, &nulls[3]));
	values[4] = NumericGetDatum(pl->amount);
	values[5] = TimestampTzGetDatum(pl->segment_start);
	nulls[5] = !pl->has_segment;
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/*
 * The lines of the finalized invoice of a customer's period, if there is
 * one (a schema before 1.4 has none): appended to the result, true.
 */
static bool
FinalizedLines(ReturnSetInfo *rsinfo, const char *customer_id, TimestampTz period_start)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, TIMESTAMPTZOID};
	Datum		args[2];
	uint64		n;

	if (!OidIsValid(ub_schema_relation("invoices")))
		return false;
	/* distributed (citus.c), the lines are co-located with their invoice by customer_id */
	if (ub_distributed())
		ub_prepare_once(&plan,
						"SELECT l.line, l.meter, l.quantity, l.unit_price, l.amount, l.segment_start"
						"  FROM usage_billing.invoices i"
						"  JOIN usage_billing.invoice_lines l"
						"    ON l.customer_id = i.customer_id AND l.invoice_id = i.invoice_id"
						" WHERE i.customer_id = $1 AND i.period_start = $2"
						" ORDER BY l.line_no", 2, types);
	else
		ub_prepare_once(&plan,
						"SELECT l.line, l.meter, l.quantity, l.unit_price, l.amount, l.segment_start"
						"  FROM usage_billing.invoices i"
						"  JOIN usage_billing.invoice_lines l ON l.invoice_id = i.invoice_id"
						" WHERE i.customer_id = $1 AND i.period_start = $2"
						" ORDER BY l.line_no", 2, types);
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = TimestampTzGetDatum(period_start);
	if (SPI_execute_plan(plan, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "finalized invoice lookup failed");
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		Datum		values[INVOICE_COLS];
		bool		nulls[INVOICE_COLS];

		for (int c = 0; c < INVOICE_COLS; c++)
			values[c] = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, c + 1, &nulls[c]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_freetuptable(SPI_tuptable);
	return n > 0;
}

/* SQL: preview_invoice(customer_id, period_start): per segment base and usage lines, total. */
Datum
ub_preview_invoice(PG_FUNCTION_ARGS)
{
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	TimestampTz at = PG_ARGISNULL(1) ? GetCurrentTransactionStartTimestamp() :
		PG_GETARG_TIMESTAMPTZ(1);
	ReturnSetInfo *rsinfo;
	PricedPeriod pp;
	ListCell   *lc;
	Numeric		sum;
	PricedLine	total;

	ub_init_srf(fcinfo);
	rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_require_customer(customer_id, &pp.customer);
	ub_period_containing(pp.customer.billing_anchor, &pp.customer.period, at,
						 &pp.period_start, &pp.period_end);
	if (FinalizedLines(rsinfo, customer_id, pp.period_start))
	{
		SPI_finish();
		return (Datum) 0;
	}
	pp.segments = ub_price_period(&pp.customer, pp.period_start, pp.period_end);

	sum = ub_num_zero();
	foreach(lc, PeriodLines(&pp))
	{
		PricedLine *pl = lfirst(lc);

		PutInvoiceLine(rsinfo, pl);
		sum = ub_num_add(sum, pl->amount);
	}
	memset(&total, 0, sizeof(total));
	total.line = "total";
	total.amount = ub_round_money(sum, pp.customer.currency);
	PutInvoiceLine(rsinfo, &total);

	SPI_finish();
	return (Datum) 0;
}

/* Appends a numeric as JSON (null for NULL). */
static void
AppendJsonNumber(StringInfo buf, const char *key, Numeric n)
{
	appendStringInfo(buf, "\"%s\": %s", key, n == NULL ? "null" : ub_num_str(n));
}

/*
 * A limit as a JSON snapshot of what pricing reads: included, overage_price,
 * overage_unit, tiers (as set_plan_limit takes them) and tier_mode.
 */
static char *
PricingJson(const UbLimit *limit)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	AppendJsonNumber(&buf, "included", limit->included);
	appendStringInfoString(&buf, ", ");
	AppendJsonNumber(&buf, "overage_price", limit->overage_price);
	appendStringInfoString(&buf, ", ");
	AppendJsonNumber(&buf, "overage_unit", limit->overage_unit);
	appendStringInfo(&buf, ", \"tier_mode\": \"%s\", \"tiers\": ",
					 limit->tiers != NULL && limit->tiers->volume ? "volume" : "graduated");
	if (limit->tiers == NULL)
		appendStringInfoString(&buf, "null");
	else
	{
		appendStringInfoChar(&buf, '[');
		for (int i = 0; i < limit->tiers->ntiers; i++)
		{
			const UbTier *t = &limit->tiers->tiers[i];

			if (i > 0)
				appendStringInfoString(&buf, ", ");
			appendStringInfoChar(&buf, '{');
			AppendJsonNumber(&buf, "up_to", t->up_to);
			appendStringInfoString(&buf, ", ");
			AppendJsonNumber(&buf, "unit_price", t->unit_price);
			appendStringInfoString(&buf, ", ");
			AppendJsonNumber(&buf, "flat_fee", t->flat_fee);
			appendStringInfoChar(&buf, '}');
		}
		appendStringInfoChar(&buf, ']');
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/*
 * SQL (internal, for finalize_invoices): price_period(customer_id,
 * period_start) -> the base and usage lines of the period containing
 * period_start, as preview_invoice prices them (never the finalized lines),
 * with each usage line's total and pricing snapshot.
 */
Datum
ub_price_period_sql(PG_FUNCTION_ARGS)
{
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	TimestampTz at = PG_ARGISNULL(1) ? GetCurrentTransactionStartTimestamp() :
		PG_GETARG_TIMESTAMPTZ(1);
	ReturnSetInfo *rsinfo;
	MemoryContext caller_cxt = CurrentMemoryContext;
	PricedPeriod pp;
	ListCell   *lc;

	ub_init_srf(fcinfo);
	rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	LoadPricedPeriod(customer_id, at, &pp);
	foreach(lc, PeriodLines(&pp))
	{
		PricedLine *pl = lfirst(lc);
		Datum		values[PRICE_PERIOD_COLS];
		bool		nulls[PRICE_PERIOD_COLS];
		MemoryContext old;

		memset(nulls, 0, sizeof(nulls));
		old = MemoryContextSwitchTo(caller_cxt);
		values[0] = CStringGetTextDatum(pl->line);
		nulls[1] = (pl->meter == NULL);
		values[1] = nulls[1] ? (Datum) 0 : CStringGetTextDatum(pl->meter);
		values[2] = TimestampTzGetDatum(pl->segment_start);
		values[3] = PointerGetDatum(NullableNumeric(pl->quantity, &nulls[3]));
		values[4] = PointerGetDatum(NullableNumeric(pl->unit_price, &nulls[4]));
		values[5] = NumericGetDatum(pl->amount);
		values[6] = PointerGetDatum(NullableNumeric(pl->usage_total, &nulls[6]));
		nulls[7] = (pl->limit == NULL);
		values[7] = nulls[7] ? (Datum) 0 :
			DirectFunctionCall1(jsonb_in, CStringGetDatum(PricingJson(pl->limit)));
		MemoryContextSwitchTo(old);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
	return (Datum) 0;
}
