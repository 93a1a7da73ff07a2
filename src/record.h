/*-------------------------------------------------------------------------
 * record.h
 *	  Recording usage events: the hot path behind increment_usage.
 *-------------------------------------------------------------------------
 */
#ifndef UB_RECORD_H
#define UB_RECORD_H

#include "datatype/timestamp.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

/* One usage event as the caller gave it; NULL pointers are SQL NULLs. */
typedef struct UbEventInput
{
	const char *customer_id;
	const char *meter;
	Numeric		amount;
	const char *idempotency_key;
	bool		occurred_at_null;
	TimestampTz occurred_at;
	Jsonb	   *properties;
} UbEventInput;

/* What increment_usage returns. */
typedef struct UbRecordResult
{
	Numeric		total;
	Numeric		included;		/* NULL = unlimited */
	Numeric		remaining;		/* NULL = unlimited */
	const char *status;
	bool		duplicate;
	TimestampTz period_start;
	TimestampTz period_end;
} UbRecordResult;

/* Must run between SPI_connect and SPI_finish. */
extern void ub_record_event(const UbEventInput *in, UbRecordResult *out);

#endif							/* UB_RECORD_H */
