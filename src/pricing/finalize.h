/*-------------------------------------------------------------------------
 * finalize.h
 *	  Finalized invoices (finalize.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_FINALIZE_H
#define UB_FINALIZE_H

#include "datatype/timestamp.h"

/* seconds after a period's end before finalize_invoices invoices it */
extern int	ub_invoice_grace_seconds;

extern void ub_invoice_init(void);
extern bool ub_period_invoiced(const char *customer_id, TimestampTz period_start);
extern void ub_finalize_invoices_in_worker(void);

#endif							/* UB_FINALIZE_H */
