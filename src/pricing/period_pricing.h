/*-------------------------------------------------------------------------
 * period_pricing.h
 *	  A billing period priced by plan segments (period_pricing.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_PERIOD_PRICING_H
#define UB_PERIOD_PRICING_H

#include "catalog.h"
#include "period_usage.h"

/* One segment of a period: its plan, limits and usage. */
typedef struct UbPricedSegment
{
	TimestampTz start;			/* [start, end) */
	TimestampTz end;
	char	   *plan;
	Numeric		base_price;		/* the plan's, for a whole period */
	Numeric		base_amount;	/* prorated by time, exact */
	char	   *currency;
	List	   *limits;			/* UbLimit *: the customer's under this plan, by meter */
	List	   *totals;			/* UbAggregateRow *: usage attributed to the segment */
} UbPricedSegment;

/* All of these run between SPI_connect and SPI_finish. */
extern List *ub_price_period(const UbCustomer *customer, TimestampTz start, TimestampTz end);
extern Numeric ub_segment_total(const UbPricedSegment *seg, const char *meter);
extern UbLimit *ub_segment_limit(const UbPricedSegment *seg, const char *meter);
extern UbPricedSegment *ub_segment_at(List *segments, TimestampTz at);

#endif							/* UB_PERIOD_PRICING_H */
