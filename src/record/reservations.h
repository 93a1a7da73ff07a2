/*-------------------------------------------------------------------------
 * reservations.h
 *	  Holds against hard caps (reservations.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_RESERVATIONS_H
#define UB_RESERVATIONS_H

#include "datatype/timestamp.h"
#include "utils/numeric.h"

extern bool ub_reservations_installed(void);

/* Both run inside SPI; expire only under the aggregate row's lock. */
extern Numeric ub_reservations_expire(const char *customer_id, const char *meter,
									  TimestampTz period_start);
extern Numeric ub_reservations_live(const char *customer_id, const char *meter,
									TimestampTz period_start);

#endif							/* UB_RESERVATIONS_H */
