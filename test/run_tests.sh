#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps
# test/run_tests.sh: quick start, command 2 -- runs every test; .ci/run runs exactly this.
#
# As root on Debian bookworm: installs the missing packages (UB_PACKAGES, UB_TEST_PACKAGES and,
# for the fuzz stage, UB_FUZZ_PACKAGES of test/common.sh), copies this tree to a temp dir that
# the postgres user owns (the clone itself is only read: no build output, no chown), builds the
# copy with -Werror, installs it into the PostgreSQL of PG_CONFIG (the system's PostgreSQL 15 by
# default) and runs, as postgres, these stages one after the other, each on its own throwaway
# cluster (none touches a running server):
#   regress     pg_regress --temp-instance, sql/*.sql against expected/*.out
#   isolation   pg_isolation_regress --temp-instance, test/isolation/specs/*.spec
#   tap         prove test/t/*.pl (PostgreSQL::Test::Cluster: worker, crashes, mock Stripe)
#   fuzz        test/fuzz/run.sh: each libFuzzer harness for a bounded time
# Stages run separately so that one failing stage does not hide the others.  A stage passes only
# when it reports a result for every test it has (every sql/*.sql, every spec, every test/t/*.pl,
# every test/fuzz/*_fuzzer.c) and none failed: output it does not recognise, a PGXS without TAP
# support ("TAP tests not enabled") or a stage cut short fails.  On failure the diffs and log
# tails are printed and the copy is kept.  The last line is always "N passed, N failed" (CI
# reads it).  Also works as postgres or any user who has the packages (no apt then).
#
# Environment:
#   PG_CONFIG          test against this PostgreSQL (default: the system's 15)
#   UB_SKIP_INSTALL=1  do not run make install (the installed copy must be this build)
#   UB_STAGES          the stages to run (default "regress isolation tap fuzz"); the others are
#                      reported as skipped
#   UB_TEST_BUDGET     seconds for the whole run, build included (default 1200 = 20 minutes); a
#                      stage that no longer fits is reported as skipped and the run fails
#   UB_FUZZ_SECONDS    time per fuzz harness (default 60; 0 skips the fuzz stage)
#   UB_WERROR=0        build without -Werror
#   UB_RUN_BENCH=1     also run test/bench/run.sh afterwards (numbers only, never a failure)
#   CI=true            a stage skipped on request (UB_STAGES, UB_FUZZ_SECONDS=0) fails the run,
#                      and so does a TAP file that skipped itself (160_citus.pl without Citus)
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=test/common.sh
. test/common.sh

BUDGET=${UB_TEST_BUDGET:-1200}
STAGES=" ${UB_STAGES:-regress isolation tap fuzz} "
FUZZ_SECONDS=${UB_FUZZ_SECONDS:-60}
START=$SECONDS
PASSED=0
FAILED=0
FAILED_STAGES=()
SKIPPED_STAGES=()
SKIPPED_TESTS=()
LOGDIR=""
WORK=""

