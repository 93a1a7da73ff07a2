/*-------------------------------------------------------------------------
 * report.c
 *	  usage_report: the current billing period as text lines for psql.
 *
 * Vocabulary
 *	 line		one text row: a header naming customer, plan and period, then one
 *				row per meter with usage or a limit
 *	 bar		UB_BAR_WIDTH cells, filled in proportion of included used (full
 *				from 100 %), followed by the rounded percentage; block characters
 *				in UTF-8 databases, '#' and '.' otherwise
 *	 overage	the meter's usage cost so far rounded as on an invoice, or
 *				"not billed"
 *
 * Times are printed in UTC whatever the session's TimeZone, as periods are
 * computed in UTC.
 *
 * export_blocker, also here, reports in words what keeps the export worker
 * from sending anything (export_status.reason shows it on pending rows).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "catalog.h"
#include "insight.h"
#include "pricing.h"
#include "export_shmem.h"

PG_FUNCTION_INFO_V1(ub_usage_report);
PG_FUNCTION_INFO_V1(ub_export_blocker);

#define UB_BAR_WIDTH		20

/* A timestamp as "YYYY-MM-DD HH:MI UTC", whatever the session's TimeZone. */
static char *
utc_minute(TimestampTz t)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) != 0)
		elog(ERROR, "timestamp out of range");
	return psprintf("%04d-%02d-%02d %02d:%02d UTC", tm.tm_year, tm.tm_mon, tm.tm_mday,
					tm.tm_hour, tm.tm_min);
}

/* "████░░░░ 62 %": the share of included used, full past 100 %. */
static void
append_bar(StringInfo buf, Numeric total, Numeric included)
{
	bool		utf8 = (GetDatabaseEncoding() == PG_UTF8);
	const char *full = utf8 ? "\u2588" : "#";
	const char *empty = utf8 ? "\u2591" : ".";
	int			filled;
	Numeric		percent;

	if (ub_num_cmp(included, ub_num_zero()) == 0)
	{
		filled = ub_num_cmp(total, ub_num_zero()) > 0 ? UB_BAR_WIDTH : 0;
		percent = NULL;
	}
	else
	{
		Numeric		share = ub_num_div(total, included);
		Numeric		cells = ub_num_mul(share, ub_num_int(UB_BAR_WIDTH));

		filled = ub_num_cmp(cells, ub_num_int(UB_BAR_WIDTH)) >= 0 ? UB_BAR_WIDTH :
			DatumGetInt32(DirectFunctionCall1(numeric_int4,
											  DirectFunctionCall2(numeric_trunc, NumericGetDatum(cells),
																  Int32GetDatum(0))));
		percent = DatumGetNumeric(DirectFunctionCall2(numeric_round,
													  NumericGetDatum(ub_num_mul(share, ub_num_int(100))),
													  Int32GetDatum(0)));
	}
	for (int i = 0; i < UB_BAR_WIDTH; i++)
		appendStringInfoString(buf, i < filled ? full : empty);
	if (percent != NULL)
		appendStringInfo(buf, " %3s %%", ub_num_str(percent));
	else
		appendStringInfoString(buf, "   - %");
}

/* SQL: usage_report(customer_id) -> (line): a psql-friendly report of the current period */
Datum
ub_usage_report(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext caller_cxt = CurrentMemoryContext;
	char	   *customer_id = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	UbCustomer	customer;
	TimestampTz start,
				end,
				previous_start;
	List	   *meters;
	ListCell   *lc;
	int			width = 5;
	StringInfoData buf;
	Datum		values[1];
	bool		nulls[1] = {false};

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_insight_customer(customer_id, &customer);
	ub_current_periods(&customer, GetCurrentTransactionStartTimestamp(), &start, &end, &previous_start);
	meters = ub_meter_usage(&customer, start, previous_start);

	initStringInfo(&buf);
	appendStringInfo(&buf, "customer %s, plan %s, period %s .. %s",
					 customer.customer_id, customer.plan, utc_minute(start), utc_minute(end));
	values[0] = ub_text_result(buf.data, caller_cxt);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);

	foreach(lc, meters)
		width = Max(width, pg_mbstrlen(((UbMeterUsage *) lfirst(lc))->meter));

	foreach(lc, meters)
	{
		UbMeterUsage *mu = (UbMeterUsage *) lfirst(lc);
		bool		limited = (mu->limit != NULL && mu->limit->included != NULL);
		Numeric		cost = mu->limit ? ub_usage_cost(mu->limit, mu->current) : NULL;

		resetStringInfo(&buf);
		appendStringInfoString(&buf, mu->meter);
		for (int i = pg_mbstrlen(mu->meter); i < width + 2; i++)
			appendStringInfoChar(&buf, ' ');
		if (limited)
		{
			append_bar(&buf, mu->current, mu->limit->included);
			appendStringInfo(&buf, "  %s / %s", ub_num_str(mu->current), ub_num_str(mu->limit->included));
		}
		else
			appendStringInfo(&buf, "%*s  %s", UB_BAR_WIDTH + 6, "", ub_num_str(mu->current));
		if (mu->unit != NULL)
			appendStringInfo(&buf, " %s", mu->unit);
		if (!limited)
			appendStringInfoString(&buf, " (unlimited)");
		if (cost != NULL)
			appendStringInfo(&buf, ", overage %s %s",
							 ub_num_str(ub_round_money(cost, customer.currency)), customer.currency);
		else
			appendStringInfoString(&buf, ", not billed");
		appendStringInfo(&buf, ", ends %s", utc_minute(end));
		values[0] = ub_text_result(buf.data, caller_cxt);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
	return (Datum) 0;
}

/* A setting's value as the server has it, "" when it is not defined (never privileged-filtered). */
static const char *
setting_or_empty(const char *name)
{
	const char *v = GetConfigOption(name, true, false);

	return v != NULL ? v : "";
}

/*
 * SQL: export_blocker() -> text: why the export worker sends nothing for this
 * database, every reason joined by "; ", or NULL when nothing stops it.  It
 * says whether a Stripe API key is configured, never what it is.
 */
Datum
ub_export_blocker(PG_FUNCTION_ARGS)
{
	StringInfoData buf;
	const char *database = setting_or_empty("usage_billing.database");
	char	   *here = get_database_name(MyDatabaseId);

	initStringInfo(&buf);
	if (setting_or_empty("usage_billing.stripe_api_key")[0] == '\0' &&
		setting_or_empty("usage_billing.stripe_api_key_file")[0] == '\0')
		appendStringInfoString(&buf, "no Stripe API key is configured"
							   " (usage_billing.stripe_api_key or usage_billing.stripe_api_key_file)");
	if (!ub_shmem_available())
		appendStringInfo(&buf, "%sthe export worker is not running"
						 " (usage_billing is not in shared_preload_libraries)",
						 buf.len > 0 ? "; " : "");
	else if (here != NULL && strcmp(database, here) != 0)
		appendStringInfo(&buf, "%sthe export worker serves database \"%s\", not this one"
						 " (usage_billing.database)",
						 buf.len > 0 ? "; " : "", database);
	if (buf.len == 0)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(buf.data));
}
