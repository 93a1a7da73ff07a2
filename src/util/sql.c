/*-------------------------------------------------------------------------
 * sql.c
 *	  Running our SQL: saved plans, a safe search path, columns of SPI rows.
 *
 * Vocabulary
 *	 saved plan	an SPI plan prepared once per backend, kept (SPI_keepplan)
 *				and planned generically: every statement of ours finds its
 *				rows through a key given as parameters
 *	 safe path	the override search path (pg_catalog alone) under which our
 *				statements run, whatever the caller's search_path is
 *	 column		a value of an SPI result row, copied out of the tuple table
 *
 * Leaf module: it calls nothing of ours.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"

#include "sql.h"

/* Set by the catalog: true when saved plans must be custom (the schema is distributed). */
UbCustomPlansHook ub_custom_plans_hook = NULL;

/*
 * Prepares a statement and keeps it for the backend's life, with the plan
 * options given (CURSOR_OPT_GENERIC_PLAN or CURSOR_OPT_CUSTOM_PLAN).
 */
SPIPlanPtr
ub_prepare_saved_with(const char *sql, int nargs, Oid *argtypes, int options)
{
	SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, argtypes, options);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/*
 * Prepares a statement once per backend and keeps it, with a generic plan:
 * every statement here finds its rows through a key given as parameters,
 * so a plan made for the parameters' values is never better, and the plan
 * cache would otherwise plan a statement anew on every call whenever its
 * generic plan's estimated cost is not lower than the custom plans'.
 * Distributed with Citus, the plan must know the parameters' values (Citus
 * finds the shard of a join or a CTE from the customer_id while planning):
 * custom plans then, but for the statements of ub_prepare_routable().
 */
SPIPlanPtr
ub_prepare_saved(const char *sql, int nargs, Oid *argtypes)
{
	bool		custom = ub_custom_plans_hook != NULL && ub_custom_plans_hook();

	return ub_prepare_saved_with(sql, nargs, argtypes,
								 custom ? CURSOR_OPT_CUSTOM_PLAN : CURSOR_OPT_GENERIC_PLAN);
}

/*
 * Prepares, once, a statement that Citus can route with a generic plan: one
 * distributed table keyed by customer_id = $1 (a SELECT, or a single-row
 * INSERT), or reference tables only.  Citus then picks the shard when the
 * statement runs and keeps the shard's local plan, where a custom plan is
 * planned, deparsed and planned again on every call.  On one node the same
 * as ub_prepare_once.
 */
SPIPlanPtr
ub_prepare_routable(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types)
{
	if (*plan == NULL)
		*plan = ub_prepare_saved_with(sql, nargs, types, CURSOR_OPT_GENERIC_PLAN);
	return *plan;
}

/* Prepares a statement into *plan on first use; the plan lives as long as the backend. */
SPIPlanPtr
ub_prepare_once(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types)
{
	if (*plan == NULL)
		*plan = ub_prepare_saved(sql, nargs, types);
	return *plan;
}

/* A one-dimensional array of n datums of a built-in type, for array parameters of SPI plans. */
Datum
ub_array(Datum *elems, bool *nulls, int n, Oid type)
{
	int			dims[1];
	int			lbs[1] = {1};
	int16		typlen;
	bool		byval;
	char		align;

	dims[0] = n;
	get_typlenbyvalalign(type, &typlen, &byval, &align);
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs, type, typlen, byval, align));
}

/* Column accessors that copy out of the SPI tuple table. */
char *
ub_col_text(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* A numeric column of an SPI row, copied; NULL stays NULL. */
Numeric
ub_col_numeric(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : DatumGetNumericCopy(d);
}

/* A boolean column of an SPI row; NULL reads as false. */
bool
ub_col_bool(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? false : DatumGetBool(d);
}

/*
 * Pins the search path of the SQL we run to pg_catalog alone.  The hot-path
 * functions are declared without SET search_path: a function SET saves and
 * restores the GUC machinery on every call, a measurable share of the call.
 * An override search path costs nearly nothing, keeps a caller's objects
 * from capturing our statements, and keeps the saved plans valid whatever
 * the caller's search_path is.  Errors pop it with the (sub)transaction.
 */
void
ub_push_safe_search_path(void)
{
	OverrideSearchPath path;

	memset(&path, 0, sizeof(path));
	path.schemas = NIL;
	path.addCatalog = true;
	path.addTemp = false;
	PushOverrideSearchPath(&path);
}
