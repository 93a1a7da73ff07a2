/* export_worker.c: placeholder while the module is being written; replaced before release */
#include "postgres.h"
#include "fmgr.h"
#include "usage_billing.h"
void ub_export_init(void) {}
