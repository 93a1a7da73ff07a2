/*-------------------------------------------------------------------------
 * tiers.h
 *	  The tiers of a limit row (tiers.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_TIERS_H
#define UB_TIERS_H

#include "utils/jsonb.h"
#include "utils/numeric.h"

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

#endif							/* UB_TIERS_H */
