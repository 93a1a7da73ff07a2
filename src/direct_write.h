/*-------------------------------------------------------------------------
 * direct_write.h
 *	  Recording an event with table and index access instead of SQL.
 *-------------------------------------------------------------------------
 */
#ifndef UB_DIRECT_WRITE_H
#define UB_DIRECT_WRITE_H

#include "utils/numeric.h"

#include "record.h"

extern bool ub_direct_writes;

typedef enum UbDirectOutcome
{
	UB_DIRECT_RECORDED,			/* ledger row and aggregate written */
	UB_DIRECT_DUPLICATE,		/* the idempotency key was recorded before: nothing written */
	UB_DIRECT_UNAVAILABLE		/* the tables need the executor: nothing written, use SQL */
} UbDirectOutcome;

extern bool ub_direct_write_usable(const UbPreparedEvent *pe);
extern UbDirectOutcome ub_direct_record(const UbEventInput *in, const UbPreparedEvent *pe,
									   Numeric contribution, Numeric *total,
									   Numeric *previous_total);

#endif							/* UB_DIRECT_WRITE_H */
