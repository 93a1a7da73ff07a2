/*-------------------------------------------------------------------------
 * results.c
 *	  Values returned to the caller of a set-returning SQL function.
 *
 * Vocabulary
 *	 result		a Datum copied into the caller's memory context, so that it
 *				outlives SPI_finish
 *
 * Leaf module: it calls nothing of ours.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/builtins.h"
#include "utils/numeric.h"

#include "results.h"

/* Copies a Datum of the result into the caller's context while SPI is connected. */
Datum
ub_numeric_result(Numeric n, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	Datum		d = NumericGetDatum(DatumGetNumericCopy(NumericGetDatum(n)));

	MemoryContextSwitchTo(old);
	return d;
}

/* Text Datum in the caller's context. */
Datum
ub_text_result(const char *s, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	Datum		d = CStringGetTextDatum(s);

	MemoryContextSwitchTo(old);
	return d;
}
