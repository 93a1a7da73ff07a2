/*-------------------------------------------------------------------------
 * results.h
 *	  Values returned by set-returning SQL functions (results.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_RESULTS_H
#define UB_RESULTS_H

#include "fmgr.h"
#include "funcapi.h"
#include "utils/numeric.h"

/* Starts a materialized result set, honouring the caller's expected row type. */
static inline void
ub_init_srf(FunctionCallInfo fcinfo)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bits32		flags = 0;

	if (rsinfo != NULL && IsA(rsinfo, ReturnSetInfo) && rsinfo->expectedDesc != NULL)
		flags = MAT_SRF_USE_EXPECTED_DESC;
	InitMaterializedSRF(fcinfo, flags);
}

extern Datum ub_numeric_result(Numeric n, MemoryContext cxt);
extern Datum ub_text_result(const char *s, MemoryContext cxt);

#endif							/* UB_RESULTS_H */
