/*-------------------------------------------------------------------------
 * errors.h
 *	  Our SQLSTATEs and the longest names we accept.
 *
 * PT402 and PT403 are PostgREST's way of choosing an HTTP status: a function
 * that raises SQLSTATE PTxyz makes PostgREST answer HTTP xyz.
 *-------------------------------------------------------------------------
 */
#ifndef UB_ERRORS_H
#define UB_ERRORS_H

#include "utils/elog.h"

/* SQLSTATE PT402: a hard cap would be exceeded (PostgREST answers HTTP 402) */
#define ERRCODE_UB_HARD_CAP			MAKE_SQLSTATE('P','T','4','0','2')
/* SQLSTATE PT403: the customer is not active (PostgREST answers HTTP 403) */
#define ERRCODE_UB_NOT_ACTIVE		MAKE_SQLSTATE('P','T','4','0','3')

/* longest customer id, meter, plan or idempotency key we accept */
#define UB_MAX_NAME_LEN				200
#define UB_MAX_KEY_LEN				255

#endif							/* UB_ERRORS_H */
