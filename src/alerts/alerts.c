/*-------------------------------------------------------------------------
 * alerts.c
 *	  Usage alerts: soft-threshold and limit crossings, hard-cap refusals.
 *
 * Vocabulary
 *	 alert		one row per (customer, meter, period, kind) in alert_log, read
 *				through the view usage_billing.alerts
 *	 kind		'soft_limit': the total first reached soft_threshold * included;
 *				'limit_reached': the total first passed included;
 *				'hard_cap_blocked': increment_usage refused a call with PT402
 *	 crossing	previous_total < threshold <= total (for limit_reached:
 *				previous_total <= included < total); previous_total NULL (the
 *				period's first event) counts as below every threshold
 *	 pending	a hard_cap_blocked alert waiting in the queue to be flushed
 *	 flush		inserting pending alerts into alert_log, in some transaction
 *				that can write
 *	 claim		a pending alert that one transaction is flushing: no other
 *				flusher takes it until that transaction ends
 *
 * The notification payload is {"customer_id", "meter", "period_start",
 * "kind", "value", "included"} with period_start in UTC ("...Z"), whatever
 * the session's TimeZone.
 *
 * Crossings are decided in C from the previous and new total that the hot
 * path already has: a call that crosses nothing runs no SQL at all.  A
 * crossing inserts the alert with ON CONFLICT DO NOTHING on its key and
 * notifies 'usage_billing_alerts' only for a row actually inserted, in one
 * statement, in the caller's transaction: a rolled-back call leaves neither
 * row nor notification, and because callers on the same aggregate row are
 * serialized by its row lock (and alerts by the key), a crossing is never
 * reported twice, also after a correction lowered the total again.
 *
 * A hard-cap refusal aborts its own transaction, and PostgreSQL has no
 * autonomous transactions, so the refusal is put in a small queue that
 * outlives the abort:
 *	 - preloaded (shared_preload_libraries): a fixed array of UB_ALERT_ENTRIES
 *	   entries in shared memory, under one LWLock, keyed by database, customer,
 *	   meter and period.  A key already queued (pending, or flushed recently)
 *	   is not queued again, so a burst of refusals costs one entry.  Flushed
 *	   entries stay as that dedupe cache until a new key needs their entry.
 *	 - not preloaded: the same array in backend-local memory; then only the
 *	   refused backend itself sees and flushes its alerts.
 * The queue is flushed by the next successful increment_usage on a limited
 * meter (in any backend of the same database), by usage_billing.flush_alerts()
 * (the export worker calls it each cycle) and by acknowledge_alert().  An
 * entry is marked flushed only when the flushing transaction commits (a
 * transaction callback), so a flusher that rolls back loses nothing.  A
 * flusher claims the entries it inserts, so two flushers never insert the same
 * alert: a flush never waits for another transaction, and so can never close
 * a deadlock with the row or escrow-slot locks its caller holds.
 * usage_billing.alerts also shows pending alerts, so a refusal is visible at
 * once.
 *
 * Limits: pending alerts are lost if the server stops or crashes before a
 * flush; when all entries are pending, further refusals are not queued
 * (counted in "dropped"); without preloading they are lost when the refused
 * session ends before it writes again.  A hard_cap_blocked notification is
 * sent when the alert is flushed, not when the call is refused.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "alerts.h"
#include "num.h"
#include "errors.h"

PG_FUNCTION_INFO_V1(ub_flush_alerts);
PG_FUNCTION_INFO_V1(ub_pending_alerts);

#define UB_ALERT_ENTRIES		256
#define UB_ALERT_NUM_LEN	64
#define UB_FLUSH_BATCH		8

typedef enum UbEntryState
{
	ENTRY_FREE = 0,
	ENTRY_PENDING,
	ENTRY_CLAIMED,				/* being flushed by a transaction in progress */
	ENTRY_FLUSHED
} UbEntryState;

/* One queued hard_cap_blocked alert; numbers as text, "" = NULL. */
typedef struct UbAlertEntry
{
	UbEntryState state;
	uint64		generation;		/* tells a reused entry from the one we flushed */
	Oid			dboid;
	TimestampTz period_start;
	TimestampTz created_at;
	char		customer_id[UB_MAX_NAME_LEN + 1];
	char		meter[UB_MAX_NAME_LEN + 1];
	char		value[UB_ALERT_NUM_LEN];
	char		included[UB_ALERT_NUM_LEN];
} UbAlertEntry;

