/*-------------------------------------------------------------------------
 * period_usage.h
 *	  The usage of a billing period, meter by meter (period_usage.c).
 *
 * An "aggregate row" is the total of one customer and meter in one billing
 * period, kept current by the recording paths.  Reading aggregates (by
 * primary key) instead of the ledger keeps every period query independent
 * of the number of events.  These functions run between SPI_connect and
 * SPI_finish and return what lives in the SPI procedure context.
 *-------------------------------------------------------------------------
 */
#ifndef UB_PERIOD_USAGE_H
#define UB_PERIOD_USAGE_H

#include "datatype/timestamp.h"
#include "executor/spi.h"
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

extern UbAggregateRow *ub_aggregate_row(HeapTuple tup, TupleDesc desc);
extern List *ub_period_aggregates(const char *customer_id, TimestampTz period_start);
extern UbAggregateRow *ub_find_aggregate(List *rows, const char *meter);

#endif							/* UB_PERIOD_USAGE_H */
