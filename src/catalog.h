/*-------------------------------------------------------------------------
 * catalog.h
 *	  Lookups of customers, meters and effective limits for the C paths.
 *-------------------------------------------------------------------------
 */
#ifndef UB_CATALOG_H
#define UB_CATALOG_H

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

typedef enum UbAggregation
{
	UB_AGG_COUNT,
	UB_AGG_SUM,
	UB_AGG_MAX,
	UB_AGG_LAST,
	UB_AGG_UNIQUE_COUNT
} UbAggregation;

typedef struct UbCustomer
{
	char	   *customer_id;
	char	   *plan;
	TimestampTz billing_anchor;
	Interval	period;
	char	   *status;			/* 'active', 'suspended' or 'canceled' */
	char	   *stripe_customer_id; /* NULL when not exported */
	Numeric		base_price;
	char	   *currency;
} UbCustomer;

typedef struct UbMeter
{
	char	   *meter;
	UbAggregation aggregation;
	char	   *value_property; /* unique_count only */
	char	   *stripe_event_name;	/* NULL when not exported */
} UbMeter;

struct UbTiers;

/* The limit in force for one customer and meter: the plan's, with overrides. */
typedef struct UbLimit
{
	char	   *meter;
	bool		exists;			/* false: no limit row, the meter is unlimited */
	Numeric		included;		/* NULL = unlimited */
	bool		hard_cap;
	Numeric		overage_price;	/* NULL = not billed per unit */
	Numeric		overage_unit;
	Numeric		soft_threshold; /* NULL = never warns */
	struct UbTiers *tiers;		/* NULL = no tiered pricing */
	UbAggregation aggregation;	/* of the meter, for list lookups */
} UbLimit;

/* All lookups must run between SPI_connect and SPI_finish; results live until SPI_finish. */
extern bool ub_lookup_customer(const char *customer_id, UbCustomer *customer);
extern bool ub_lookup_usage_target(const char *customer_id, const char *meter,
								   UbCustomer *customer, UbMeter *m, bool *meter_found,
								   UbLimit *limit);
extern List *ub_customer_limits(const UbCustomer *customer);
extern List *ub_plan_limits(const char *plan);

extern SPIPlanPtr ub_prepare_once(SPIPlanPtr *slot, const char *sql, int nargs, Oid *types);
extern UbAggregation ub_parse_aggregation(const char *name);
extern const char *ub_aggregation_name(UbAggregation agg);
extern void ub_check_name(const char *what, const char *value, int maxlen);

#endif							/* UB_CATALOG_H */
