/* record.c: placeholder while the module is being written; replaced before release */
#include "postgres.h"
#include "fmgr.h"
PG_FUNCTION_INFO_V1(ub_increment_usage);
Datum ub_increment_usage(PG_FUNCTION_ARGS);
Datum ub_increment_usage(PG_FUNCTION_ARGS) { ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("ub_increment_usage is not implemented yet"))); PG_RETURN_NULL(); }
PG_FUNCTION_INFO_V1(ub_increment_usage_batch);
Datum ub_increment_usage_batch(PG_FUNCTION_ARGS);
Datum ub_increment_usage_batch(PG_FUNCTION_ARGS) { ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("ub_increment_usage_batch is not implemented yet"))); PG_RETURN_NULL(); }
