/* invoice.c: placeholder while the module is being written; replaced before release */
#include "postgres.h"
#include "fmgr.h"
PG_FUNCTION_INFO_V1(ub_calculate_overage);
Datum ub_calculate_overage(PG_FUNCTION_ARGS);
Datum ub_calculate_overage(PG_FUNCTION_ARGS) { ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("ub_calculate_overage is not implemented yet"))); PG_RETURN_NULL(); }
PG_FUNCTION_INFO_V1(ub_preview_invoice);
Datum ub_preview_invoice(PG_FUNCTION_ARGS);
Datum ub_preview_invoice(PG_FUNCTION_ARGS) { ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("ub_preview_invoice is not implemented yet"))); PG_RETURN_NULL(); }
