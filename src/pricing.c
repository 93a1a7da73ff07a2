/* pricing.c: placeholder while the module is being written; replaced before release */
#include "postgres.h"
#include "fmgr.h"
PG_FUNCTION_INFO_V1(ub_validate_tiers);
Datum ub_validate_tiers(PG_FUNCTION_ARGS);
Datum ub_validate_tiers(PG_FUNCTION_ARGS) { ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("ub_validate_tiers is not implemented yet"))); PG_RETURN_NULL(); }
