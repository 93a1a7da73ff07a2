/*-------------------------------------------------------------------------
 * pricing.h
 *	  Exact numeric pricing: tiers, overage, status and money rounding.
 *-------------------------------------------------------------------------
 */
#ifndef UB_PRICING_H
#define UB_PRICING_H

#include "catalog.h"

typedef struct UbTier
{
	Numeric		up_to;			/* inclusive upper bound; NULL = open-ended */
	Numeric		unit_price;
	Numeric		flat_fee;
} UbTier;

typedef struct UbTiers
{
	bool		volume;			/* false: graduated */
	int			ntiers;
	UbTier		tiers[FLEXIBLE_ARRAY_MEMBER];
} UbTiers;

extern UbTiers *ub_parse_tiers(Jsonb *tiers, bool volume);
extern Numeric ub_tiers_price(const UbTiers *tiers, Numeric total);

extern bool ub_limit_is_billed(const UbLimit *limit);
extern Numeric ub_overage_quantity(const UbLimit *limit, Numeric total);
extern Numeric ub_usage_cost(const UbLimit *limit, Numeric total);
extern Numeric ub_remaining(const UbLimit *limit, Numeric total);
extern const char *ub_usage_status(const UbLimit *limit, Numeric total);
extern Numeric ub_round_money(Numeric amount, const char *currency);
extern int	ub_currency_decimals(const char *currency);

/* numeric arithmetic without the fmgr noise */
extern Numeric ub_num_add(Numeric a, Numeric b);
extern Numeric ub_num_sub(Numeric a, Numeric b);
extern Numeric ub_num_mul(Numeric a, Numeric b);
extern Numeric ub_num_div(Numeric a, Numeric b);
extern int	ub_num_cmp(Numeric a, Numeric b);
extern Numeric ub_num_zero(void);
extern Numeric ub_num_int(int64 v);
extern Numeric ub_num_max(Numeric a, Numeric b);
extern bool ub_num_is_special(Numeric a);
extern char *ub_num_str(Numeric n);

#endif							/* UB_PRICING_H */
