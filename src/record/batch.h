/*-------------------------------------------------------------------------
 * batch.h
 *	  What batch.c (increment_usage_batch) shares with batch_sql.c (its SQL
 *	  bulk writes): the events and groups of a batch.
 *-------------------------------------------------------------------------
 */
#ifndef UB_BATCH_H
#define UB_BATCH_H

#include "datatype/timestamp.h"
#include "utils/numeric.h"

#include "record.h"

/* An event of the batch with its position, for a stable sort. */
typedef struct BatchEvent
{
	UbEventInput in;
	int			position;
	UbPreparedEvent pe;
	bool		accepted;		/* written to the ledger by this batch */
	bool		single;			/* unique_count: recorded on the single-event path */
} BatchEvent;

/* One (customer, meter, period) of the batch with what it adds. */
typedef struct BatchGroup
{
	BatchEvent *first;
	Numeric		contribution;
	int64		count;
	TimestampTz first_usage;
	TimestampTz last_usage;
} BatchGroup;

/* The bulk writes without the direct writer; both run between SPI_connect and SPI_finish. */
extern void ub_batch_insert_ledger(BatchEvent **events, int n);
extern void ub_batch_upsert_groups(BatchGroup *groups, int n, UbAggregation agg);

#endif							/* UB_BATCH_H */
