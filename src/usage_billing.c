/*-------------------------------------------------------------------------
 * usage_billing.c
 *	  Module entry point: _PG_init and the settings of the core.
 *
 * The export worker's settings, shared memory and registration live in
 * export_worker.c; here we only call into it.  The SQL functions also work
 * when the library is not preloaded: then the worker simply does not run.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "catalog_preload.h"
#include "export_cancel.h"
#include "escrow.h"
#include "finalize.h"
#include "usage_billing.h"

PG_MODULE_MAGIC;

bool		ub_direct_reads = true;
int			ub_late_event_grace_seconds = UB_DEFAULT_LATE_EVENT_GRACE;
int			ub_max_future_skew_seconds = UB_DEFAULT_MAX_FUTURE_SKEW;
int			ub_late_event_action = UB_LATE_REJECT;

static const struct config_enum_entry late_event_action_options[] = {
	{"reject", UB_LATE_REJECT, false},
	{"current_period", UB_LATE_CURRENT_PERIOD, false},
	{NULL, 0, false}
};

void		_PG_init(void);

/* Defines the settings and, when preloaded, starts the export machinery. */
void
_PG_init(void)
{
	DefineCustomIntVariable("usage_billing.late_event_grace",
							"Seconds after a billing period ends during which late events still land in it.",
							"The default is 35 days, Stripe's window; -1 accepts events for any past period (a backfill).",
							&ub_late_event_grace_seconds,
							UB_DEFAULT_LATE_EVENT_GRACE, -1, PG_INT32_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("usage_billing.max_future_skew",
							"How far ahead of now() an event's occurred_at may be.",
							"Events further in the future are refused; the default is 5 minutes, Stripe's rule.",
							&ub_max_future_skew_seconds,
							UB_DEFAULT_MAX_FUTURE_SKEW, 0, PG_INT32_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomEnumVariable("usage_billing.late_event_action",
							 "What happens to an event that arrives after its period's grace window.",
							 "reject raises an error; current_period records it in the current period.",
							 &ub_late_event_action,
							 UB_LATE_REJECT,
							 late_event_action_options,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	DefineCustomBoolVariable("usage_billing.direct_reads",
							 "Read customers, overrides and aggregates straight from their indexes on the hot path.",
							 "Turn off when the tables are distributed with Citus: only SQL is routed to the shards.",
							 &ub_direct_reads,
							 true,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	ub_escrow_init();
	ub_catalog_preload_init();
	ub_invoice_init();
	ub_export_init();
	ub_cancel_init();
	ub_alerts_init();

	MarkGUCPrefixReserved("usage_billing");
}
