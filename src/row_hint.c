/*-------------------------------------------------------------------------
 * row_hint.c
 *	  Unique-key row lookups that start where the key's row was last found.
 *
 * A "hint" is the heap TID that a unique index's entry for a key pointed at
 * when this backend last found the key's row through it: the root of the
 * row's HOT chain.  Aggregate rows are updated in place and nearly always as
 * HOT updates (the table has fillfactor 30), so the entry, and with it the
 * root, stays the same for the life of the row.  Following the chain from
 * the root, as an index scan does once it has descended the tree, finds the
 * same version the scan would find, without the descent.
 *
 * A hint is only a place to look, never an answer: the version found must
 * satisfy the snapshot and carry the key (compared with the scan keys' own
 * functions and collations), else the index is scanned.  So a row that moved
 * (a non-HOT update), a TID reused after VACUUM, a rewritten table or a hash
 * collision costs one extra heap page visit, and a key's absence is only
 * ever concluded from the index.  A TID past the end of the table (VACUUM
 * truncated it) is not read at all: the caller keeps the table's size while
 * it holds a lock on it, which VACUUM's truncation waits for.
 *
 * The hints are a direct-mapped table in backend memory (256 kB, allocated
 * on first use); a newer key overwrites an older one in its place.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/relscan.h"
#include "access/tableam.h"
#include "common/hashfn.h"
#include "storage/bufmgr.h"
#include "utils/memutils.h"
#include "utils/rel.h"

#include "row_hint.h"

#define ROW_HINTS		16384	/* a power of two */

typedef struct RowHint
{
	uint32		check;			/* the key hash's high half */
	Oid			relnode;		/* the table's file: a rewrite forgets all */
	ItemPointerData root;
} RowHint;

static RowHint *hints = NULL;

static uint64 KeyHash(Relation index, ScanKey keys, int nkeys);
static bool KeyMatches(Relation index, ScanKey keys, int nkeys, TupleTableSlot *slot);
static bool FetchAt(Relation rel, Relation index, ScanKey keys, int nkeys, Snapshot snapshot,
					ItemPointer root, TupleTableSlot *slot, BlockNumber *nblocks);

/* A hash of the scan keys' values, as the index's column types store them. */
static uint64
KeyHash(Relation index, ScanKey keys, int nkeys)
{
	uint64		h = RelationGetRelid(index);
	int			i;

	for (i = 0; i < nkeys; i++)
	{
		Form_pg_attribute att = TupleDescAttr(RelationGetDescr(index), i);
		Datum		value = keys[i].sk_argument;
		uint64		part;

		if (att->attlen == -1)
		{
			struct varlena *v = pg_detoast_datum_packed((struct varlena *) DatumGetPointer(value));

			part = hash_bytes_extended((unsigned char *) VARDATA_ANY(v), VARSIZE_ANY_EXHDR(v), i);
		}
		else if (att->attbyval)
			part = hash_bytes_uint32_extended((uint32) value, (uint64) value >> 32);
		else
			part = hash_bytes_extended((unsigned char *) DatumGetPointer(value), att->attlen, i);
		h = hash_combine64(h, part);
	}
	return h;
}

/* Does the row in slot carry the key, compared as the index compares it? */
static bool
KeyMatches(Relation index, ScanKey keys, int nkeys, TupleTableSlot *slot)
{
	int			i;

	for (i = 0; i < nkeys; i++)
	{
		bool		isnull;
		Datum		value = slot_getattr(slot, index->rd_index->indkey.values[i], &isnull);

		if (isnull ||
			!DatumGetBool(FunctionCall2Coll(&keys[i].sk_func, keys[i].sk_collation,
											value, keys[i].sk_argument)))
			return false;
	}
	return true;
}

/*
 * Fetches into slot the member of the HOT chain at root that satisfies the
 * snapshot, if it carries the key; the same fetch an index scan makes for
 * an index entry pointing at root.
 */
static bool
FetchAt(Relation rel, Relation index, ScanKey keys, int nkeys, Snapshot snapshot,
		ItemPointer root, TupleTableSlot *slot, BlockNumber *nblocks)
{
	IndexFetchTableData *fetch;
	ItemPointerData tid = *root;
	bool		call_again = false;
	bool		all_dead = false;
	bool		found;

	if (*nblocks == InvalidBlockNumber || ItemPointerGetBlockNumber(&tid) >= *nblocks)
	{
		*nblocks = RelationGetNumberOfBlocks(rel);
		if (ItemPointerGetBlockNumber(&tid) >= *nblocks)
			return false;
	}
	fetch = table_index_fetch_begin(rel);
	found = table_index_fetch_tuple(fetch, &tid, snapshot, slot, &call_again, &all_dead);
	table_index_fetch_end(fetch);
	if (found && !KeyMatches(index, keys, nkeys, slot))
	{
		ExecClearTuple(slot);
		found = false;
	}
	return found;
}

/*
 * Fetches into slot the row of rel whose key in the unique index is keys
 * (one equality key per index column, in order), as an index scan with
 * snapshot would: where the key's row was last found first, then through
 * the index.  *nblocks is the caller's idea of the table's size
 * (InvalidBlockNumber: none yet); it may keep the value only while it holds
 * a lock on rel.  With a snapshot that is not MVCC (a dirty one), the first
 * version that satisfies it is returned, as index_getnext_slot would.
 */
bool
ub_row_fetch(Relation rel, Relation index, ScanKey keys, int nkeys, Snapshot snapshot,
			 TupleTableSlot *slot, BlockNumber *nblocks)
{
	uint64		h = KeyHash(index, keys, nkeys);
	RowHint    *hint;
	IndexScanDesc scan;
	ItemPointer tid;
	ItemPointerData root;
	bool		found = false;

	Assert(nkeys == IndexRelationGetNumberOfKeyAttributes(index));
	if (hints == NULL)
		hints = MemoryContextAllocZero(TopMemoryContext, sizeof(RowHint) * ROW_HINTS);
	hint = &hints[h & (ROW_HINTS - 1)];
	if (hint->check == (uint32) (h >> 32) && hint->relnode == rel->rd_node.relNode &&
		ItemPointerIsValid(&hint->root) &&
		FetchAt(rel, index, keys, nkeys, snapshot, &hint->root, slot, nblocks))
		return true;

	/* index_getnext_slot, keeping the entry's TID: the fetch moves it along the chain */
	ItemPointerSetInvalid(&root);
	scan = index_beginscan(rel, index, snapshot, nkeys, 0);
	index_rescan(scan, keys, nkeys, NULL, 0);
	for (;;)
	{
		if (!scan->xs_heap_continue)
		{
			tid = index_getnext_tid(scan, ForwardScanDirection);
			if (tid == NULL)
				break;
			root = *tid;
		}
		if (index_fetch_heap(scan, slot))
		{
			found = true;
			break;
		}
	}
	index_endscan(scan);
	if (found)
	{
		hint->check = (uint32) (h >> 32);
		hint->relnode = rel->rd_node.relNode;
		hint->root = root;
	}
	return found;
}
