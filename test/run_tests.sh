#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps
# test/run_tests.sh: quick start, command 2 -- runs every test; .ci/run runs exactly this.
#
# As root on Debian bookworm: installs the missing packages, builds with -Werror (Makefile),
# installs, hands the tree to the postgres user and runs, as postgres, the three stages of
# "make installcheck" one after the other, each on its own throwaway cluster:
#   regress     pg_regress --temp-instance, sql/*.sql against expected/*.out
#   isolation   pg_isolation_regress --temp-instance, test/isolation/specs/*.spec
#   tap         prove test/t/*.pl (PostgreSQL::Test::Cluster: worker, crashes, mock Stripe)
# Stages run separately so that one failing stage does not hide the others.  On failure the
# diffs and log tails are printed.  The last line is always "N passed, N failed" (CI reads it).
# Also works as postgres or any user who has the packages (no apt, no chown then).
#
# Environment:
#   PG_CONFIG          test against this PostgreSQL (default: the system's 15)
#   UB_SKIP_INSTALL=1  do not run make install
#   UB_TEST_BUDGET     seconds for the whole run, build included (default 780 = 13 minutes)
#   UB_FUZZ_SECONDS    time for test/fuzz/run.sh when it exists (default 60; 0 skips it)
#   UB_RUN_BENCH=1     also run test/bench/run.sh afterwards (numbers only, never a failure)
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=test/common.sh
. test/common.sh

BUDGET=${UB_TEST_BUDGET:-780}
START=$SECONDS
PASSED=0
FAILED=0
FAILED_STAGES=()
LOGDIR=""
WORK=$PWD
COPY=""

# Stops throwaway servers a killed stage left behind (pg_ctl starts them in their own session).
stop_leftover_servers() {
    local pidfile
    [ -n "${PGBIN:-}" ] || return 0
    while IFS= read -r pidfile; do
        ub_warn "stopping a server left behind in ${pidfile%/postmaster.pid}"
        ub_as_pg "$PGBIN/pg_ctl" -D "${pidfile%/postmaster.pid}" -m immediate -w -t 30 stop >/dev/null 2>&1
    done < <(find "$WORK" -path '*tmp_check*' -name postmaster.pid 2>/dev/null)
}

# Whatever happens, say how many passed and failed, on the last line.
finish() {
    local rc=$?
    set +e
    stop_leftover_servers
    if [ -n "$LOGDIR" ]; then rm -rf "$LOGDIR"; fi
    if [ -n "$COPY" ] && [ "$rc" -eq 0 ]; then rm -rf "$COPY"; fi
    if [ "$rc" -ne 0 ] && [ "$FAILED" -eq 0 ]; then FAILED=1; fi
    echo
    if [ "${#FAILED_STAGES[@]}" -gt 0 ]; then
        echo "failed stages: ${FAILED_STAGES[*]}"
    fi
    echo "$PASSED passed, $FAILED failed"
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

remaining() { echo $((BUDGET - (SECONDS - START))); }

# --- 1. packages, build (-Werror), install -----------------------------------------------------
ub_ensure_packages "${UB_PACKAGES[@]}"
ub_find_pg
ub_build_and_install

# --- 2. a tree the test user may write ----------------------------------------------------------
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/usage_billing_tests.XXXXXX")
if ub_is_root; then
    chown -R postgres: "$WORK"
    if ! runuser -u postgres -- test -w "$WORK" -a -r "$WORK/Makefile"; then
        # e.g. a clone under /root: postgres cannot reach it, so test a copy
        COPY=$(ub_mktemp_pg usage_billing_src)
        cp -a "$WORK/." "$COPY/"
        chown -R postgres: "$COPY"
        WORK=$COPY
        ub_log "postgres cannot reach $PWD: testing a copy in $WORK"
    fi
fi

# run_stage NAME MAKE-VARIABLES...: runs make installcheck with only this stage enabled.
run_stage() {
    local name=$1; shift
    local left log rc=0
    left=$(( $(remaining) - 20 ))
    if [ "$left" -lt 30 ]; then
        ub_warn "stage $name skipped: the time budget of ${BUDGET}s is used up"
        FAILED=$((FAILED + 1)); FAILED_STAGES+=("$name(no time)")
        return 0
    fi
    log="$LOGDIR/$name.log"
    ub_log "stage $name (at most ${left}s)"
    (cd "$WORK" && ub_as_pg env PG_TEST_TIMEOUT_DEFAULT=30 \
        timeout --kill-after=15 "$left" make PG_CONFIG="$PG_CONFIG" installcheck "$@") 2>&1 |
        tee "$log" || rc=${PIPESTATUS[0]}
    count_stage "$name" "$log" "$rc"
}

# count_stage NAME LOG RC: adds the stage's results to PASSED/FAILED.
count_stage() {
    local name=$1 log=$2 rc=$3 p=0 f=0 tests
    case "$name" in
        tap)
            # prove: "Files=2, Tests=17, ..." and per failed file "(Wstat: 256 ... Tests: 5 Failed: 1)"
            tests=$(sed -n 's/^Files=[0-9]*, Tests=\([0-9]*\),.*/\1/p' "$log" | tail -n 1)
            f=$(sed -n 's/.*(Wstat: .*Tests: [0-9]* Failed: \([0-9]*\)).*/\1/p' "$log" |
                awk '{ n += ($1 > 0 ? $1 : 1) } END { print n + 0 }')
            p=$(( ${tests:-0} - f ))
            if [ "$p" -lt 0 ]; then p=0; fi
            ;;
        *)
            # pg_regress / pg_isolation_regress: "test name ... ok" or "... FAILED"
            p=$(grep -cE '^(test +| +)[^ ]+ +\.\.\. ok( |$)' "$log" || true)
            f=$(grep -cE '^(test +| +)[^ ]+ +\.\.\. FAILED( |$)' "$log" || true)
            ;;
    esac
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        # the stage broke before or after its tests (build, initdb, timeout 124, ...)
        f=1
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            ub_warn "stage $name timed out"
        fi
    fi
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
    if [ "$f" -gt 0 ] || [ "$rc" -ne 0 ]; then FAILED_STAGES+=("$name"); fi
    ub_log "stage $name: $p passed, $f failed"
}

