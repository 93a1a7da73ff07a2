/*-------------------------------------------------------------------------
 * escrow.h
 *	  Escrow slots: how a contended aggregate takes usage without one row lock.
 *-------------------------------------------------------------------------
 */
#ifndef UB_ESCROW_H
#define UB_ESCROW_H

#include "datatype/timestamp.h"
#include "access/skey.h"
#include "executor/spi.h"
#include "utils/numeric.h"
#include "utils/relcache.h"
#include "utils/snapshot.h"

#include "catalog.h"

/* usage_billing.hot_key_slots */
typedef enum UbSlotMode
{
	UB_SLOTS_OFF,
	UB_SLOTS_AUTO,				/* a key whose row this backend waited for a few times */
	UB_SLOTS_ALWAYS				/* every sum and count key (tests) */
} UbSlotMode;

extern int	ub_hot_key_slots;
extern int	ub_escrow_fold_idle;	/* usage_billing.escrow_fold_idle, seconds */

extern void ub_escrow_init(void);

/* A key's aggregate row and slots as one snapshot saw them (ub_escrow_read). */
typedef struct UbEscrowProbe
{
	bool		row_found;
	Numeric		row_total;		/* 0 when there is no row */
	Numeric		slots_total;	/* every slot's total */
	Numeric		others_total;	/* every slot's total but this backend's */
	Numeric		escrowed;		/* every slot's total and budget; NULL when one has no limit */
	bool		unbounded;		/* a slot has a budget without limit */
	Numeric		reserved;		/* the row's holds (reservations.c) */
	bool		own_found;		/* this backend has a slot */
	Numeric		own_budget;		/* its budget, NULL without limit */
} UbEscrowProbe;

/* Waits on one key, seen by one backend, before that backend asks for a slot. */
#define UB_ESCROW_CONTENTIONS	3

/* A budget is this share of what is left before the next limit decision. */
#define UB_ESCROW_SHARES		16

extern bool ub_escrow_installed(void);
extern SPIPlanPtr ub_totals_plan(SPIPlanPtr *plans, const char *sql, int nargs, Oid *types);

extern uint64 ub_escrow_key_hash(const char *customer_id, const char *meter,
								 TimestampTz period_start);
extern bool ub_escrow_has_slot(uint64 key);
extern void ub_escrow_remember(uint64 key, bool has_slot);
extern void ub_escrow_note_contention(uint64 key);
extern bool ub_escrow_is_hot(uint64 key);

extern bool ub_escrow_spendable(const UbLimit *limit, const UbEscrowProbe *p);
extern bool ub_escrow_near(const UbLimit *limit, Numeric lower, Numeric upper);
extern bool ub_escrow_grant(const UbLimit *limit, Numeric lower, Numeric upper,
							Numeric *budget, Numeric *budget_limit);

/* escrow_store.c */
extern bool ub_escrow_read(const char *customer_id, const char *meter,
						   TimestampTz period_start, UbEscrowProbe *p);
extern Numeric ub_escrow_fold_locked(const char *customer_id, const char *meter,
									 TimestampTz period_start);
extern void ub_escrow_give(const char *customer_id, const char *meter,
						   TimestampTz period_start, Numeric floor_total, Numeric budget,
						   Numeric budget_limit);
extern Numeric ub_escrow_fold_key(const char *customer_id, const char *meter,
								  TimestampTz period_start);
extern int64 ub_escrow_fold_all(const char *customer_id, int idle_seconds);
extern void ub_key_scankeys(Relation index, Datum customer, Datum meter,
							TimestampTz period_start, ScanKeyData *keys);
extern void ub_escrow_slot_sum(Relation slots, Relation pkey, Datum customer, Datum meter,
							   TimestampTz period_start, Snapshot snapshot, Numeric *total,
							   int64 *event_count);

/* A row-path statement that took longer than this (microseconds) most likely waited for the row's lock. */
#define UB_ESCROW_WAIT_USEC		500

/* Default of usage_billing.escrow_fold_idle: the export worker folds the slots of keys nobody wrote for this long. */
#define UB_ESCROW_IDLE_SECONDS	60

#endif							/* UB_ESCROW_H */
