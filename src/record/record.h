/*-------------------------------------------------------------------------
 * record.h
 *	  Recording usage events: the hot path behind increment_usage
 *	  (record.c, record_prepare.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_RECORD_H
#define UB_RECORD_H

#include "datatype/timestamp.h"
#include "nodes/execnodes.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "catalog.h"

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

/* An event checked and resolved, ready to be written. */
typedef struct UbPreparedEvent
{
	UbCustomer	customer;
	UbMeter		meter;
	UbLimit		limit;
	char	   *unique_value;	/* unique_count: the property's value */
	TimestampTz period_start;
	TimestampTz period_end;
} UbPreparedEvent;

/* All of these must run between SPI_connect and SPI_finish. */
extern void ub_record_event(const UbEventInput *in, UbRecordResult *out);
extern void ub_put_record_result(ReturnSetInfo *rsinfo, const UbRecordResult *out,
								 MemoryContext caller_cxt);
extern bool ub_prepare_event(const UbEventInput *in, UbPreparedEvent *pe, UbRecordResult *dup);
extern void ub_settle_aggregate(const UbEventInput *in, const UbPreparedEvent *pe, bool slotted,
								Numeric *total, Numeric *previous_total);
extern bool ub_lookup_duplicate_of(const UbEventInput *in, UbRecordResult *out);
extern char *ub_event_differences(const UbEventInput *in, const char *meter, Numeric amount,
								  TimestampTz occurred_at, Jsonb *properties, const char *earlier);
extern bool ub_check_amount_limits(const char *field, const char *meter_name, const UbMeter *meter,
								   Numeric value, Numeric *normalized, char **message,
								   char **detail, char **hint);
extern void ub_finish_aggregate(const UbEventInput *in, const UbPreparedEvent *pe,
								Numeric previous_total, Numeric total, Numeric contribution);

/* the input rules' settings (record_prepare.c) */
extern int	ub_late_event_grace_seconds;	/* after a period's end; -1 = any past period */
extern int	ub_late_event_action;
extern int	ub_max_future_skew_seconds; /* how far ahead of now() occurred_at may be */

/* the defaults: Stripe's own windows (35 days back, 5 minutes ahead) */
#define UB_DEFAULT_LATE_EVENT_GRACE	(35 * 86400)
#define UB_DEFAULT_MAX_FUTURE_SKEW	300

#define UB_LATE_REJECT				0
#define UB_LATE_CURRENT_PERIOD		1

extern void ub_input_init(void);

#endif							/* UB_RECORD_H */