# --- 3. the stages -----------------------------------------------------------------------------
# no stale output from an earlier run may explain this run's failures
rm -rf "$WORK/regression.diffs" "$WORK/regression.out" "$WORK/results" \
    "$WORK/test/isolation/output_iso" "$WORK"/tmp_check*
shopt -s nullglob
regress_tests=()
for f in "$WORK"/sql/*.sql; do
    case "${f##*/}" in usage_billing--*) ;; *) regress_tests+=("$f") ;; esac   # not install/upgrade scripts
done
iso_specs=("$WORK"/test/isolation/specs/*.spec)
tap_tests=("$WORK"/test/t/*.pl)
shopt -u nullglob

if [ "${#regress_tests[@]}" -gt 0 ]; then
    run_stage regress ISOLATION= TAP_TESTS=
else
    ub_warn "no pg_regress tests (sql/*.sql)"
fi
if [ "${#iso_specs[@]}" -gt 0 ]; then
    run_stage isolation REGRESS= TAP_TESTS=
else
    ub_warn "no isolation specs (test/isolation/specs/*.spec)"
fi
if [ "${#tap_tests[@]}" -gt 0 ]; then
    run_stage tap REGRESS= ISOLATION=
else
    ub_warn "no TAP tests (test/t/*.pl)"
fi

# Hook: a time-boxed fuzz run, when test/fuzz/run.sh exists (one result: its exit status).
if [ -f "$WORK/test/fuzz/run.sh" ] && [ "${UB_FUZZ_SECONDS:-60}" -gt 0 ]; then
    left=$(( $(remaining) - 20 ))
    fuzz_time=${UB_FUZZ_SECONDS:-60}
    if [ "$fuzz_time" -gt $((left - 15)) ]; then fuzz_time=$((left - 15)); fi
    if [ "$fuzz_time" -ge 10 ]; then
        ub_log "stage fuzz (${fuzz_time}s)"
        if (cd "$WORK" && ub_as_pg env FUZZ_SECONDS="$fuzz_time" PG_CONFIG="$PG_CONFIG" \
                timeout --kill-after=15 $((fuzz_time + 15)) bash test/fuzz/run.sh); then
            PASSED=$((PASSED + 1))
        else
            FAILED=$((FAILED + 1)); FAILED_STAGES+=("fuzz")
        fi
    else
        ub_warn "stage fuzz skipped: not enough time left"
    fi
fi

# Hook: benchmarks print numbers; they are not tests and never fail the run.
if [ "${UB_RUN_BENCH:-0}" = 1 ] && [ -f "$WORK/test/bench/run.sh" ]; then
    (cd "$WORK" && PG_CONFIG="$PG_CONFIG" bash test/bench/run.sh) || ub_warn "the benchmark failed"
fi

# --- 4. explain failures -----------------------------------------------------------------------
show_file() {  # show_file FILE LINES: the last LINES lines of FILE under a header
    [ -s "$1" ] || return 0
    echo
    echo "======== $1 (last $2 lines)"
    tail -n "$2" "$1"
}
if [ "$FAILED" -gt 0 ]; then
    echo
    echo "################ diagnostics ################"
    show_file "$WORK/regression.diffs" 400
    show_file "$WORK/test/isolation/output_iso/regression.diffs" 400
    shopt -s nullglob
    for f in "$WORK"/tmp_check_regress/log/*.log "$WORK"/tmp_check_iso/log/*.log; do
        show_file "$f" 40
    done
    for f in "$WORK"/tmp_check/log/*; do
        show_file "$f" 80
    done
    shopt -u nullglob
    if [ -n "$COPY" ]; then echo; echo "(the tested copy is kept in $COPY)"; fi
fi

if [ $((PASSED + FAILED)) -eq 0 ]; then
    ub_warn "no tests were found: nothing was verified"
    FAILED_STAGES+=("none found")
    exit 1
fi
if [ "$FAILED" -gt 0 ]; then
    exit 1
fi
exit 0