wants() { case "$STAGES" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# Stops throwaway servers a killed stage left behind (pg_ctl starts them in their own session).
stop_leftover_servers() {
    local pidfile
    [ -n "${PGBIN:-}" ] && [ -n "$WORK" ] || return 0
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
    if [ "$rc" -ne 0 ] && [ "$FAILED" -eq 0 ]; then FAILED=1; fi
    if [ -n "$WORK" ]; then
        if [ "$rc" -eq 0 ]; then
            rm -rf "$WORK"
        else
            echo
            echo "(the tested copy, with its logs, is kept in $WORK)"
        fi
    fi
    echo
    echo "time: $((SECONDS - START)) s"
    if [ "${#SKIPPED_STAGES[@]}" -gt 0 ]; then
        echo "skipped stages: ${SKIPPED_STAGES[*]}"
    fi
    local t
    for t in "${SKIPPED_TESTS[@]}"; do
        echo "$t"
    done
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

# stage_failed NAME WHY: one failure for the stage.
stage_failed() {
    ub_warn "stage $1: $2"
    FAILED=$((FAILED + 1))
    FAILED_STAGES+=("$1")
}

# stage_skipped NAME WHY FATAL: reports a stage that did not run.  FATAL=1 (no time left)
# always fails the run; FATAL=0 (skipped on request) fails it under CI=true.
stage_skipped() {
    local name=$1 why=$2 fatal=$3
    ub_log "stage $name: SKIPPED ($why)"
    SKIPPED_STAGES+=("$name($why)")
    if [ "$fatal" = 1 ] || [ "${CI:-}" = true ]; then
        FAILED=$((FAILED + 1))
        FAILED_STAGES+=("$name(skipped)")
    fi
}

# --- 1. what this does, packages, build (-Werror), install -------------------------------------
packages=("${UB_PACKAGES[@]}")
if wants tap; then packages+=("${UB_TEST_PACKAGES[@]}"); fi
if wants fuzz && [ "$FUZZ_SECONDS" -gt 0 ]; then packages+=("${UB_FUZZ_PACKAGES[@]}"); fi
ub_log "run_tests.sh installs usage_billing into the PostgreSQL of ${PG_CONFIG:-the system (/usr/lib/postgresql/15)}"
ub_log "and, with apt-get, those of these packages that are missing: ${packages[*]}"
stage_list=${STAGES# }
ub_log "stages: ${stage_list% }; time budget ${BUDGET}s"
ub_ensure_packages "${packages[@]}"
ub_find_pg
WORK=$(ub_make_build_copy usage_billing_tests)
ub_log "testing a copy of $PWD in $WORK"
make_flags=()
if [ "${UB_WERROR:-1}" != 0 ]; then make_flags+=(COPT=-Werror); fi
ub_build_and_install "$WORK" "${make_flags[@]}"
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/usage_billing_logs.XXXXXX")
# the layering of src/ (src/README.md): no call or include a folder's README does not allow, no
# cycle between files; read from the objects just built
if python3 "$WORK/test/tools/check_layers.py" "$WORK/src"; then
    PASSED=$((PASSED + 1))
else
    stage_failed layers "src/ breaks its layering (test/tools/check_layers.py)"
fi

# --- 2. what each stage must report ------------------------------------------------------------
shopt -s nullglob
regress_tests=()
for f in "$WORK"/sql/*.sql; do
    case "${f##*/}" in usage_billing--*) ;; *) regress_tests+=("$f") ;; esac   # not install/upgrade scripts
done
iso_specs=("$WORK"/test/isolation/specs/*.spec)
tap_tests=("$WORK"/test/t/*.pl)
fuzz_harnesses=("$WORK"/test/fuzz/*_fuzzer.c)
shopt -u nullglob

# count_stage NAME LOG RC EXPECTED: adds the stage's results to PASSED/FAILED.  The stage passes
# when it exited 0, reported at least EXPECTED results and none of them failed.
count_stage() {
    local name=$1 log=$2 rc=$3 expected=$4 p=0 f=0 bad=0 files tests
    case "$name" in
        tap)
            if grep -q 'TAP tests not enabled' "$log"; then
                stage_failed tap "this PostgreSQL was built without TAP support (--enable-tap-tests): no TAP test ran"
                return 0
            fi
            # prove: "Files=13, Tests=345, ..." and per failed file "(Wstat: 256 ... Tests: 5 Failed: 1)"
            files=$(sed -n 's/^Files=\([0-9]*\), Tests=[0-9]*,.*/\1/p' "$log" | tail -n 1)
            tests=$(sed -n 's/^Files=[0-9]*, Tests=\([0-9]*\),.*/\1/p' "$log" | tail -n 1)
            f=$(sed -n 's/.*(Wstat: .*Tests: [0-9]* Failed: \([0-9]*\)).*/\1/p' "$log" |
                awk '{ n += ($1 > 0 ? $1 : 1) } END { print n + 0 }')
            p=$(( ${tests:-0} - f ))
            if [ "$p" -lt 0 ]; then p=0; fi
            if [ -z "$files" ]; then
                stage_failed tap "no prove summary (\"Files=N, Tests=N\") in its output"; bad=1
            elif [ "$files" -lt "$expected" ]; then
                stage_failed tap "prove ran $files test files of $expected"; bad=1
            elif [ "$f" -eq 0 ] && ! grep -q '^Result: PASS' "$log"; then
                stage_failed tap "prove did not say \"Result: PASS\""; bad=1
            fi
            # a file that skipped itself ("t/160_citus.pl .. skipped: citus not installed")
            # counts no result: say so in the summary; under CI=true it fails the run
            local line
            while IFS= read -r line; do
                SKIPPED_TESTS+=("${line##*/}")
                if [ "${CI:-}" = true ]; then
                    stage_failed tap "${line##*/} (a skipped test fails under CI=true)"
                fi
            done < <(sed -n 's/^\(test\/t\/[^ ]*\.pl\) \.*[ ]*\(skipped: .*\)$/\1 \2/p' "$log")
            ;;
        fuzz)
            # test/fuzz/run.sh: "fuzz NAME: ok (...)" or "fuzz NAME: FAILED (...)" per harness
            p=$(grep -cE '^fuzz [A-Za-z0-9_]+: ok ' "$log" || true)
            f=$(grep -cE '^fuzz [A-Za-z0-9_]+: FAILED' "$log" || true)
            ;;
        *)
            # pg_regress / pg_isolation_regress: "test name ... ok" or "... FAILED"
            p=$(grep -cE '^(test +| +)[^ ]+ +\.\.\. ok( |$)' "$log" || true)
            f=$(grep -cE '^(test +| +)[^ ]+ +\.\.\. FAILED( |$)' "$log" || true)
            ;;
    esac
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        ub_warn "stage $name timed out"
    fi
    if [ "$bad" -eq 0 ] && [ $((p + f)) -lt "$expected" ]; then
        stage_failed "$name" "$((p + f)) results of at least $expected (output not recognised, or the stage broke off)"
        bad=1
    fi
    if [ "$bad" -eq 0 ] && [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        # the stage broke before or after its tests (initdb, a crash after the last test, ...)
        stage_failed "$name" "exit status $rc although no test failed"
    fi
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
    if [ "$f" -gt 0 ]; then FAILED_STAGES+=("$name"); fi
    ub_log "stage $name: $p passed, $f failed (expected at least $expected results)"
}

# run_stage NAME EXPECTED MIN-SECONDS COMMAND...: runs COMMAND as the pg user in the copy, at
# most until the budget ends, and counts its results.
run_stage() {
    local name=$1 expected=$2 min=$3; shift 3
    local left log rc=0
    left=$(( $(remaining) - 20 ))
    if [ "$left" -lt "$min" ]; then
        stage_skipped "$name" "no time left: ${left}s of the ${BUDGET}s budget" 1
        return 0
    fi
    log="$LOGDIR/$name.log"
    ub_log "stage $name (at most ${left}s)"
    (cd "$WORK" && ub_as_pg env PG_TEST_TIMEOUT_DEFAULT=30 \
        timeout --kill-after=15 "$left" "$@") 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    count_stage "$name" "$log" "$rc" "$expected"
}

# --- 3. the stages -----------------------------------------------------------------------------
# stage NAME FILES-FOUND: whether to run it (else it is reported as skipped, or failed when the
# stage has no tests at all)
stage() {
    if ! wants "$1"; then
        stage_skipped "$1" "not in UB_STAGES" 0
        return 1
    fi
    if [ "$2" -eq 0 ]; then
        stage_failed "$1" "no tests found"
        return 1
    fi
    return 0
}

if stage regress "${#regress_tests[@]}"; then
    run_stage regress "${#regress_tests[@]}" 30 \
        make PG_CONFIG="$PG_CONFIG" installcheck ISOLATION= TAP_TESTS=
fi
if stage isolation "${#iso_specs[@]}"; then
    run_stage isolation "${#iso_specs[@]}" 30 \
        make PG_CONFIG="$PG_CONFIG" installcheck REGRESS= TAP_TESTS=
fi
if stage tap "${#tap_tests[@]}"; then
    run_stage tap "${#tap_tests[@]}" 60 \
        make PG_CONFIG="$PG_CONFIG" installcheck REGRESS= ISOLATION=
fi
if [ "$FUZZ_SECONDS" -le 0 ]; then
    stage_skipped fuzz "UB_FUZZ_SECONDS=0" 0
elif stage fuzz "${#fuzz_harnesses[@]}"; then
    # each harness runs FUZZ_SECONDS, less when the budget is short (at least 10 s)
    per=$(( ($(remaining) - 20) / ${#fuzz_harnesses[@]} - 15 ))
    if [ "$per" -gt "$FUZZ_SECONDS" ]; then per=$FUZZ_SECONDS; fi
    if [ "$per" -lt 10 ]; then
        stage_skipped fuzz "no time left: $(remaining)s of the ${BUDGET}s budget" 1
    else
        run_stage fuzz "${#fuzz_harnesses[@]}" 0 \
            env FUZZ_SECONDS="$per" PG_CONFIG="$PG_CONFIG" bash test/fuzz/run.sh
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
fi

if [ $((PASSED + FAILED)) -eq 0 ]; then
    ub_warn "no tests were run: nothing was verified"
    FAILED_STAGES+=("none run")
    exit 1
fi
if [ "$FAILED" -gt 0 ]; then
    exit 1
fi
exit 0
