/*-------------------------------------------------------------------------
 * catalog_cache.h
 *	  Backend-local cache of usage targets (customer, meter, effective limit):
 *	  the cache (catalog_cache.c) and the copies and targets made from its
 *	  rows (catalog_target.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_CATALOG_CACHE_H
#define UB_CATALOG_CACHE_H

#include "catalog.h"

/* a customer_limits row: replaces included, and hard_cap unless that is NULL */
typedef struct UbOverride
{
	char	   *meter;
	Numeric		included;
	bool		hard_cap_null;
	bool		hard_cap;
} UbOverride;

/*
 * a customers row with every override of that customer and its plan history
 * (customer_plans rows by effective_from; none on a schema before 1.4 or for
 * a customer written without one: then plan is in force from the beginning)
 */
typedef struct UbCustomerRow
{
	char	   *customer_id;
	char	   *plan;			/* customers.plan: when there is no history */
	TimestampTz billing_anchor;
	char	   *status;
	char	   *stripe_customer_id; /* NULL when not exported */
	int			noverrides;
	UbOverride *overrides;
	int			nplans;
	TimestampTz *plan_from;		/* ascending */
	char	  **plan_names;
} UbCustomerRow;

/* what does not depend on the customer: a plan, a meter and the plan's limit row for it */
typedef struct UbPlanMeter
{
	UbCustomer	plan_part;		/* only plan, period, base_price and currency */
	UbMeter		meter;			/* only meter is set when !meter_found */
	bool		meter_found;
	UbLimit		limit;			/* exists = false: the plan has no row for the meter */
} UbPlanMeter;

/* a preload being built; see ub_cache_preload_begin */
typedef struct UbCachePreload UbCachePreload;

extern uint64 ub_cache_generation(void);

extern bool ub_cache_get(const char *customer_id, const char *meter,
						 UbCustomer *customer, UbMeter *m, bool *meter_found, UbLimit *limit);

/* catalog_target.c: copies into CurrentMemoryContext, and the target built from them */
extern void ub_build_target(const UbCustomerRow *row, const UbPlanMeter *pm,
							UbCustomer *customer, UbMeter *m, bool *meter_found, UbLimit *limit);
extern void ub_copy_customer_row(const UbCustomerRow *src, UbCustomerRow *row);
extern void ub_copy_override(const UbOverride *src, UbOverride *dst);
extern void ub_copy_plan_meter(const UbPlanMeter *src, UbPlanMeter *dst);

extern bool ub_cache_get_customer(const char *customer_id, UbCustomerRow *row, bool *absent);
extern void ub_cache_put_customer(uint64 generation, const UbCustomerRow *row);
extern bool ub_static_cache_get(const char *plan, const char *meter, UbPlanMeter *pm);
extern void ub_static_cache_put(uint64 generation, const UbPlanMeter *pm);

extern bool ub_cache_claim_preload(void);
extern UbCachePreload *ub_cache_preload_begin(long ncustomers);
extern void ub_cache_preload_customer(UbCachePreload *p, const UbCustomerRow *row);
extern void ub_cache_preload_override(UbCachePreload *p, const char *customer_id,
									  const UbOverride *o);
extern void ub_cache_preload_plan_meter(UbCachePreload *p, const UbPlanMeter *pm);
extern void ub_cache_preload_history(UbCachePreload *p, const char *customer_id,
									 TimestampTz effective_from, const char *plan);

/* plan_history.c */
extern void ub_row_add_plan(UbCustomerRow *row, TimestampTz effective_from, const char *plan);
extern const char *ub_row_plan_at(const UbCustomerRow *row, TimestampTz at);
extern bool ub_cache_preload_end(UbCachePreload *p, uint64 generation);

#endif							/* UB_CATALOG_CACHE_H */
