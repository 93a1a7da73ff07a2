/*-------------------------------------------------------------------------
 * catalog_cache.h
 *	  Backend-local cache of usage targets (customer, meter, effective limit).
 *-------------------------------------------------------------------------
 */
#ifndef UB_CATALOG_CACHE_H
#define UB_CATALOG_CACHE_H

#include "catalog.h"

extern uint64 ub_cache_generation(void);
extern bool ub_cache_get(const char *customer_id, const char *meter,
						 UbCustomer *customer, UbMeter *m, bool *meter_found, UbLimit *limit);
extern void ub_cache_put(uint64 generation, const char *customer_id, const char *meter,
						 const UbCustomer *customer, const UbMeter *m, bool meter_found,
						 const UbLimit *limit);

extern bool ub_static_cache_get(const char *plan, const char *meter,
								UbCustomer *plan_part, UbMeter *m, bool *meter_found,
								UbLimit *limit);
extern void ub_static_cache_put(uint64 generation, const char *plan, const char *meter,
								const UbCustomer *plan_part, const UbMeter *m, bool meter_found,
								const UbLimit *limit);

#endif							/* UB_CATALOG_CACHE_H */
