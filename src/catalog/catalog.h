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
#include "utils/snapshot.h"

#include "sql.h"
#include "tiers.h"

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
	int			decimals;		/* most fractional digits of an amount */
	Numeric		max_amount;		/* largest amount of one event */
} UbMeter;

/* what a meter of a schema before 1.4 (no such columns) takes */
#define UB_DEFAULT_DECIMALS		6
#define UB_DEFAULT_MAX_AMOUNT	"1e12"

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
	Numeric		reserved;		/* per call, never cached: the key's holds against the
								 * hard cap (reservations.c); NULL = none */
} UbLimit;

/* All lookups must run between SPI_connect and SPI_finish; results live until SPI_finish. */
extern bool ub_lookup_customer(const char *customer_id, UbCustomer *customer);
extern bool ub_lookup_usage_target(const char *customer_id, const char *meter,
								   UbCustomer *customer, UbMeter *m, bool *meter_found,
								   UbLimit *limit);
/* catalog_target.c: the same, raising P0002 for an unknown customer or meter */
extern void ub_require_customer(const char *customer_id, UbCustomer *customer);
extern void ub_require_usage_target(const char *customer_id, const char *meter,
									UbCustomer *customer, UbMeter *m, UbLimit *limit);
extern List *ub_customer_limits(const UbCustomer *customer);
extern List *ub_customer_plan_limits(const char *customer_id, const char *plan);
extern List *ub_plan_limits(const char *plan);


/*
 * Filling the catalog cache's rows (catalog_cache.h) from SPI tuples: shared
 * by the per-key reads (catalog.c) and the preload (catalog_preload.c).
 */
struct UbCustomerRow;
struct UbOverride;
struct UbPlanMeter;

/* The columns ub_fill_plan_meter (catalog_rows.c) reads, for a plans p, meters m and plan_limits pl join. */
#define UB_PLAN_METER_COLUMNS \
	"p.period, p.base_price, p.currency," \
	" m.aggregation, m.value_property, m.stripe_event_name," \
	" pl.plan IS NOT NULL," \
	" pl.included, pl.hard_cap, pl.overage_price, pl.overage_unit," \
	" pl.soft_threshold, pl.tiers, pl.tier_mode," \
	" (pg_catalog.to_jsonb(m) OPERATOR(pg_catalog.->>) 'decimals')::pg_catalog.int4," \
	" (pg_catalog.to_jsonb(m) OPERATOR(pg_catalog.->>) 'max_amount')::pg_catalog.numeric"

extern void ub_fill_customer_row(HeapTuple tup, TupleDesc desc, int first, const char *customer_id,
								 struct UbCustomerRow *row);
extern void ub_fill_override(HeapTuple tup, TupleDesc desc, int first, struct UbOverride *o);
extern void ub_fill_limit(HeapTuple tup, TupleDesc desc, int first, UbLimit *l);
extern void ub_fill_plan_meter(HeapTuple tup, TupleDesc desc, int first, const char *plan,
							   const char *meter, struct UbPlanMeter *pm);

/* plan_history.c: the plan history (customer_plans) */
typedef struct UbSegment
{
	TimestampTz start;			/* [start, end): a part of a billing period */
	TimestampTz end;
	char	   *plan;			/* the plan in force in it */
} UbSegment;

extern bool ub_have_plan_history(void);
extern void ub_read_plan_history(const char *customer_id, Snapshot snap,
								 struct UbCustomerRow *row);
extern List *ub_plan_segments(const char *customer_id, const char *fallback_plan,
							  TimestampTz start, TimestampTz end);

extern UbAggregation ub_parse_aggregation(const char *name);
extern const char *ub_aggregation_name(UbAggregation agg);
extern void ub_check_name(const char *what, const char *value, int maxlen);
extern Numeric ub_default_max_amount(void);

/* usage_billing.direct_reads: false reads customers, overrides and aggregates with SQL only */
extern bool ub_direct_reads;
extern void ub_catalog_init(void);
extern bool ub_use_direct_reads(void);

#endif							/* UB_CATALOG_H */
