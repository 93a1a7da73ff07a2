/*-------------------------------------------------------------------------
 * num.h
 *	  Exact arithmetic on numeric values (num.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_NUM_H
#define UB_NUM_H

#include "utils/numeric.h"

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

#endif							/* UB_NUM_H */
