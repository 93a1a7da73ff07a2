/*-------------------------------------------------------------------------
 * periods.h
 *	  Billing-period arithmetic: periods start at billing_anchor + k * period.
 *-------------------------------------------------------------------------
 */
#ifndef UB_PERIODS_H
#define UB_PERIODS_H

#include "datatype/timestamp.h"

extern TimestampTz ub_period_start_k(TimestampTz anchor, const Interval *period, int64 k);
extern void ub_period_containing(TimestampTz anchor, const Interval *period, TimestampTz at,
								 TimestampTz *start, TimestampTz *end);
extern void ub_check_period(const Interval *period);

#endif							/* UB_PERIODS_H */
