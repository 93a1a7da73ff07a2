/*-------------------------------------------------------------------------
 * holds.h
 *	  The holds of reservations against hard caps (holds.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_HOLDS_H
#define UB_HOLDS_H

#include "datatype/timestamp.h"
#include "utils/numeric.h"

extern bool ub_reservations_installed(void);

/* Both run inside SPI; expire only under the aggregate row's lock. */
extern Numeric ub_reservations_expire(const char *customer_id, const char *meter,
									  TimestampTz period_start);
extern Numeric ub_reservations_live(const char *customer_id, const char *meter,
									TimestampTz period_start);

#endif							/* UB_HOLDS_H */
