/*-------------------------------------------------------------------------
 * alerts.c
 *	  placeholder: the alert hooks do nothing yet (issue 6 replaces this)
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "alerts.h"

/* placeholder */
void
ub_alerts_after_record(const UbCustomer *customer, const UbMeter *meter,
					   const UbLimit *limit, TimestampTz period_start,
					   Numeric previous_total, Numeric total)
{
}

/* placeholder */
void
ub_alerts_hard_cap_blocked(const UbCustomer *customer, const UbMeter *meter,
						   const UbLimit *limit, TimestampTz period_start,
						   Numeric attempted_total)
{
}

/* placeholder */
void
ub_alerts_init(void)
{
}
