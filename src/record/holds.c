/*-------------------------------------------------------------------------
 * holds.c
 *	  The holds of reservations, as the recording paths and check_limit
 *	  count them.
 *
 * Vocabulary (reservations.c has the whole story)
 *	 hold		a reservations row with status 'held' whose expires_at has
 *				not passed; it counts against the hard cap of its key
 *	 reserved	usage_aggregates.reserved, the sum of the key's held amounts,
 *				changed only under the aggregate row's lock
 *	 expire		ending the holds past their expires_at and taking them out of
 *				reserved, when a decision needs the room
 *
 * Below the recording paths: record.c, batch_sql.c and reservations.c call
 * it, it calls none of them.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "holds.h"
#include "num.h"
#include "relations.h"
#include "sql.h"

static Oid	key_types[3] = {TEXTOID, TEXTOID, TIMESTAMPTZOID};

/* Does this database's schema have reservations (version 1.4 on)? */
bool
ub_reservations_installed(void)
{
	return OidIsValid(ub_relations()->reservations);
}

/*
 * Under the aggregate row's lock: ends the key's holds that are past their
 * expires_at and takes them out of the row's reserved.  Inside SPI.
 * Returns the amount freed.
 */
Numeric
ub_reservations_expire(const char *customer_id, const char *meter, TimestampTz period_start)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[3];
	int			ret;

	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	ret = SPI_execute_plan(ub_prepare_once(&plan,
										   "WITH gone AS ("
										   "  UPDATE usage_billing.reservations"
										   "     SET status = 'expired', ended_at = pg_catalog.now()"
										   "   WHERE customer_id = $1 AND meter = $2 AND period_start = $3"
										   "     AND status = 'held' AND expires_at <= pg_catalog.now()"
										   "  RETURNING amount)"
										   " UPDATE usage_billing.usage_aggregates a"
										   "    SET reserved = a.reserved - g.amount"
										   "   FROM (SELECT coalesce(sum(amount), 0) AS amount FROM gone) g"
										   "  WHERE a.customer_id = $1 AND a.meter = $2 AND a.period_start = $3"
										   " RETURNING g.amount", 3, key_types),
						   args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "expiring reservations failed: %s", SPI_result_code_string(ret));
	return SPI_processed > 0 ? ub_col_numeric(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1) : ub_num_zero();
}

/* The live holds of a key (not past expires_at), for readers.  Inside SPI. */
Numeric
ub_reservations_live(const char *customer_id, const char *meter, TimestampTz period_start)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[3];

	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	if (SPI_execute_plan(ub_prepare_once(&plan,
										 "SELECT coalesce(sum(amount), 0) FROM usage_billing.reservations"
										 " WHERE customer_id = $1 AND meter = $2 AND period_start = $3"
										 "   AND status = 'held' AND expires_at > pg_catalog.now()",
										 3, key_types),
						 args, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "reading reservations failed");
	return ub_col_numeric(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
}
