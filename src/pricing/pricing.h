/*-------------------------------------------------------------------------
 * pricing.h
 *	  Exact numeric pricing: tiers, overage, status and money rounding.
 *-------------------------------------------------------------------------
 */
#ifndef UB_PRICING_H
#define UB_PRICING_H

#include "catalog.h"
#include "num.h"
#include "tiers.h"

extern Numeric ub_tiers_price(const UbTiers *tiers, Numeric total);

extern bool ub_limit_is_billed(const UbLimit *limit);
extern Numeric ub_overage_quantity(const UbLimit *limit, Numeric total);
extern Numeric ub_usage_cost(const UbLimit *limit, Numeric total);
extern Numeric ub_remaining(const UbLimit *limit, Numeric total);
extern const char *ub_usage_status(const UbLimit *limit, Numeric total);
extern Numeric ub_round_money(Numeric amount, const char *currency);
extern int	ub_currency_decimals(const char *currency);

#endif							/* UB_PRICING_H */
