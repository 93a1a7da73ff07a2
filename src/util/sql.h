/*-------------------------------------------------------------------------
 * sql.h
 *	  Saved plans, the safe search path, columns of SPI rows (sql.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_SQL_H
#define UB_SQL_H

#include "executor/spi.h"
#include "utils/numeric.h"

/* true: saved plans are custom plans (set by the catalog: a distributed schema) */
typedef bool (*UbCustomPlansHook) (void);
extern UbCustomPlansHook ub_custom_plans_hook;

extern SPIPlanPtr ub_prepare_saved_with(const char *sql, int nargs, Oid *argtypes, int options);
extern SPIPlanPtr ub_prepare_saved(const char *sql, int nargs, Oid *argtypes);
extern SPIPlanPtr ub_prepare_routable(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types);
extern SPIPlanPtr ub_prepare_once(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types);
extern void ub_push_safe_search_path(void);
extern Datum ub_array(Datum *elems, bool *nulls, int n, Oid type);
extern char *ub_col_text(HeapTuple tup, TupleDesc desc, int col);
extern Numeric ub_col_numeric(HeapTuple tup, TupleDesc desc, int col);
extern bool ub_col_bool(HeapTuple tup, TupleDesc desc, int col);

#endif							/* UB_SQL_H */
