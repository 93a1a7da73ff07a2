/*-------------------------------------------------------------------------
 * escrow.c
 *	  Escrow slots: the rules, and what this backend remembers of hot keys.
 *
 * Every call of increment_usage updates its (customer, meter, period)
 * aggregate row and holds that row's lock until its commit is flushed, so
 * the callers of one key commit one at a time.  A key that is contended
 * also keeps part of its total in escrow slots (usage_aggregate_slots), one
 * per backend that writes it.  Each slot holds a budget: a share of what is
 * left before the next limit decision.  A caller whose contribution fits its
 * slot's budget updates only its slot, so callers of one key commit in
 * parallel, sharing a WAL flush.  The statements are in escrow_store.c,
 * and the spend, which writes the ledger row too, in record.c.
 *
 * The rules that keep every decision exact:
 *
 *	 points     the totals where something is decided: the soft threshold
 *				(an alert), the included quantity (an alert, and with a hard
 *				cap the refusal).  A point is "passed" when the row's total is
 *				already past it for good: never for a hard cap, which refuses
 *				every call once reached.
 *	 upper      the aggregate row's total plus every slot's total and budget.
 *				Spending a budget moves it into the slot's total, so spending
 *				leaves upper as it is; only a grant raises it.
 *	 invariant  under the limit in force, upper stays below every point not
 *				passed.  A grant happens under the aggregate row's lock and
 *				only if the invariant holds after it.
 *	 spendable  a slot is spent only after upper, read at that moment, is
 *				checked against the limit in force now.  A plan, limit,
 *				override or status change that brings a point within reach
 *				of what was granted under the old limits therefore sends
 *				every spender to the row: no grant outlives a change.
 *	 near       a call on the aggregate row whose effect could reach a point
 *				(one lies between the row's total and upper plus the call)
 *				first folds every slot into the row, under the row's lock and
 *				each slot's: the row then holds the exact total, and the
 *				decision is the one a single row makes.
 *
 * Only sum and count aggregates take slots (max and last are not sums).
 * Writers other than increment_usage (batches, corrections) fold a key's
 * slots first.  Readers add the slots: the view aggregate_totals, and
 * check_limit's probe.
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
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "citus.h"
#include "escrow.h"
#include "num.h"
#include "relations.h"

int			ub_hot_key_slots = UB_SLOTS_AUTO;
int			ub_escrow_fold_idle = UB_ESCROW_IDLE_SECONDS;

static const struct config_enum_entry hot_key_slots_options[] = {
	{"off", UB_SLOTS_OFF, false},
	{"auto", UB_SLOTS_AUTO, false},
	{"always", UB_SLOTS_ALWAYS, false},
	{NULL, 0, false}
};

/* From _PG_init: the settings of the escrow slots. */
void
ub_escrow_init(void)
{
	DefineCustomEnumVariable("usage_billing.hot_key_slots",
							 "When a contended aggregate takes usage through escrow slots.",
							 "auto: a key whose row this backend waited for a few times; always: every sum and count key; off: never (existing slots are still read and folded).",
							 &ub_hot_key_slots,
							 UB_SLOTS_AUTO,
							 hot_key_slots_options,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("usage_billing.escrow_fold_idle",
							"Seconds without a write after which the worker folds a key's escrow slots.",
							"Each export cycle folds the slots of keys that cooled down, so that slots do not pile up.",
							&ub_escrow_fold_idle, UB_ESCROW_IDLE_SECONDS, 0, 86400, PGC_SIGHUP,
							GUC_UNIT_S, NULL, NULL, NULL);
}

/* What this backend knows of a key: how often it waited on it, whether it has a slot. */
typedef struct KeyMemory
{
	uint64		key;
	int			contentions;
	bool		has_slot;
} KeyMemory;

/* Keys this backend remembers; forgotten all at once past this many. */
#define KEY_MEMORY_MAX	4096

static HTAB *remembered = NULL;

/* A total where something is decided. */
typedef struct EscrowPoint
{
	Numeric		value;
	bool		passable;		/* false for a hard cap: it decides every call past it */
} EscrowPoint;

static KeyMemory *remembered_key(uint64 key, bool create);
static int	limit_points(const UbLimit *limit, EscrowPoint *points);
static bool point_passed(const EscrowPoint *p, Numeric lower);

/*
 * Does this database's schema have the escrow slots (version 1.3 on)?  The
 * library also serves older schemas, between installing it and ALTER
 * EXTENSION UPDATE: there nothing has slots and totals are the rows alone.
 */
bool
ub_escrow_installed(void)
{
	return OidIsValid(ub_schema_oid()) &&
		OidIsValid(ub_relations()->slots);
}

/*
 * The saved plan of a query that names its totals relation as %1$s:
 * usage_billing.aggregate_totals (rows plus escrow slots), or, on a schema
 * without escrow slots, usage_billing.usage_aggregates.  plans[2] holds one
 * plan per schema, so a backend that lived through ALTER EXTENSION UPDATE
 * reads the slots from then on.
 */
SPIPlanPtr
ub_totals_plan(SPIPlanPtr *plans, const char *sql, int nargs, Oid *types)
{
	/*
	 * Distributed with Citus (citus.c) there are no slots, and the view's
	 * lateral join would make Citus plan a single-customer read over every
	 * shard: the aggregates alone.
	 */
	int			variant = ub_escrow_installed() && !ub_distributed() ? 1 : 0;

	if (plans[variant] == NULL)
	{
		char	   *text = psprintf(sql, variant ? "usage_billing.aggregate_totals"
								: "usage_billing.usage_aggregates");

		ub_prepare_once(&plans[variant], text, nargs, types);
		pfree(text);
	}
	return plans[variant];
}

/* A key's hash in the backend's memory of keys; a collision only costs a slot lookup that finds nothing. */
uint64
ub_escrow_key_hash(const char *customer_id, const char *meter, TimestampTz period_start)
{
	uint64		h = hash_bytes_extended((const unsigned char *) customer_id,
										strlen(customer_id), 0);

	h = hash_bytes_extended((const unsigned char *) meter, strlen(meter), h);
	return hash_bytes_extended((const unsigned char *) &period_start, sizeof(period_start), h);
}

/* What this backend remembers of a key, created on demand. */
static KeyMemory *
remembered_key(uint64 key, bool create)
{
	bool		found;
	KeyMemory *e;

	if (remembered == NULL || (create && hash_get_num_entries(remembered) >= KEY_MEMORY_MAX))
	{
		HASHCTL		ctl;

		if (!create)
			return NULL;
		if (remembered != NULL)
			hash_destroy(remembered);
		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(uint64);
		ctl.entrysize = sizeof(KeyMemory);
		ctl.hcxt = TopMemoryContext;
		remembered = hash_create("usage_billing escrow remembered", 256, &ctl,
							HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	e = hash_search(remembered, &key, create ? HASH_ENTER : HASH_FIND, &found);
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
	KeyMemory *e = remembered_key(key, false);

	return e != NULL && e->has_slot;
}

/* Records that this backend got, or lost, a slot of the key. */
void
ub_escrow_remember(uint64 key, bool has_slot)
{
	KeyMemory *e = remembered_key(key, has_slot);

	if (e != NULL)
		e->has_slot = has_slot;
}

/* Counts a wait on the key's row. */
void
ub_escrow_note_contention(uint64 key)
{
	remembered_key(key, true)->contentions++;
}

/* Has this backend waited on the key's row often enough to ask for a slot? */
bool
ub_escrow_is_hot(uint64 key)
{
	KeyMemory *e = remembered_key(key, false);

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
	/* holds (reservations.c) take their room from the hard cap */
	points[n].value = limit->hard_cap && limit->reserved != NULL ?
		ub_num_sub(limit->included, limit->reserved) : limit->included;
	points[n].passable = !limit->hard_cap;
	return n + 1;
}

/* Is the total, at least lower, past the point for good? */
static bool
point_passed(const EscrowPoint *p, Numeric lower)
{
	return p->passable && ub_num_cmp(p->value, lower) < 0;
}

/*
 * May a slot be spent now?  The key's combined budget is checked against
 * the limit in force: no point that the row's total has not passed may lie
 * at or below upper (the row's total plus every slot's total and budget).
 * It does not matter under which limits the budgets were granted.
 */
bool
ub_escrow_spendable(const UbLimit *limit, const UbEscrowProbe *p)
{
	return !ub_escrow_near(limit, p->row_total,
						   p->escrowed == NULL ? NULL : ub_num_add(p->row_total, p->escrowed));
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
