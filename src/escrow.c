/*-------------------------------------------------------------------------
 * escrow.c
 *	  Escrow slots: the rules, the readers' sum, and folding slots back.
 *
 * Every call of increment_usage updates its (customer, meter, period)
 * aggregate row and holds that row's lock until its commit is flushed, so
 * the callers of one key commit one at a time.  A key that is contended
 * also keeps part of its total in escrow slots (usage_aggregate_slots), one
 * per backend that writes it.  Each slot holds a budget: a share of what is
 * left before the next limit decision.  A caller whose contribution fits its
 * slot's budget updates only its slot (direct_escrow.c), so callers of one
 * key commit in parallel, and sharing a WAL flush.
 *
 * The rules that keep every decision exact:
 *
 *	 points     the totals where something is decided: the soft threshold
 *				(an alert), the included quantity (an alert, and with a hard
 *				cap the refusal).  A point is "passed" when the total is
 *				already past it for good: never for a hard cap, which refuses
 *				every call once reached.
 *	 invariant  the aggregate row's total plus every slot's total and budget
 *				("upper") stays below every point not passed.  Spending a
 *				budget moves it into the slot's total, so spending needs no
 *				other lock; granting a budget happens under the aggregate
 *				row's lock and only if the invariant holds after it.
 *	 near       a call on the aggregate row whose effect could reach a point
 *				(one lies between the row's total and upper plus the call)
 *				first folds every slot into the row, under the row's lock and
 *				each slot's: the row then holds the exact total, and the
 *				decision is the one a single row makes.
 *	 validity   a slot's budget is tied to the limits it was granted under:
 *				its floor (the row's total then) and the point it stays below.
 *				A slot may be spent only if, under the limits in force now,
 *				every point is passed at the floor or at or above that point.
 *
 * Only sum and count aggregates take slots (max and last are not sums).
 * Writers other than increment_usage's direct path (SQL, corrections) fold
 * a key's slots first.  Readers add the slots: the view aggregate_totals,
 * and ub_escrow_slot_sum for the C readers.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "common/hashfn.h"
#include "lib/stringinfo.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "catalog/namespace.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "escrow.h"
#include "pricing.h"
#include "record.h"

int			ub_hot_key_slots = UB_SLOTS_AUTO;

/* What this backend knows of a key: how often it waited on it, whether it has a slot. */
typedef struct EscrowHint
{
	uint64		key;
	int			contentions;
	bool		has_slot;
} EscrowHint;

/* Keys this backend remembers; forgotten all at once past this many. */
#define ESCROW_HINTS_MAX	4096

static HTAB *hints = NULL;

/* A total where something is decided. */
typedef struct EscrowPoint
{
	Numeric		value;
	bool		passable;		/* false for a hard cap: it decides every call past it */
} EscrowPoint;

static EscrowHint *hint_entry(uint64 key, bool create);
static int	limit_points(const UbLimit *limit, EscrowPoint *points);
static bool point_passed(const EscrowPoint *p, Numeric lower);

PG_FUNCTION_INFO_V1(ub_fold_escrow_slots);

/*
 * Does this database's schema have the escrow slots (version 1.3 on)?  The
 * library also serves older schemas, between installing it and ALTER
 * EXTENSION UPDATE: there nothing has slots and totals are the rows alone.
 */
bool
ub_escrow_installed(void)
{
	Oid			nsp = get_namespace_oid("usage_billing", true);

	return OidIsValid(nsp) && OidIsValid(get_relname_relid("usage_aggregate_slots", nsp));
}

/*
 * The saved plan of a query written against usage_billing.aggregate_totals,
 * or, on a schema without escrow slots, of the same query against
 * usage_billing.usage_aggregates.  plans[2] holds one plan per schema, so a
 * backend that lived through ALTER EXTENSION UPDATE reads the slots from
 * then on.
 */
SPIPlanPtr
ub_totals_plan(SPIPlanPtr *plans, const char *sql, int nargs, Oid *types)
{
	int			variant = ub_escrow_installed() ? 1 : 0;

	if (plans[variant] == NULL)
	{
		StringInfoData buf;
		const char *view = "usage_billing.aggregate_totals";
		const char *p = sql;
		const char *hit;

		initStringInfo(&buf);
		while (variant == 0 && (hit = strstr(p, view)) != NULL)
		{
			appendBinaryStringInfo(&buf, p, hit - p);
			appendStringInfoString(&buf, "usage_billing.usage_aggregates");
			p = hit + strlen(view);
		}
		appendStringInfoString(&buf, p);
		ub_prepare_once(&plans[variant], buf.data, nargs, types);
		pfree(buf.data);
	}
	return plans[variant];
}