typedef struct UbAlertQueue
{
	LWLock	   *lock;			/* NULL for the backend-local queue */
	pg_atomic_uint32 npending;	/* read without the lock on the hot path */
	uint64		next_generation;
	uint64		dropped;
	UbAlertEntry entries[UB_ALERT_ENTRIES];
} UbAlertQueue;

/* An entry this transaction flushed, to mark when it commits. */
typedef struct FlushedEntry
{
	int			entry;
	uint64		generation;
	SubTransactionId subid;
} FlushedEntry;

static UbAlertQueue *shared_queue = NULL;
static UbAlertQueue *local_queue = NULL;
static FlushedEntry flushed[UB_ALERT_ENTRIES];
static int	nflushed = 0;
static bool callbacks_registered = false;
static SPIPlanPtr alert_insert_plan = NULL;

static UbAlertQueue *get_queue(void);
static void queue_lock(UbAlertQueue *q, LWLockMode mode);
static void queue_unlock(UbAlertQueue *q);
static bool insert_alert(const char *customer_id, const char *meter, TimestampTz period_start,
						 const char *kind, Numeric value, Numeric included, TimestampTz created_at);
static int	flush_pending(void);
static void alerts_xact_callback(XactEvent event, void *arg);
static void alerts_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									SubTransactionId parentSubid, void *arg);

/* Asks for the queue's shared memory and lock; from the module's shmem_request_hook. */
void
ub_alerts_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(UbAlertQueue)));
	RequestNamedLWLockTranche("usage_billing_alerts", 1);
}

/*
 * Creates or attaches to the shared queue; from the module's
 * shmem_startup_hook, which holds AddinShmemInitLock.
 */
void
ub_alerts_shmem_startup(void)
{
	bool		found;

	shared_queue = ShmemInitStruct("usage_billing alert queue", sizeof(UbAlertQueue), &found);
	if (!found)
	{
		memset(shared_queue, 0, sizeof(UbAlertQueue));
		shared_queue->lock = &(GetNamedLWLockTranche("usage_billing_alerts"))->lock;
		pg_atomic_init_u32(&shared_queue->npending, 0);
	}
}

/* The shared queue, or this backend's own when not preloaded. */
static UbAlertQueue *
get_queue(void)
{
	if (shared_queue != NULL)
		return shared_queue;
	if (local_queue == NULL)
	{
		local_queue = MemoryContextAllocZero(TopMemoryContext, sizeof(UbAlertQueue));
		pg_atomic_init_u32(&local_queue->npending, 0);
	}
	return local_queue;
}

/* Takes the queue lock (no-op for the local queue). */
static void
queue_lock(UbAlertQueue *q, LWLockMode mode)
{
	if (q->lock != NULL)
		LWLockAcquire(q->lock, mode);
}

/* Releases the queue lock. */
static void
queue_unlock(UbAlertQueue *q)
{
	if (q->lock != NULL)
		LWLockRelease(q->lock);
}

/* Numeric as text for an entry; "" when NULL or too long to keep. */
static void
numeric_to_entry(Numeric n, char *buf)
{
	char	   *s;

	buf[0] = '\0';
	if (n == NULL)
		return;
	s = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(n)));
	if (strlen(s) < UB_ALERT_NUM_LEN)
		strlcpy(buf, s, UB_ALERT_NUM_LEN);
}

