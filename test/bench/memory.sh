#!/usr/bin/env bash
# test/bench/memory.sh: does a backend's memory stay flat over 1,000,000 increments?
#
# Starts a throwaway cluster, then one session records 1,000,000 events with increment_usage
# (10 statements of 100,000 calls each, spread over 10,000 customers, every tenth call with an
# idempotency key, a hot customer every fifth call) and 10 batches of 10,000 events with
# increment_usage_batch, reading its own /proc status after each statement.  RssAnon is the
# backend's private memory (palloc and malloc); VmRSS also counts the shared buffers the backend
# has touched, so it grows with the data and is shown for reference only.  Prints a table and
# the change of RssAnon between the second sample (after the first 100,000 calls, which warm the
# per-backend caches) and the last.  contexts_kb is what palloc holds (pg_backend_memory_contexts)
# when the sample is taken: RssAnon can keep a high-water mark of memory a statement used and
# freed (100,000 calls in one transaction), contexts_kb shows whether anything stays allocated.
# Numbers, not a test.
set -euo pipefail
cd "$(dirname "$0")/../.."
. test/common.sh

CALLS=${MEMORY_CALLS:-100000}
ROUNDS=${MEMORY_ROUNDS:-10}
TMP=""
cleanup() {
    local rc=$?
    set +e
    [ -n "$TMP" ] && { ub_pg_stop "$TMP"; rm -rf "$TMP"; }
    exit "$rc"
}
trap cleanup EXIT

ub_find_pg
TMP=$(ub_mktemp_pg usage_billing_memory)
ub_initdb "$TMP"
ub_conf "$TMP" "listen_addresses = ''" "unix_socket_directories = '$TMP'" "port = 5432" \
    "shared_preload_libraries = 'usage_billing'" "usage_billing.export_interval = 0" \
    "shared_buffers = 256MB" "max_wal_size = 4GB" "synchronous_commit = off"
ub_pg_start "$TMP"
psql_pg() { ub_as_pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP" -d postgres "$@"; }

psql_pg -o /dev/null <<'SQL'
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_meter('api_calls', 'sum');
SELECT usage_billing.create_plan('big', 0);
SELECT usage_billing.set_plan_limit('big', 'api_calls', included => 1e12, overage_price => 0.001);
SELECT usage_billing.upsert_customer('c' || g, 'big') FROM generate_series(1, 10000) g;
SQL

{
    echo "CREATE TEMP TABLE rss (round int, kind text, calls bigint, rss_anon_kb bigint, vm_rss_kb bigint, contexts_kb bigint);"
    echo "CREATE FUNCTION pg_temp.sample(r int, k text, n bigint) RETURNS void LANGUAGE sql AS \$\$
        INSERT INTO rss SELECT r, k, n,
               (regexp_match(s, 'RssAnon:\s+(\d+)'))[1]::bigint, (regexp_match(s, 'VmRSS:\s+(\d+)'))[1]::bigint,
               (SELECT sum(total_bytes) / 1024 FROM pg_backend_memory_contexts)
          FROM pg_read_file('/proc/' || pg_backend_pid() || '/status') s \$\$;"
    echo "SELECT pg_temp.sample(0, 'start', 0);"
    for r in $(seq 1 "$ROUNDS"); do
        echo "SELECT count(*) FROM generate_series(1, $CALLS) g,
              LATERAL usage_billing.increment_usage(CASE WHEN g % 5 = 0 THEN 'c1' ELSE 'c' || (g % 10000 + 1) END,
                                                    'api_calls', 1,
                                                    CASE WHEN g % 10 = 0 THEN 'r$r-' || g END) u;"
        echo "SELECT pg_temp.sample($r, 'increment_usage', $((r * CALLS)));"
    done
    for r in $(seq 1 "$ROUNDS"); do
        echo "SELECT sum(accepted) FROM generate_series(1, 100) b,
              LATERAL usage_billing.increment_usage_batch(
                  (SELECT jsonb_agg(jsonb_build_object('customer_id', 'c' || ((b * 100 + g) % 10000 + 1),
                                                       'meter', 'api_calls', 'amount', 2,
                                                       'idempotency_key', 'b$r-' || b || '-' || g))
                     FROM generate_series(1, 100) g)) x;"
        echo "SELECT pg_temp.sample($ROUNDS + $r, 'increment_usage_batch', $((r * 10000)));"
    done
    echo "\\o"
    echo "SELECT round, kind, calls, rss_anon_kb, vm_rss_kb, contexts_kb FROM rss ORDER BY round;"
    echo "SELECT round(100.0 * (max(rss_anon_kb) FILTER (WHERE round = $ROUNDS) - max(rss_anon_kb) FILTER (WHERE round = 2))
                   / max(rss_anon_kb) FILTER (WHERE round = 2), 1) AS increment_rss_anon_change_percent,
                 round(100.0 * (max(rss_anon_kb) FILTER (WHERE round = 2 * $ROUNDS) - max(rss_anon_kb) FILTER (WHERE round = $ROUNDS + 1))
                   / max(rss_anon_kb) FILTER (WHERE round = $ROUNDS + 1), 1) AS batch_rss_anon_change_percent,
                 round(100.0 * (max(contexts_kb) FILTER (WHERE round = 2 * $ROUNDS) - max(contexts_kb) FILTER (WHERE round = 2))
                   / max(contexts_kb) FILTER (WHERE round = 2), 1) AS contexts_change_percent
            FROM rss;"
} | psql_pg -o /dev/null