/* A key's hint-table hash; a collision only costs a slot lookup that finds nothing. */
uint64
ub_escrow_key_hash(const char *customer_id, const char *meter, TimestampTz period_start)
{
	uint64		h = hash_bytes_extended((const unsigned char *) customer_id,
										strlen(customer_id), 0);

	h = hash_bytes_extended((const unsigned char *) meter, strlen(meter), h);
	return hash_bytes_extended((const unsigned char *) &period_start, sizeof(period_start), h);
}

/* The hint of a key, created on demand. */
static EscrowHint *
hint_entry(uint64 key, bool create)
{
	bool		found;
	EscrowHint *e;

	if (hints == NULL || (create && hash_get_num_entries(hints) >= ESCROW_HINTS_MAX))
	{
		HASHCTL		ctl;

		if (!create)
			return NULL;
		if (hints != NULL)
			hash_destroy(hints);
		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(uint64);
		ctl.entrysize = sizeof(EscrowHint);
		ctl.hcxt = TopMemoryContext;
		hints = hash_create("usage_billing escrow hints", 256, &ctl,
							HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	e = hash_search(hints, &key, create ? HASH_ENTER : HASH_FIND, &found);
	if (e != NULL && !found)
	{
		e->contentions = 0;
		e->has_slot = false;
	}
	return e;
}

/* Does this backend (probably) hold a slot of the key? */
bool
ub_escrow_has_slot(uint64 key)
{
	EscrowHint *e = hint_entry(key, false);

	return e != NULL && e->has_slot;
}

/* Records that this backend got, or lost, a slot of the key. */
void
ub_escrow_remember(uint64 key, bool has_slot)
{
	EscrowHint *e = hint_entry(key, has_slot);

	if (e != NULL)
		e->has_slot = has_slot;
}

/* Counts a wait on the key's row. */
void
ub_escrow_note_contention(uint64 key)
{
	hint_entry(key, true)->contentions++;
}

/* Has this backend waited on the key's row often enough to ask for a slot? */
bool
ub_escrow_is_hot(uint64 key)
{
	EscrowHint *e = hint_entry(key, false);

	return e != NULL && e->contentions >= UB_ESCROW_CONTENTIONS;
}

/* The points of a limit: the soft threshold and the included quantity. */
static int
limit_points(const UbLimit *limit, EscrowPoint *points)
{
	int			n = 0;

	if (limit == NULL || !limit->exists || limit->included == NULL)
		return 0;
	/* as the alerts: included 0 has no soft threshold */
	if (limit->soft_threshold != NULL && ub_num_cmp(limit->included, ub_num_zero()) > 0)
	{
		points[n].value = ub_num_mul(limit->soft_threshold, limit->included);
		points[n].passable = true;
		n++;
	}
	points[n].value = limit->included;
	points[n].passable = !limit->hard_cap;
	return n + 1;
}

/* Is the total, at least lower, past the point for good? */
static bool
point_passed(const EscrowPoint *p, Numeric lower)
{
	return p->passable && ub_num_cmp(p->value, lower) < 0;
}

/* May a slot granted at floor_total, below budget_limit (NULL: none), be spent under this limit? */
bool
ub_escrow_slot_valid(const UbLimit *limit, Numeric floor_total, Numeric budget_limit)
{
	EscrowPoint points[2];
	int			n = limit_points(limit, points);
	int			i;

	for (i = 0; i < n; i++)
	{
		if (point_passed(&points[i], floor_total))
			continue;
		if (budget_limit != NULL && ub_num_cmp(points[i].value, budget_limit) >= 0)
			continue;
		return false;
	}
	return true;
}

/*
 * Could a total between lower and upper (NULL: unbounded) reach a point?
 * Then the slots must be folded before deciding.
 */
bool
ub_escrow_near(const UbLimit *limit, Numeric lower, Numeric upper)
{
	EscrowPoint points[2];
	int			n = limit_points(limit, points);
	int			i;

	for (i = 0; i < n; i++)
		if (!point_passed(&points[i], lower) &&
			(upper == NULL || ub_num_cmp(points[i].value, upper) <= 0))
			return true;
	return false;
}

/*
 * A new budget for one slot, given the aggregate row's total (lower) and
 * upper, the row's total plus every slot's total and budget (NULL:
 * unbounded): a share of what is left below the next point, NULL (no
 * limit) when no point is left.  False when nothing can be granted.
 */
bool
ub_escrow_grant(const UbLimit *limit, Numeric lower, Numeric upper,
				Numeric *budget, Numeric *budget_limit)
{
	EscrowPoint points[2];
	int			n = limit_points(limit, points);
	Numeric		next = NULL;
	Numeric		share;
	int			i;

	for (i = 0; i < n; i++)
		if (!point_passed(&points[i], lower) &&
			(next == NULL || ub_num_cmp(points[i].value, next) < 0))
			next = points[i].value;
	if (next == NULL)
	{
		*budget = NULL;
		*budget_limit = NULL;
		return true;
	}
	if (upper == NULL || ub_num_cmp(upper, next) >= 0)
		return false;
	share = ub_num_div(ub_num_sub(next, upper), ub_num_int(UB_ESCROW_SHARES));
	share = DatumGetNumeric(DirectFunctionCall1(numeric_floor, NumericGetDatum(share)));
	if (ub_num_cmp(share, ub_num_zero()) <= 0)
		return false;
	*budget = share;
	*budget_limit = next;
	return true;
}

/*
 * Scan keys for the aggregate key (customer, meter, period_start) on an
 * index that starts with those columns (the aggregates' and the slots'
 * primary keys), compared in the index's own collations as the planner would.
 */
void
ub_key_scankeys(Relation index, Datum customer, Datum meter, TimestampTz period_start,
				ScanKeyData *keys)
{
	ScanKeyEntryInitialize(&keys[0], 0, 1, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[0], F_TEXTEQ, customer);
	ScanKeyEntryInitialize(&keys[1], 0, 2, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[1], F_TEXTEQ, meter);
	ScanKeyEntryInitialize(&keys[2], 0, 3, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[2], F_TIMESTAMPTZ_EQ,
						   TimestampTzGetDatum(period_start));
}

/*
 * Adds up a key's slots visible to snapshot (total, events), leaving out
 * slot skip_slot (-1: none).  The caller has the table and its primary key
 * open; attnums, when not NULL, are its columns in the order of SLOT_*
 * (attnums[SLOT_TOTAL] ...), else they are looked up by name.
 */
void
ub_escrow_slot_sum(Relation slots, Relation pkey, const AttrNumber *attnums,
				   Datum customer, Datum meter, TimestampTz period_start, Snapshot snapshot,
				   int skip_slot, Numeric *total, int64 *event_count)
{
	Oid			relid = RelationGetRelid(slots);
	AttrNumber	slot_att = attnums ? attnums[SLOT_SLOT] : get_attnum(relid, "slot");
	AttrNumber	total_att = attnums ? attnums[SLOT_TOTAL] : get_attnum(relid, "total");
	AttrNumber	count_att = attnums ? attnums[SLOT_COUNT] : get_attnum(relid, "event_count");
	ScanKeyData keys[3];
	IndexScanDesc scan;
	TupleTableSlot *tuple;

	if (slot_att == InvalidAttrNumber || total_att == InvalidAttrNumber ||
		count_att == InvalidAttrNumber)
		elog(ERROR, "usage_billing.usage_aggregate_slots is missing a column");
	*total = ub_num_zero();
	*event_count = 0;
	ub_key_scankeys(pkey, customer, meter, period_start, keys);
	tuple = table_slot_create(slots, NULL);
	scan = index_beginscan(slots, pkey, snapshot, 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	while (index_getnext_slot(scan, ForwardScanDirection, tuple))
	{
		bool		isnull;

		if (DatumGetInt32(slot_getattr(tuple, slot_att, &isnull)) == skip_slot)
			continue;
		*total = ub_num_add(*total, DatumGetNumeric(slot_getattr(tuple, total_att, &isnull)));
		*event_count += DatumGetInt64(slot_getattr(tuple, count_att, &isnull));
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(tuple);
}

/*
 * Folds one key's slots into its aggregate row with SQL: locks the row
 * first (the order every writer takes), then deletes the slots, which waits
 * for a caller spending one, and adds what they held.  For the writers that
 * are not the direct path: the SQL path, corrections, the worker.  Returns
 * the total the slots held (0 when the key had none), in the caller's
 * memory context.
 */
Numeric
ub_escrow_fold_key_sql(const char *customer_id, const char *meter, TimestampTz period_start)
{
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr fold_plan = NULL;
	MemoryContext caller = CurrentMemoryContext;
	Numeric		folded = NULL;
	Oid			types[3] = {TEXTOID, TEXTOID, TIMESTAMPTZOID};
	Datum		args[3];
	int			ret;

	if (!ub_escrow_installed())
		return ub_num_zero();

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	ret = SPI_execute_plan(ub_prepare_once(&lock_plan,
										   "SELECT 1 FROM usage_billing.usage_aggregates"
										   " WHERE customer_id = $1 AND meter = $2 AND period_start = $3"
										   "   AND slotted FOR NO KEY UPDATE", 3, types),
						   args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "aggregate lock failed: %s", SPI_result_code_string(ret));
	if (SPI_processed > 0)
	{
		ret = SPI_execute_plan(ub_prepare_once(&fold_plan,
											   "WITH gone AS ("
											   "  DELETE FROM usage_billing.usage_aggregate_slots"
											   "   WHERE customer_id = $1 AND meter = $2 AND period_start = $3"
											   "  RETURNING total, event_count, first_usage, last_usage)"
											   " UPDATE usage_billing.usage_aggregates a"
											   "    SET total = a.total + g.total,"
											   "        event_count = a.event_count + g.event_count,"
											   "        first_usage = least(a.first_usage, g.first_usage),"
											   "        last_usage = greatest(a.last_usage, g.last_usage),"
											   "        slotted = false"
											   "   FROM (SELECT coalesce(sum(total), 0) AS total,"
											   "                coalesce(sum(event_count), 0)::bigint AS event_count,"
											   "                min(first_usage) AS first_usage,"
											   "                max(last_usage) AS last_usage FROM gone) g"
											   "  WHERE a.customer_id = $1 AND a.meter = $2 AND a.period_start = $3"
											   " RETURNING g.total",
											   3, types),
							   args, NULL, false, 0);
		if (ret != SPI_OK_UPDATE_RETURNING || SPI_processed != 1)
			elog(ERROR, "escrow fold failed: %s", SPI_result_code_string(ret));
		else
		{
			bool		isnull;
			Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
			MemoryContext spi = MemoryContextSwitchTo(caller);

			folded = DatumGetNumericCopy(d);
			MemoryContextSwitchTo(spi);
		}
	}
	PopOverrideSearchPath();
	SPI_finish();
	return folded != NULL ? folded : ub_num_zero();
}

/*
 * Folds the slots of every slotted aggregate, or of one customer's
 * (customer_id not NULL), one key at a time; returns how many keys.  It
 * reads the slots table, which is small, not the aggregates.  With
 * idle_seconds > 0, only keys whose slots nobody wrote for that long: the
 * export worker runs it every cycle so that slots do not pile up, and
 * leaves the keys that are hot right now alone.
 */
int64
ub_escrow_fold_all(const char *customer_id, int idle_seconds)
{
	static SPIPlanPtr keys_plan = NULL;
	Oid			types[2] = {TEXTOID, INT4OID};
	Datum		args[2];
	char		nulls[2];
	SPITupleTable *keys;
	uint64		n;
	uint64		i;

	if (!ub_escrow_installed())
		return 0;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ub_push_safe_search_path();
	args[0] = customer_id ? CStringGetTextDatum(customer_id) : (Datum) 0;
	nulls[0] = customer_id ? ' ' : 'n';
	args[1] = Int32GetDatum(idle_seconds);
	nulls[1] = ' ';
	if (SPI_execute_plan(ub_prepare_once(&keys_plan,
										 "SELECT customer_id, meter, period_start"
										 "  FROM usage_billing.usage_aggregate_slots"
										 " WHERE $1 IS NULL OR customer_id = $1"
										 " GROUP BY 1, 2, 3"
										 " HAVING max(updated_at) <= pg_catalog.now()"
										 "       - pg_catalog.make_interval(secs => $2)"
										 " ORDER BY 1, 2, 3", 2, types),
						 args, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "slotted aggregates lookup failed");
	keys = SPI_tuptable;
	n = SPI_processed;
	for (i = 0; i < n; i++)
	{
		HeapTuple	t = keys->vals[i];
		bool		isnull;
		char	   *customer = TextDatumGetCString(SPI_getbinval(t, keys->tupdesc, 1, &isnull));
		char	   *meter = TextDatumGetCString(SPI_getbinval(t, keys->tupdesc, 2, &isnull));
		TimestampTz period_start = DatumGetTimestampTz(SPI_getbinval(t, keys->tupdesc, 3, &isnull));

		CHECK_FOR_INTERRUPTS();
		(void) ub_escrow_fold_key_sql(customer, meter, period_start);
	}
	PopOverrideSearchPath();
	SPI_finish();
	return (int64) n;
}

/* SQL: fold_escrow_slots(customer_id DEFAULT NULL), the number of aggregates folded. */
Datum
ub_fold_escrow_slots(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(ub_escrow_fold_all(PG_ARGISNULL(0) ? NULL :
									   text_to_cstring(PG_GETARG_TEXT_PP(0)), 0));
}