/* Entry text back to a numeric Datum; isnull for "". */
static Datum
entry_to_numeric(const char *buf, bool *isnull)
{
	*isnull = (buf[0] == '\0');
	if (*isnull)
		return (Datum) 0;
	return DirectFunctionCall3(numeric_in, CStringGetDatum(buf),
							   ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
}

/*
 * Inserts one alert unless its key exists, and notifies it if inserted; in
 * the caller's SPI connection and transaction.  Returns whether it was new.
 */
static bool
insert_alert(const char *customer_id, const char *meter, TimestampTz period_start,
			 const char *kind, Numeric value, Numeric included, TimestampTz created_at)
{
	Datum		args[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			ret;

	if (alert_insert_plan == NULL)
	{
		Oid			types[7] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID,
		NUMERICOID, NUMERICOID, TIMESTAMPTZOID};
		SPIPlanPtr	plan;

		plan = SPI_prepare(
			"WITH ins AS ("
			"  INSERT INTO usage_billing.alert_log AS l"
			"         (customer_id, meter, period_start, kind, value, included, created_at)"
			"  VALUES ($1, $2, $3, $4, $5, $6, $7)"
			"  ON CONFLICT (customer_id, meter, period_start, kind) DO NOTHING"
			"  RETURNING l.customer_id, l.meter, l.period_start, l.kind, l.value, l.included)"
			" SELECT pg_catalog.pg_notify('usage_billing_alerts',"
			"          pg_catalog.json_build_object('customer_id', customer_id, 'meter', meter,"
			"            'period_start', (pg_catalog.to_json(period_start AT TIME ZONE 'UTC') #>> '{}') || 'Z',"
			"            'kind', kind,"
			"            'value', value, 'included', included)::text)"
			"   FROM ins", 7, types);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed");
		alert_insert_plan = plan;
	}
	args[0] = CStringGetTextDatum(customer_id);
	args[1] = CStringGetTextDatum(meter);
	args[2] = TimestampTzGetDatum(period_start);
	args[3] = CStringGetTextDatum(kind);
	args[4] = value ? NumericGetDatum(value) : (Datum) 0;
	nulls[4] = value ? ' ' : 'n';
	args[5] = included ? NumericGetDatum(included) : (Datum) 0;
	nulls[5] = included ? ' ' : 'n';
	args[6] = TimestampTzGetDatum(created_at);
	ret = SPI_execute_plan(alert_insert_plan, args, nulls, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "alert insert failed: %s", SPI_result_code_string(ret));
	return SPI_processed > 0;
}

/* Decides crossings in C; only a crossing runs SQL.  See the file header. */
void
ub_alerts_after_record(const UbCustomer *customer, const UbMeter *meter,
					   const UbLimit *limit, TimestampTz period_start,
					   Numeric previous_total, Numeric total)
{
	Numeric		included = limit->included;
	TimestampTz now = GetCurrentTransactionStartTimestamp();

	if (included == NULL)
		return;

	/* as ub_usage_status: included 0 never warns */
	if (limit->soft_threshold != NULL && ub_num_cmp(included, ub_num_zero()) > 0)
	{
		Numeric		threshold = ub_num_mul(limit->soft_threshold, included);

		if (ub_num_cmp(total, threshold) >= 0 &&
			(previous_total == NULL || ub_num_cmp(previous_total, threshold) < 0))
			insert_alert(customer->customer_id, meter->meter, period_start,
						 "soft_limit", total, included, now);
	}

	if (ub_num_cmp(total, included) > 0 &&
		(previous_total == NULL || ub_num_cmp(previous_total, included) <= 0))
		insert_alert(customer->customer_id, meter->meter, period_start,
					 "limit_reached", total, included, now);

	/* a write succeeded: a good moment to record pending refusals */
	flush_pending();
}

/* Queues a refusal, once per key; runs no SQL because the caller is about to fail. */
void
ub_alerts_hard_cap_blocked(const UbCustomer *customer, const UbMeter *meter,
						   const UbLimit *limit, TimestampTz period_start,
						   Numeric attempted_total)
{
	UbAlertQueue *q = get_queue();
	char		value[UB_ALERT_NUM_LEN];
	char		included[UB_ALERT_NUM_LEN];
	int			free_entry = -1;
	int			oldest_flushed = -1;
	int			entry;

	/* format outside the lock: numeric_out allocates and may fail */
	numeric_to_entry(attempted_total, value);
	numeric_to_entry(limit->included, included);

	queue_lock(q, LW_EXCLUSIVE);
	for (int i = 0; i < UB_ALERT_ENTRIES; i++)
	{
		UbAlertEntry *s = &q->entries[i];

		if (s->state == ENTRY_FREE)
		{
			if (free_entry < 0)
				free_entry = i;
			continue;
		}
		if (s->dboid == MyDatabaseId && s->period_start == period_start &&
			strcmp(s->customer_id, customer->customer_id) == 0 &&
			strcmp(s->meter, meter->meter) == 0)
		{
			queue_unlock(q);
			return;
		}
		if (s->state == ENTRY_FLUSHED &&
			(oldest_flushed < 0 || s->generation < q->entries[oldest_flushed].generation))
			oldest_flushed = i;
	}
	entry = free_entry >= 0 ? free_entry : oldest_flushed;
	if (entry < 0)
	{
		uint64		dropped = ++q->dropped;

		queue_unlock(q);
		ereport(LOG,
				(errmsg("usage_billing alert queue is full, hard_cap_blocked alert not recorded"),
				 errdetail("Customer \"%s\", meter \"%s\"; %llu alerts dropped since the server started.",
						   customer->customer_id, meter->meter, (unsigned long long) dropped),
				 errhint("Call usage_billing.flush_alerts() more often, for example by running the export worker.")));
		return;
	}

	q->entries[entry].state = ENTRY_PENDING;
	q->entries[entry].generation = ++q->next_generation;
	q->entries[entry].dboid = MyDatabaseId;
	q->entries[entry].period_start = period_start;
	q->entries[entry].created_at = GetCurrentTimestamp();
	strlcpy(q->entries[entry].customer_id, customer->customer_id, sizeof(q->entries[entry].customer_id));
	strlcpy(q->entries[entry].meter, meter->meter, sizeof(q->entries[entry].meter));
	memcpy(q->entries[entry].value, value, UB_ALERT_NUM_LEN);
	memcpy(q->entries[entry].included, included, UB_ALERT_NUM_LEN);
	pg_atomic_fetch_add_u32(&q->npending, 1);
	queue_unlock(q);
}

/*
 * Inserts this database's pending refusals into alert_log, a few at a time
 * so the hot path never allocates much; the entries are marked flushed when
 * this transaction commits.  Must run inside SPI.
 */
static int
flush_pending(void)
{
	UbAlertQueue *q = get_queue();
	UbAlertEntry copy[UB_FLUSH_BATCH];
	int			inserted = 0;
	int			n;

	if (pg_atomic_read_u32(&q->npending) == 0)
		return 0;

	do
	{
		n = 0;
		if (nflushed + UB_FLUSH_BATCH > UB_ALERT_ENTRIES)
			break;
		queue_lock(q, LW_EXCLUSIVE);
		for (int i = 0; i < UB_ALERT_ENTRIES && n < UB_FLUSH_BATCH; i++)
		{
			if (q->entries[i].state != ENTRY_PENDING || q->entries[i].dboid != MyDatabaseId)
				continue;
			/* ours until this transaction ends: no other flusher waits on our insert */
			q->entries[i].state = ENTRY_CLAIMED;
			copy[n] = q->entries[i];
			flushed[nflushed].entry = i;
			flushed[nflushed].generation = q->entries[i].generation;
			flushed[nflushed].subid = GetCurrentSubTransactionId();
			nflushed++;
			n++;
		}
		queue_unlock(q);

		if (n > 0 && !callbacks_registered)
		{
			RegisterXactCallback(alerts_xact_callback, NULL);
			RegisterSubXactCallback(alerts_subxact_callback, NULL);
			callbacks_registered = true;
		}

		for (int i = 0; i < n; i++)
		{
			bool		vnull,
						inull;
			Datum		value = entry_to_numeric(copy[i].value, &vnull);
			Datum		included = entry_to_numeric(copy[i].included, &inull);

			if (insert_alert(copy[i].customer_id, copy[i].meter, copy[i].period_start,
							 "hard_cap_blocked",
							 vnull ? NULL : DatumGetNumeric(value),
							 inull ? NULL : DatumGetNumeric(included),
							 copy[i].created_at))
				inserted++;
		}
	} while (n == UB_FLUSH_BATCH);
	return inserted;
}

/* Gives the claimed entries of flushed[from..] back to the queue as pending. */
static void
release_claims(int from)
{
	UbAlertQueue *q = get_queue();

	queue_lock(q, LW_EXCLUSIVE);
	for (int j = from; j < nflushed; j++)
	{
		UbAlertEntry *s = &q->entries[flushed[j].entry];

		if (s->state == ENTRY_CLAIMED && s->generation == flushed[j].generation)
			s->state = ENTRY_PENDING;
	}
	queue_unlock(q);
}

/* At commit the flushed entries are done; at abort they are pending again for the next flusher. */
static void
alerts_xact_callback(XactEvent event, void *arg)
{
	UbAlertQueue *q;

	if (nflushed == 0)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
	{
		q = get_queue();
		queue_lock(q, LW_EXCLUSIVE);
		for (int j = 0; j < nflushed; j++)
		{
			UbAlertEntry *s = &q->entries[flushed[j].entry];

			if (s->state == ENTRY_CLAIMED && s->generation == flushed[j].generation)
			{
				s->state = ENTRY_FLUSHED;
				pg_atomic_fetch_sub_u32(&q->npending, 1);
			}
		}
		queue_unlock(q);
		nflushed = 0;
	}
	else if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
			 event == XACT_EVENT_PREPARE)
	{
		release_claims(0);
		nflushed = 0;
	}
}

