/*-------------------------------------------------------------------------
 * row_hint.h
 *	  Unique-key row lookups that start where the key's row was last found.
 *-------------------------------------------------------------------------
 */
#ifndef UB_ROW_HINT_H
#define UB_ROW_HINT_H

#include "access/skey.h"
#include "executor/tuptable.h"
#include "storage/block.h"
#include "utils/relcache.h"
#include "utils/snapshot.h"

extern bool ub_row_fetch(Relation rel, Relation index, ScanKey keys, int nkeys,
						 Snapshot snapshot, TupleTableSlot *slot, BlockNumber *nblocks);

#endif							/* UB_ROW_HINT_H */
