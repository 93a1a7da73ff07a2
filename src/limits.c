/* limits.c: placeholder while the module is being written; replaced before release */
#include "postgres.h"
#include "fmgr.h"
PG_FUNCTION_INFO_V1(ub_check_limit);
Datum ub_check_limit(PG_FUNCTION_ARGS);
Datum ub_check_limit(PG_FUNCTION_ARGS) { ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("ub_check_limit is not implemented yet"))); PG_RETURN_NULL(); }