/* A rolled-back subtransaction undid the inserts of the flushes made inside it. */
static void
alerts_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	static FlushedEntry undone[UB_ALERT_ENTRIES];
	int			kept = 0;
	int			nundone = 0;

	if (event != SUBXACT_EVENT_ABORT_SUB)
		return;
	/* subtransaction ids only grow: ids >= mySubid are it and its children */
	for (int j = 0; j < nflushed; j++)
	{
		if (flushed[j].subid < mySubid)
			flushed[kept++] = flushed[j];
		else
			undone[nundone++] = flushed[j];
	}
	memcpy(&flushed[kept], undone, sizeof(FlushedEntry) * nundone);
	release_claims(kept);
	nflushed = kept;
}

/* SQL: flush_alerts() records pending hard_cap_blocked alerts; the export worker calls it. */
Datum
ub_flush_alerts(PG_FUNCTION_ARGS)
{
	int			inserted;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	inserted = flush_pending();
	SPI_finish();
	PG_RETURN_INT32(inserted);
}

/* SQL: pending_alerts() shows queued refusals of this database, for the alerts view. */
Datum
ub_pending_alerts(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	UbAlertQueue *q = get_queue();
	UbAlertEntry *copy;
	int			n = 0;

	InitMaterializedSRF(fcinfo, 0);
	if (pg_atomic_read_u32(&q->npending) == 0)
		return (Datum) 0;

	copy = palloc(sizeof(UbAlertEntry) * UB_ALERT_ENTRIES);
	queue_lock(q, LW_SHARED);
	for (int i = 0; i < UB_ALERT_ENTRIES; i++)
		if ((q->entries[i].state == ENTRY_PENDING || q->entries[i].state == ENTRY_CLAIMED) &&
			q->entries[i].dboid == MyDatabaseId)
			copy[n++] = q->entries[i];
	queue_unlock(q);

	for (int i = 0; i < n; i++)
	{
		Datum		values[7];
		bool		nulls[7] = {false, false, false, false, false, false, false};

		values[0] = CStringGetTextDatum(copy[i].customer_id);
		values[1] = CStringGetTextDatum(copy[i].meter);
		values[2] = TimestampTzGetDatum(copy[i].period_start);
		values[3] = CStringGetTextDatum("hard_cap_blocked");
		values[4] = entry_to_numeric(copy[i].value, &nulls[4]);
		values[5] = entry_to_numeric(copy[i].included, &nulls[5]);
		values[6] = TimestampTzGetDatum(copy[i].created_at);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	pfree(copy);
	return (Datum) 0;
}

/*
 * From the export worker, once per cycle: calls usage_billing.flush_alerts()
 * in a subtransaction of the caller's: hard_cap_blocked alerts queued by refused calls reach
 * alert_log without waiting for another increment.  An error is reported as
 * a warning and rolled back alone; a database whose extension predates the
 * function is skipped.
 */
void
ub_alerts_flush_in_worker(void)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		bool		isnull;
		bool		exists;

		SPI_connect();
		if (SPI_execute("SELECT to_regprocedure('usage_billing.flush_alerts()') IS NOT NULL",
						true, 1) != SPI_OK_SELECT)
			elog(ERROR, "SPI failed while looking for usage_billing.flush_alerts()");
		exists = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		if (exists && SPI_execute("SELECT usage_billing.flush_alerts()", false, 1) != SPI_OK_SELECT)
			elog(ERROR, "SPI failed while flushing alerts");
		SPI_finish();
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("usage_billing export worker could not flush alerts: %s", edata->message),
				 errdetail("The export cycle goes on; the alerts stay queued for the next flush.")));
		FreeErrorData(edata);
	}
	PG_END_TRY();
}
