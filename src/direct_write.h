/*-------------------------------------------------------------------------
 * direct_write.h
 *	  Writing ledger rows and aggregates with table and index access instead of SQL.
 *-------------------------------------------------------------------------
 */
#ifndef UB_DIRECT_WRITE_H
#define UB_DIRECT_WRITE_H

#include "datatype/timestamp.h"
#include "utils/numeric.h"

#include "catalog.h"
#include "record.h"

extern bool ub_direct_writes;

/* What one call (or one group of a batch) adds to a (customer, meter, period) aggregate. */
typedef struct UbAggregateDelta
{
	const char *customer_id;
	const char *meter;
	TimestampTz period_start;
	TimestampTz period_end;
	UbAggregation aggregation;
	Numeric		contribution;	/* added (sum, count), compared (max) or the latest value (last) */
	int64		count;			/* events */
	TimestampTz first_usage;
	TimestampTz last_usage;		/* for last: the occurred_at of the contribution */
	const UbLimit *limit;		/* the limit in force: where escrow budgets must stop */
} UbAggregateDelta;

typedef struct UbDirectWriter UbDirectWriter;

extern bool ub_direct_writes_usable(void);
extern UbDirectWriter *ub_direct_open(void);
extern bool ub_direct_insert_event(UbDirectWriter *w, const UbEventInput *in,
								   TimestampTz period_start);
extern void ub_direct_insert_events(UbDirectWriter *w, const UbEventInput *const *ins,
									const TimestampTz *period_starts, int n, bool *accepted);
extern void ub_direct_fold(UbDirectWriter *w, const UbAggregateDelta *d, Numeric *total,
						   Numeric *previous_total);
extern void ub_direct_close(UbDirectWriter *w);

#endif							/* UB_DIRECT_WRITE_H */
