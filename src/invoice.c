/*-------------------------------------------------------------------------
 * invoice.c
 *	  calculate_overage and preview_invoice: the money of a billing period.
 *
 * Both price one billing period of a customer: the one that contains the
 * instant period_start (NULL: now), with the plan and limits in force now
 * (a plan change reprices the current and past periods alike).  A meter is
 * "billed" when its effective limit has tiers, or both an overage price and
 * an included quantity (ub_limit_is_billed); only billed meters appear.
 * Totals come from usage_aggregates, never from the ledger.
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
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "periods.h"
#include "pricing.h"
#include "reading.h"
#include "usage_billing.h"

PG_FUNCTION_INFO_V1(ub_calculate_overage);
PG_FUNCTION_INFO_V1(ub_preview_invoice);

#define OVERAGE_COLS 6
#define INVOICE_COLS 5

/* What both functions need: the customer, its billed limits and the period's aggregates. */
typedef struct PricedPeriod
{
	UbCustomer	customer;
	TimestampTz period_start;
	TimestampTz period_end;
	List	   *billed;			/* UbLimit *, ordered by meter */
	List	   *aggregates;		/* UbAggregateRow * */
} PricedPeriod;

static void LoadPricedPeriod(FunctionCallInfo fcinfo, PricedPeriod *pp);
static Numeric MeterTotal(const PricedPeriod *pp, const UbLimit *limit);
static Numeric NullableNumeric(Numeric v, bool *isnull);
static void PutInvoiceLine(ReturnSetInfo *rsinfo, const char *line, const char *meter,
						   Numeric quantity, Numeric unit_price, Numeric amount);

/* Reads the customer (P0002 when unknown), its period, billed limits and aggregates. */
static void
LoadPricedPeriod(FunctionCallInfo fcinfo, PricedPeriod *pp)
{
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	TimestampTz at = PG_ARGISNULL(1) ? GetCurrentTransactionStartTimestamp() :
		PG_GETARG_TIMESTAMPTZ(1);
	List	   *limits;
	ListCell   *lc;

	ub_require_customer(customer_id, &pp->customer);
	ub_period_containing(pp->customer.billing_anchor, &pp->customer.period, at,
						 &pp->period_start, &pp->period_end);

	limits = ub_customer_limits(&pp->customer);
	pp->billed = NIL;
	foreach(lc, limits)
	{
		UbLimit    *l = lfirst(lc);

		if (ub_limit_is_billed(l))
			pp->billed = lappend(pp->billed, l);
	}
	pp->aggregates = pp->billed == NIL ? NIL :
		ub_period_aggregates(customer_id, pp->period_start);
}

/* The period's total of a billed meter, 0 when nothing was recorded. */
static Numeric
MeterTotal(const PricedPeriod *pp, const UbLimit *limit)
{
	UbAggregateRow *row = ub_find_aggregate(pp->aggregates, limit->meter);

	return row != NULL ? row->total : ub_num_zero();
}

/* A numeric column value; NULL pointers become SQL NULL. */
static Numeric
NullableNumeric(Numeric v, bool *isnull)
{
	*isnull = (v == NULL);
	return v;
}

/* SQL: calculate_overage(customer_id, period_start), exact costs of the billed meters. */
Datum
ub_calculate_overage(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo;
	PricedPeriod pp;
	ListCell   *lc;

	ub_init_srf(fcinfo);
	rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	LoadPricedPeriod(fcinfo, &pp);

	foreach(lc, pp.billed)
	{
		UbLimit    *limit = lfirst(lc);
		Numeric		total = MeterTotal(&pp, limit);
		Datum		values[OVERAGE_COLS];
		bool		nulls[OVERAGE_COLS];
		Numeric		v;

		memset(nulls, 0, sizeof(nulls));
		values[0] = CStringGetTextDatum(limit->meter);
		values[1] = NumericGetDatum(total);
		v = NullableNumeric(limit->included, &nulls[2]);
		values[2] = PointerGetDatum(v);
		v = NullableNumeric(ub_overage_quantity(limit, total), &nulls[3]);
		values[3] = PointerGetDatum(v);
		v = NullableNumeric(ub_usage_cost(limit, total), &nulls[4]);
		values[4] = PointerGetDatum(v);
		values[5] = CStringGetTextDatum(pp.customer.currency);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}

	SPI_finish();
	return (Datum) 0;
}

/* Appends one invoice line. */
static void
PutInvoiceLine(ReturnSetInfo *rsinfo, const char *line, const char *meter,
			   Numeric quantity, Numeric unit_price, Numeric amount)
{
	Datum		values[INVOICE_COLS];
	bool		nulls[INVOICE_COLS];

	memset(nulls, 0, sizeof(nulls));
	values[0] = CStringGetTextDatum(line);
	if (meter == NULL)
		nulls[1] = true;
	else
		values[1] = CStringGetTextDatum(meter);
	values[2] = PointerGetDatum(NullableNumeric(quantity, &nulls[2]));
	values[3] = PointerGetDatum(NullableNumeric(unit_price, &nulls[3]));
	values[4] = NumericGetDatum(amount);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/* SQL: preview_invoice(customer_id, period_start): base, usage and total lines, rounded. */
Datum
ub_preview_invoice(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo;
	PricedPeriod pp;
	ListCell   *lc;
	Numeric		amount;
	Numeric		sum;
	const char *currency;

	ub_init_srf(fcinfo);
	rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	LoadPricedPeriod(fcinfo, &pp);
	currency = pp.customer.currency;

	amount = ub_round_money(pp.customer.base_price, currency);
	PutInvoiceLine(rsinfo, "base", NULL, NULL, NULL, amount);
	sum = amount;

	foreach(lc, pp.billed)
	{
		UbLimit    *limit = lfirst(lc);
		Numeric		total = MeterTotal(&pp, limit);
		Numeric		quantity;
		Numeric		unit_price;

		if (limit->tiers != NULL)
		{
			quantity = total;
			unit_price = NULL;
		}
		else
		{
			quantity = ub_overage_quantity(limit, total);
			/* keep the price as configured when the unit is 1 (0.10 stays 0.10) */
			unit_price = ub_num_cmp(limit->overage_unit, ub_num_int(1)) == 0 ?
				limit->overage_price : ub_num_div(limit->overage_price, limit->overage_unit);
		}
		amount = ub_round_money(ub_usage_cost(limit, total), currency);
		PutInvoiceLine(rsinfo, "usage", limit->meter, quantity, unit_price, amount);
		sum = ub_num_add(sum, amount);
	}

	PutInvoiceLine(rsinfo, "total", NULL, NULL, NULL, ub_round_money(sum, currency));

	SPI_finish();
	return (Datum) 0;
}
