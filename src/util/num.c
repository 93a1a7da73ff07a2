/*-------------------------------------------------------------------------
 * num.c
 *	  Exact arithmetic on numeric values, for every subsystem.
 *
 * Vocabulary
 *	 num		a Numeric (PostgreSQL's arbitrary precision decimal); money and
 *				usage never pass through floating point
 *	 special	NaN or an infinity, which no amount, limit or price may be
 *
 * Thin wrappers over the numeric functions of PostgreSQL, so that callers
 * read as arithmetic.  Leaf module: it calls nothing of ours.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/numeric.h"

#include "num.h"

/* Sums two numerics. */
Numeric
ub_num_add(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_add, NumericGetDatum(a), NumericGetDatum(b)));
}

/* Subtracts b from a. */
Numeric
ub_num_sub(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_sub, NumericGetDatum(a), NumericGetDatum(b)));
}

/* Multiplies two numerics. */
Numeric
ub_num_mul(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_mul, NumericGetDatum(a), NumericGetDatum(b)));
}

/* Divides, then drops the trailing zeros numeric division pads its result with. */
Numeric
ub_num_div(Numeric a, Numeric b)
{
	Datum		q = DirectFunctionCall2(numeric_div, NumericGetDatum(a), NumericGetDatum(b));

	return DatumGetNumeric(DirectFunctionCall1(numeric_trim_scale, q));
}

/* Three-way comparison. */
int
ub_num_cmp(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a), NumericGetDatum(b)));
}

/* A fresh numeric zero. */
Numeric
ub_num_zero(void)
{
	return int64_to_numeric(0);
}

/* A numeric from an integer. */
Numeric
ub_num_int(int64 v)
{
	return int64_to_numeric(v);
}

/* The larger of two numerics. */
Numeric
ub_num_max(Numeric a, Numeric b)
{
	return ub_num_cmp(a, b) >= 0 ? a : b;
}

/* A numeric as text, for messages and reports. */
char *
ub_num_str(Numeric n)
{
	return DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(n)));
}

/* NaN or an infinity: values that must never reach a total or a price. */
bool
ub_num_is_special(Numeric a)
{
	return numeric_is_nan(a) || numeric_is_inf(a);
}
