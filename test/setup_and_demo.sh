#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps
# test/setup_and_demo.sh: quick start, command 1.
#
# Installs what is missing (Debian bookworm, as root: the packages of UB_PACKAGES in
# test/common.sh), builds usage_billing in a copy of this tree (the clone is only read) and
# installs it into the PostgreSQL of PG_CONFIG (the system's PostgreSQL 15 by default), starts a
# throwaway PostgreSQL 15 cluster in a temp dir (unix socket only) with the extension preloaded,
# starts the mock Stripe (test/mock_stripe.py) when it is there, loads the worked example
# (test/demo.sql), prints the January usage summary and invoice preview (expected total 478.50),
# exports to the mock and prints what "Stripe" received.  Everything is removed on exit.
#
# Environment:
#   PG_CONFIG                  build against / install into this PostgreSQL (default: system 15)
#   UB_SKIP_INSTALL=1          do not run make install (already installed)
#   UB_KEEP_TMP=1              keep the temp dir (cluster, logs) for a look afterwards
#   UB_DEMO_EXPORT_TIMEOUT     seconds to wait for the mock's totals (default 60)
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=test/common.sh
. test/common.sh

EXPECTED_TOTAL=478.50
EXPORT_TIMEOUT=${UB_DEMO_EXPORT_TIMEOUT:-60}
TMP=""
MOCK_PID=""
BUILD=""

