/*-------------------------------------------------------------------------
 * reading.h
 *	  Helpers shared by the read paths: check_limit (limits.c),
 *	  get_usage_summary (summary.c), calculate_overage and preview_invoice
 *	  (invoice.c).
 *
 * An "aggregate row" is one row of usage_billing.usage_aggregates: the total
 * of one customer and meter in one billing period, kept current by
 * increment_usage.  Reading aggregates (by primary key) instead of the
 * ledger keeps every period query independent of the number of events.
 *
 * The summary.c functions run between SPI_connect and SPI_finish and
 * return what lives in the SPI procedure context.
 *-------------------------------------------------------------------------
 */
#ifndef UB_READING_H
#define UB_READING_H

#include "datatype/timestamp.h"
#include "fmgr.h"
#include "funcapi.h"
#include "nodes/execnodes.h"
#include "nodes/pg_list.h"
#include "utils/numeric.h"

#include "catalog.h"

typedef struct UbAggregateRow
{
	char	   *meter;
	Numeric		total;
	int64		event_count;
	bool		has_first;
	TimestampTz first_usage;
	bool		has_last;
	TimestampTz last_usage;
} UbAggregateRow;

/*
 * Sets up a materialized result set.  The caller's expected row type, when
 * it gives one (a call in FROM), spares building the row type from pg_proc
 * on every call: on the check_limit path that was a quarter of the time.
 */
static inline void
ub_init_srf(FunctionCallInfo fcinfo)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bits32		flags = 0;

	if (rsinfo != NULL && IsA(rsinfo, ReturnSetInfo) && rsinfo->expectedDesc != NULL)
		flags = MAT_SRF_USE_EXPECTED_DESC;
	InitMaterializedSRF(fcinfo, flags);
}

/* summary.c */
extern void ub_require_customer(const char *customer_id, UbCustomer *customer);
extern List *ub_period_aggregates(const char *customer_id, TimestampTz period_start);
extern UbAggregateRow *ub_find_aggregate(List *rows, const char *meter);

#endif							/* UB_READING_H */
