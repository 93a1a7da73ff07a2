/*-------------------------------------------------------------------------
 * relations.h
 *	  The schema's relations that C code reads directly, resolved once.
 *-------------------------------------------------------------------------
 */
#ifndef UB_RELATIONS_H
#define UB_RELATIONS_H

#include "access/attnum.h"
#include "postgres_ext.h"

/* What a backend knows of the schema; InvalidOid / InvalidAttrNumber for what it lacks. */
typedef struct UbRelations
{
	Oid			aggregates;			/* usage_aggregates */
	Oid			aggregates_pkey;	/* its primary key, whatever its name */
	AttrNumber	agg_total;
	AttrNumber	agg_slotted;		/* from 1.3 */
	AttrNumber	agg_reserved;		/* from 1.4 */
	Oid			slots;				/* usage_aggregate_slots, from 1.3 */
	Oid			slots_pkey;
	AttrNumber	slot_slot;
	AttrNumber	slot_total;
	AttrNumber	slot_budget;
	Oid			reservations;		/* from 1.4 */
} UbRelations;

extern const UbRelations *ub_relations(void);
extern Oid	ub_schema_oid(void);
extern Oid	ub_schema_relation(const char *relname);

#endif							/* UB_RELATIONS_H */
