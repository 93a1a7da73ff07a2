/*-------------------------------------------------------------------------
 * insight.h
 *	  Helpers shared by the analytics (insight.c) and the psql report (report.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_INSIGHT_H
#define UB_INSIGHT_H

#include "catalog.h"
#include "results.h"

/* One meter of a customer's current period, with the previous period's total. */
typedef struct UbMeterUsage
{
	char	   *meter;
	UbAggregation aggregation;
	char	   *unit;
	int			decimals;		/* the meter's decimals; -1: not known (before 1.4) */
	Numeric		current;
	Numeric		last_period;
	UbLimit    *limit;			/* NULL: no limit row */
} UbMeterUsage;

/* All of these run between SPI_connect and SPI_finish. */
extern void ub_insight_customer(const char *customer_id, UbCustomer *customer);
extern void ub_current_periods(const UbCustomer *customer, TimestampTz now, TimestampTz *start,
							   TimestampTz *end, TimestampTz *previous_start);
extern List *ub_meter_usage(const UbCustomer *customer, TimestampTz current_start,
							TimestampTz previous_start);

#endif							/* UB_INSIGHT_H */