cleanup() {
    local rc=$?
    set +e
    if [ -n "$TMP" ]; then
        if [ "$rc" -ne 0 ] && [ -f "$TMP/server.log" ]; then
            echo "--- last lines of the server log ($TMP/server.log)" >&2
            tail -n 30 "$TMP/server.log" >&2
        fi
        ub_pg_stop "$TMP"
    fi
    if [ -n "$MOCK_PID" ]; then
        kill "$MOCK_PID" 2>/dev/null
        wait "$MOCK_PID" 2>/dev/null
    fi
    if [ -n "$BUILD" ]; then rm -rf "$BUILD"; fi
    if [ -n "$TMP" ]; then
        if [ "${UB_KEEP_TMP:-0}" = 1 ]; then
            echo "kept $TMP (UB_KEEP_TMP=1)"
        else
            rm -rf "$TMP"
        fi
    fi
    if [ "$rc" -ne 0 ]; then
        echo "setup_and_demo.sh: FAILED (exit $rc)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. packages, build, install ---------------------------------------------------------------
ub_log "setup_and_demo.sh installs usage_billing into the PostgreSQL of ${PG_CONFIG:-the system (/usr/lib/postgresql/15)}"
ub_log "and, with apt-get, those of these packages that are missing: ${UB_PACKAGES[*]}"
ub_ensure_packages "${UB_PACKAGES[@]}"
ub_find_pg
BUILD=$(ub_make_build_copy usage_billing_build)
ub_build_and_install "$BUILD"

# --- 2. throwaway cluster ----------------------------------------------------------------------
TMP=$(ub_mktemp_pg usage_billing_demo)
PORT=$((54000 + RANDOM % 1000))
ub_log "throwaway cluster in $TMP (unix socket only, port $PORT)"
ub_initdb "$TMP"

# The mock Stripe, when the export side of the project has delivered it.
MOCK_URL=""
if [ -f test/mock_stripe.py ]; then
    python3 test/mock_stripe.py --port 0 --port-file "$TMP/mock.port" --key sk_test_demo >"$TMP/mock.log" 2>&1 &
    MOCK_PID=$!
    for _ in $(seq 1 100); do
        if [ -s "$TMP/mock.port" ] || ! kill -0 "$MOCK_PID" 2>/dev/null; then break; fi
        sleep 0.1
    done
    if [ -s "$TMP/mock.port" ]; then
        MOCK_URL="http://127.0.0.1:$(tr -dc '0-9' <"$TMP/mock.port")"
        ub_log "mock Stripe listening on $MOCK_URL"
    else
        cat "$TMP/mock.log" >&2 || true
        ub_die "test/mock_stripe.py did not write its port file within 10 s"
    fi
else
    ub_warn "test/mock_stripe.py is not there yet: the demo runs without the Stripe export"
fi

ub_conf "$TMP" \
    "# usage_billing demo (throwaway)" \
    "listen_addresses = ''" \
    "port = $PORT" \
    "unix_socket_directories = '$TMP'" \
    "shared_preload_libraries = 'usage_billing'" \
    "timezone = 'UTC'" \
    "fsync = off" \
    "usage_billing.database = 'postgres'"
if [ -n "$MOCK_URL" ]; then
    ub_conf "$TMP" \
        "usage_billing.stripe_api_base = '$MOCK_URL'" \
        "usage_billing.stripe_api_key = 'sk_test_demo'" \
        "usage_billing.export_interval = 1"
fi
ub_pg_start "$TMP"

psql_demo() {
    ub_as_pg "$PGBIN/psql" -X -q -h "$TMP" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"
}
psql_val() {
    psql_demo -At -c "$1"
}

# --- 3. the worked example ---------------------------------------------------------------------
ub_log "loading the worked example (test/demo.sql)"
psql_demo -f - <test/demo.sql

total=$(psql_val "SELECT amount FROM usage_billing.preview_invoice('acme', '2025-01-15 00:00+00') WHERE line = 'total'")
if [ "$total" != "$EXPECTED_TOTAL" ]; then
    ub_die "January invoice total is '$total', expected $EXPECTED_TOTAL"
fi
ub_log "January 2025 invoice total: $total (as expected)"

# --- 4. export to the mock Stripe --------------------------------------------------------------
has_export_now=$(psql_val "SELECT to_regprocedure('usage_billing.export_now()') IS NOT NULL")
if [ -z "$MOCK_URL" ]; then
    ub_warn "skipping the Stripe export: no mock Stripe (test/mock_stripe.py) yet"
elif [ "$has_export_now" != t ]; then
    ub_warn "skipping the Stripe export: usage_billing.export_now() does not exist yet"
else
    ub_log "export_now(): waking the export worker, waiting up to ${EXPORT_TIMEOUT}s for the mock"
    # what the database holds per Stripe customer and event: all periods, and the current one
    # (aggregate_totals: a key's total includes its escrow slots)
    psql_val "
        SELECT c.stripe_customer_id, m.stripe_event_name, sum(floor(a.total)),
               coalesce(sum(floor(a.total)) FILTER (WHERE now() >= a.period_start AND now() < a.period_end), 0)
          FROM usage_billing.aggregate_totals a
          JOIN usage_billing.customers c USING (customer_id)
          JOIN usage_billing.meters m USING (meter)
         WHERE c.stripe_customer_id IS NOT NULL AND m.stripe_event_name IS NOT NULL
         GROUP BY 1, 2 ORDER BY 1, 2" | tr '|' '\t' >"$TMP/expected.tsv"
    psql_demo -c "SELECT usage_billing.export_now()" >/dev/null
    matched=no
    deadline=$((SECONDS + EXPORT_TIMEOUT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        rc=0
        python3 test/mock_totals.py "$MOCK_URL/_mock/totals" "$TMP/expected.tsv" 2>/dev/null || rc=$?
        if [ "$rc" -eq 0 ]; then matched=yes; break; fi
        if [ "$rc" -eq 3 ]; then matched=unknown; break; fi
        sleep 1
    done
    echo
    echo "--- what \"Stripe\" (the mock) received"
    python3 test/mock_totals.py "$MOCK_URL/_mock/totals" "$TMP/expected.tsv" --print || true
    if [ "$(psql_val "SELECT to_regclass('usage_billing.export_status') IS NOT NULL")" = t ]; then
        echo
        echo "--- usage_billing.export_status (Stripe accepts events of the past 35 days only: January 2025"
        echo "    cannot be sent any more and shows why; the current period's usage is exported)"
        psql_demo -c "SELECT customer_id, meter, period_start, total, exported, pending, attempts, last_error
                        FROM usage_billing.export_status ORDER BY 1, 2, 3"
    fi
    if [ "$matched" = unknown ]; then
        ub_warn "could not interpret the mock's /_mock/totals answer (printed above): compare by eye"
    elif [ "$matched" != yes ]; then
        ub_die "the mock Stripe's totals did not match the database within ${EXPORT_TIMEOUT}s (mock log: $TMP/mock.log; rerun with UB_KEEP_TMP=1 to keep it)"
    fi
    if [ "$matched" = yes ]; then
        ub_log "the mock Stripe's totals match the database"
    fi
fi

echo
ub_log "demo finished: usage_billing works on this machine"
