/*-------------------------------------------------------------------------
 * finalize.c
 *	  Finalized invoices: the setting usage_billing.invoice_grace, the
 *	  pricing helpers finalize_invoices (SQL) uses, and the check that
 *	  refuses a late event for an invoiced period.
 *
 * finalize_invoices(before) itself is PL/pgSQL (the upgrade script): for
 * every customer and billing period that ended before
 * before - usage_billing.invoice_grace and has no invoice yet, it writes the
 * lines price_period (invoice.c) gives, plus credit and debit lines for the
 * earlier invoiced periods whose usage changed since they were invoiced
 * (a void, an adjustment, a late event that raced with the finalization),
 * each priced with the pricing snapshot of the line it corrects
 * (price_usage here), so that a catalog change since does not leak into a
 * correction.
 *
 * After finalization a period takes no new events: ub_period_invoiced tells
 * record_prepare.c to refuse them (22023) or, when
 * usage_billing.late_event_action is current_period, to record them in the
 * current period.  Only events of a period that has ended ask, so the hot
 * path of current usage pays nothing.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "pricing.h"
#include "finalize.h"
#include "errors.h"
#include "relations.h"

PG_FUNCTION_INFO_V1(ub_invoice_grace);
PG_FUNCTION_INFO_V1(ub_price_usage);
PG_FUNCTION_INFO_V1(ub_round_money_sql);

int			ub_invoice_grace_seconds = 3600;

/* Defines usage_billing.invoice_grace; called from _PG_init. */
void
ub_invoice_init(void)
{
	DefineCustomIntVariable("usage_billing.invoice_grace",
							"How long after a billing period ends finalize_invoices waits before invoicing it.",
							"Late events within this time still reach the invoice; the default is 1 hour.",
							&ub_invoice_grace_seconds,
							3600, 0, PG_INT32_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);
}

/* SQL: invoice_grace() -> the setting as an interval. */
Datum
ub_invoice_grace(PG_FUNCTION_ARGS)
{
	Interval   *result = palloc0(sizeof(Interval));

	result->time = (int64) ub_invoice_grace_seconds * USECS_PER_SEC;
	PG_RETURN_INTERVAL_P(result);
}

/* A member of a JSON object as a numeric; NULL when absent or null. */
static Numeric
json_numeric(Jsonb *j, const char *key)
{
	JsonbValue	v;

	if (getKeyJsonValueFromContainer(&j->root, key, strlen(key), &v) == NULL || v.type == jbvNull)
		return NULL;
	if (v.type != jbvNumeric)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid pricing snapshot"),
				 errdetail("Member \"%s\" is not a number.", key)));
	return v.val.numeric;
}

/*
 * SQL (internal): price_usage(pricing jsonb, total numeric) -> the exact
 * usage cost of a total under a pricing snapshot (what price_period writes
 * for a usage line), as the line was priced.
 */
Datum
ub_price_usage(PG_FUNCTION_ARGS)
{
	Jsonb	   *pricing = PG_GETARG_JSONB_P(0);
	Numeric		total = PG_GETARG_NUMERIC(1);
	UbLimit		limit;
	JsonbValue	v;
	Numeric		cost;

	if (!JB_ROOT_IS_OBJECT(pricing) || JB_ROOT_IS_SCALAR(pricing))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid pricing snapshot"),
				 errdetail("A pricing snapshot is a JSON object.")));
	memset(&limit, 0, sizeof(limit));
	limit.exists = true;
	limit.included = json_numeric(pricing, "included");
	limit.overage_price = json_numeric(pricing, "overage_price");
	limit.overage_unit = json_numeric(pricing, "overage_unit");
	if (limit.overage_unit == NULL)
		limit.overage_unit = ub_num_int(1);
	if (getKeyJsonValueFromContainer(&pricing->root, "tiers", 5, &v) != NULL && v.type != jbvNull)
	{
		Jsonb	   *tiers = DatumGetJsonbP(DirectFunctionCall2(jsonb_object_field,
															   JsonbPGetDatum(pricing),
															   CStringGetTextDatum("tiers")));
		JsonbValue	mode;
		bool		volume = false;

		if (getKeyJsonValueFromContainer(&pricing->root, "tier_mode", 9, &mode) != NULL &&
			mode.type == jbvString)
			volume = (mode.val.string.len == 6 && strncmp(mode.val.string.val, "volume", 6) == 0);
		limit.tiers = ub_parse_tiers(tiers, volume);
	}
	cost = ub_usage_cost(&limit, total);
	if (cost == NULL)
		PG_RETURN_NULL();
	PG_RETURN_NUMERIC(cost);
}

/* SQL (internal): round_money(amount, currency) -> rounded to the currency's minor unit. */
Datum
ub_round_money_sql(PG_FUNCTION_ARGS)
{
	Numeric		amount = PG_GETARG_NUMERIC(0);
	char	   *currency = text_to_cstring(PG_GETARG_TEXT_PP(1));

	PG_RETURN_NUMERIC(ub_round_money(amount, currency));
}

/*
 * Whether a customer's billing period has a finalized invoice (false on a
 * schema without invoices).  Must run between SPI_connect and SPI_finish.
 */
bool
ub_period_invoiced(const char *customer_id, TimestampTz period_start)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, TIMESTAMPTZOID};
	Datum		args[2];
	bool		invoiced;

	if (!OidIsValid(ub_schema_relation("invoices")))
		return false;
	ub_prepare_once(&plan,
					"SELECT 1 FROM usage_billing.invoices"
					" WHERE customer_id = $1 AND period_start = $2", 2, types);
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = TimestampTzGetDatum(period_start);
	if (SPI_execute_plan(plan, args, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "invoice lookup failed");
	invoiced = SPI_processed > 0;
	SPI_freetuptable(SPI_tuptable);
	return invoiced;
}

/*
 * The export worker's call, once a cycle, inside its transaction: runs
 * finalize_invoices() in a subtransaction, so that a failure is logged and
 * rolled back without costing the cycle its export.  Nothing on a schema
 * without finalize_invoices (before 1.4).
 */
void
ub_finalize_invoices_in_worker(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	if (!OidIsValid(ub_schema_relation("invoices")))
		return;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (SPI_execute("SELECT usage_billing.finalize_invoices()", false, 0) != SPI_OK_SELECT)
			elog(ERROR, "finalize_invoices failed");
		SPI_finish();
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		ereport(WARNING,
				(errmsg("usage_billing: finalizing invoices failed: %s", edata->message),
				 errhint("The next cycle tries again.")));
		FreeErrorData(edata);
	}
	PG_END_TRY();
}
