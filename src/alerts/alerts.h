/*-------------------------------------------------------------------------
 * alerts.h
 *	  Usage alerts: soft-threshold and limit crossings, hard-cap refusals.
 *-------------------------------------------------------------------------
 */
#ifndef UB_ALERTS_H
#define UB_ALERTS_H

#include "catalog.h"

/*
 * Called after an event was added to its aggregate, in the caller's
 * transaction and SPI connection; previous_total is NULL for the first event
 * of the period.  Only called when the limit has an included quantity.
 */
extern void ub_alerts_after_record(const UbCustomer *customer, const UbMeter *meter,
								   const UbLimit *limit, TimestampTz period_start,
								   Numeric previous_total, Numeric total);

/*
 * Called just before increment_usage raises PT402.  The caller's transaction
 * is about to fail, so whatever this records must survive its abort.
 */
extern void ub_alerts_hard_cap_blocked(const UbCustomer *customer, const UbMeter *meter,
									   const UbLimit *limit, TimestampTz period_start,
									   Numeric attempted_total);

/* From _PG_init. */
extern void ub_alerts_shmem_request(void);
extern void ub_alerts_shmem_startup(void);
extern void ub_alerts_flush_in_worker(void);

#endif							/* UB_ALERTS_H */
