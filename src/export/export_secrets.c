/*-------------------------------------------------------------------------
 * export_secrets.c
 *	  Keeping the Stripe API key out of everything we store or log.
 *
 * Vocabulary
 *   key        the secret in usage_billing.stripe_api_key (or read from
 *              usage_billing.stripe_api_key_file)
 *   key-shaped a token starting sk_live_, sk_test_, rk_live_ or rk_test_;
 *              Stripe's 401 answer quotes the key's last characters
 *   redact     overwrite in place with '*' (same length, no allocation, so
 *              it is safe inside an error report)
 *
 * Three users: Stripe error messages before they are stored in the outbox,
 * an emit_log_hook and a ProcessUtility_hook.  The log hook exists because
 * PostgreSQL itself logs 'parameter "usage_billing.stripe_api_key" changed
 * to "..."' when the key changes on reload, and log_statement logs ALTER
 * SYSTEM SET statements.  The utility hook exists because the text of the
 * last statement of a session stays in pg_stat_activity.query, readable by
 * members of pg_read_all_stats: a session that ran ALTER SYSTEM SET
 * usage_billing.stripe_api_key = '...' would show the key there for as long
 * as it stays connected.  The hook replaces that text with a copy whose
 * quoted literals are masked before the statement runs (PostgreSQL has
 * published the raw text for the few microseconds before the hook).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "pgstat.h"
#include "tcop/tcopprot.h"
#include "tcop/utility.h"
#include "utils/backend_status.h"
#include "utils/elog.h"
#include "utils/guc.h"

#include "stripe_client.h"

#define UB_KEY_GUC_CHANGED	"parameter \"usage_billing.stripe_api_key\" changed to \""

static emit_log_hook_type prev_emit_log_hook = NULL;
static ProcessUtility_hook_type prev_process_utility_hook = NULL;

static void ub_emit_log_hook(ErrorData *edata);
static bool ub_has_key_shape(const char *s);
static bool ub_names_key_setting(const char *s);
static void ub_process_utility(PlannedStmt *pstmt, const char *queryString,
							   bool readOnlyTree, ProcessUtilityContext context,
							   ParamListInfo params, QueryEnvironment *queryEnv,
							   DestReceiver *dest, QueryCompletion *qc);

/* True when s names the key setting (stripe_api_key, in any case). */
static bool
ub_names_key_setting(const char *s)
{
	static const char name[] = "stripe_api_key";

	for (; *s; s++)
		if (pg_strncasecmp(s, name, sizeof(name) - 1) == 0)
			return true;
	return false;
}

/* True when s holds a key-shaped token (cheap pre-check). */
static bool
ub_has_key_shape(const char *s)
{
	return s && (strstr(s, "sk_live_") || strstr(s, "sk_test_") ||
				 strstr(s, "rk_live_") || strstr(s, "rk_test_"));
}

/* Installs the log hook; called from _PG_init (in the postmaster when preloaded). */
void
ub_secrets_init(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = ub_emit_log_hook;
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = ub_process_utility;
}

/*
 * emit_log_hook: redacts the key from every log message (and from the
 * STATEMENT line, by hiding it) before it reaches the server log.
 */
static void
ub_emit_log_hook(ErrorData *edata)
{
	const char *key = GetConfigOption("usage_billing.stripe_api_key", true, false);

	if (edata->message &&
		strncmp(edata->message, UB_KEY_GUC_CHANGED, strlen(UB_KEY_GUC_CHANGED)) == 0)
	{
		char	   *v = edata->message + strlen(UB_KEY_GUC_CHANGED);
		size_t		n = strlen(v);

		if (n > 0 && v[n - 1] == '"')
			n--;
		memset(v, '*', n);
	}
	ub_redact_keys(edata->message, key);
	ub_redact_keys(edata->detail, key);
	ub_redact_keys(edata->detail_log, key);
	ub_redact_keys(edata->hint, key);
	ub_redact_keys(edata->context, key);
	ub_redact_keys(edata->internalquery, key);
	if (debug_query_string &&
		(ub_has_key_shape(debug_query_string) ||
		 (key && strlen(key) >= 4 && strstr(debug_query_string, key))))
		edata->hide_stmt = true;

	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/*
 * ProcessUtility_hook: a top-level utility statement whose text names
 * usage_billing.stripe_api_key or holds a key-shaped token (ALTER SYSTEM SET,
 * SET, ...) is shown in pg_stat_activity with every quoted literal masked, so
 * that the key does not stay there after the statement.  Everything else
 * passes untouched.
 */
static void
ub_process_utility(PlannedStmt *pstmt, const char *queryString,
				   bool readOnlyTree, ProcessUtilityContext context,
				   ParamListInfo params, QueryEnvironment *queryEnv,
				   DestReceiver *dest, QueryCompletion *qc)
{
	if (context == PROCESS_UTILITY_TOPLEVEL && queryString != NULL &&
		pgstat_track_activities &&
		(ub_has_key_shape(queryString) || ub_names_key_setting(queryString)))
	{
		char	   *masked = pstrdup(queryString);
		bool		quoted = false;

		for (char *p = masked; *p; p++)
		{
			if (*p == '\'')
				quoted = !quoted;	/* '' inside a literal toggles twice: still masked */
			else if (quoted)
				*p = '*';
		}
		ub_redact_keys(masked, NULL);	/* key-shaped tokens outside quotes too */
		pgstat_report_activity(STATE_RUNNING, masked);
		pfree(masked);
	}

	if (prev_process_utility_hook)
		prev_process_utility_hook(pstmt, queryString, readOnlyTree, context,
								  params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}
