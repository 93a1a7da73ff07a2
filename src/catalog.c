/* catalog.c: placeholder while the module is being written; replaced before release */
#include "postgres.h"
#include "fmgr.h"
