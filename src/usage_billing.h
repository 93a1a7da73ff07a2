/*-------------------------------------------------------------------------
 * usage_billing.h
 *	  The module entry point (usage_billing.c): nothing else includes it.
 *
 * Each subsystem defines its own settings next to their variables and
 * offers an init function; _PG_init calls them in order and owns the one
 * shared-memory hook chain.
 *-------------------------------------------------------------------------
 */
#ifndef USAGE_BILLING_H
#define USAGE_BILLING_H

extern void _PG_init(void);

#endif							/* USAGE_BILLING_H */
