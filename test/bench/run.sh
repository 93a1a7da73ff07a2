#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps
# test/bench/run.sh: the benchmark ("make bench", doc/benchmarks.md).  Numbers, not tests.
#
# Starts its own throwaway cluster (unix socket in a temp dir, run by the postgres user when we
# are root), loads 10,000 customers and the naive baselines, then runs pgbench -M prepared with 8
# clients and 2 threads for BENCH_SECONDS (default 10) per run, alternating ours and the baseline
# (A B A B A B, BENCH_ROUNDS times) and taking the median run of each side.  Prints one table:
#   workload | ours | baseline | ratio | target | met
# A side that fails (e.g. a function not implemented yet) shows ERR and the run goes on.
#
# The extension must be installed (make install) in the PostgreSQL of PG_CONFIG (default: the
# system's 15).  Server settings: shared_buffers 1GB, max_connections 50, synchronous_commit on
# and fsync on (the defaults: every call is a durable commit, for ours and the baselines alike),
# max_wal_size 4GB so that no checkpoint is forced inside a run.
#
# Environment:
#   BENCH_SECONDS   seconds per pgbench run (default 10)
#   BENCH_ROUNDS    alternations per workload (default 3: A B A B A B; each side's median counts)
#   BENCH_ONLY      space-separated subset of: inc_spread inc_hot check_limit summary batch disk
#                   export citus (the last runs only when Citus is installed: a coordinator and two
#                   workers on 127.0.0.1, distributed with distribute_with_citus(), doc/scaling.md)
#   BENCH_EXPORT_CUSTOMERS, BENCH_EXPORT_ROUNDS   the export case (test/bench/export_bench.sh on
#                   its own cluster and mock, v1 then v2): customers per round (default 2000)
#                   and measured rounds per API (default 5)
#   BENCH_OUT       also write the table to this file
#   BENCH_LOAD_TIMEOUT  seconds allowed for loading the 1,000,000 events (default 600)
#   UB_KEEP_TMP=1   keep the temp dir (cluster, pgbench logs)
set -euo pipefail

cd "$(dirname "$0")/../.."
# shellcheck source=test/common.sh
. test/common.sh

SECS=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
CLIENTS=8
THREADS=2
ONLY=${BENCH_ONLY:-inc_spread inc_hot check_limit summary batch disk export citus}
LOAD_TIMEOUT=${BENCH_LOAD_TIMEOUT:-600}
TMP=""
ROWS=()        # "workload|ours|baseline|ratio|target|met"
CPUS=()        # "workload|ours|baseline|ratio|unit": busy CPU microseconds
NOTES=()

cleanup() {
    local rc=$?
    set +e
    if [ -n "$TMP" ]; then
        for n in "$TMP"/citus*; do [ -d "$n/data" ] && ub_pg_stop "$n"; done
        ub_pg_stop "$TMP"
        if [ "${UB_KEEP_TMP:-0}" = 1 ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

want() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# true when a case that uses the loaded bench database is wanted (export has its own cluster)
want_db() { local c; for c in inc_spread inc_hot check_limit summary batch disk; do want "$c" && return 0; done; return 1; }

ub_find_pg
if [ ! -f "$("$PG_CONFIG" --sharedir)/extension/usage_billing.control" ]; then
    ub_die "usage_billing is not installed in $("$PG_CONFIG" --sharedir): run make install first"
fi

TMP=$(ub_mktemp_pg usage_billing_bench)
PORT=$((55000 + RANDOM % 1000))
ub_initdb "$TMP"
ub_conf "$TMP" \
    "# usage_billing benchmark (throwaway)" \
    "listen_addresses = ''" \
    "port = $PORT" \
    "unix_socket_directories = '$TMP'" \
    "shared_preload_libraries = 'usage_billing'" \
    "usage_billing.export_interval = 0" \
    "max_connections = 50" \
    "shared_buffers = 1GB" \
    "synchronous_commit = on" \
    "max_wal_size = 4GB" \
    "checkpoint_timeout = 30min" \
    "timezone = 'UTC'"
ub_pg_start "$TMP"
cp -r test/bench/scripts "$TMP/scripts"
if ub_is_root; then chown -R postgres: "$TMP/scripts"; fi

psql_b() { ub_as_pg "$PGBIN/psql" -X -q -h "$TMP" -p "$PORT" -v ON_ERROR_STOP=1 "$@"; }
val() { psql_b -d bench -At -c "$1" 2>>"$TMP/psql.err"; }

psql_b -d postgres -c "CREATE DATABASE bench"
if want_db; then
    ub_log "loading: 10,000 customers, naive counter table, naive ledger with 1,000,000 + 1,000 rows"
    psql_b -d bench -f - <test/bench/setup.sql >/dev/null
fi

# Our side of the summary workload: 1,000,000 events for "big" and 1,000 for "small" in the
# current period, recorded through increment_usage_batch (100 calls of 10,000 events).
LOADED=no
if want summary; then
    ub_log "loading ours: 1,000,000 events for 'big' and 1,000 for 'small' via increment_usage_batch"
    t0=$SECONDS
    if ub_as_pg timeout --kill-after=10 "$LOAD_TIMEOUT" "$PGBIN/psql" -X -q -h "$TMP" -p "$PORT" \
            -v ON_ERROR_STOP=1 -d bench >"$TMP/load.log" 2>&1 <<'EOF'
SELECT format('SELECT accepted FROM usage_billing.increment_usage_batch((SELECT jsonb_agg(jsonb_build_object(%L, %L, %L, %L, %L, 1)) FROM generate_series(1, 10000)))',
              'customer_id', 'big', 'meter', 'api_calls', 'amount')
  FROM generate_series(1, 100) \gexec
SELECT accepted FROM usage_billing.increment_usage_batch((SELECT jsonb_agg(jsonb_build_object('customer_id', 'small', 'meter', 'api_calls', 'amount', 1)) FROM generate_series(1, 1000)));
EOF
    then
        LOADED=yes
        ub_log "loaded in $((SECONDS - t0))s"
    else
        NOTES+=("summary load failed after $((SECONDS - t0))s (limit ${LOAD_TIMEOUT}s): $(grep -m1 ERROR "$TMP/load.log" || tail -n 1 "$TMP/load.log")")
    fi
fi

# busy_jiffies: the whole machine's busy CPU time so far (user, nice, system, irq, softirq).
busy_jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }

# pgbench_run SCRIPTS...: one pgbench run; prints "TPS PROCESSED CPU" or "ERR first-error-line".
# CPU: the machine's busy CPU microseconds per transaction during the run (server, client and
# kernel alike); it moves less than TPS with the speed of the disk's flushes.
pgbench_run() {
    local out rc=0 tps n b0 b1
    out=$(mktemp "$TMP/pgbench.XXXXXX")
    b0=$(busy_jiffies)
    ub_as_pg "$PGBIN/pgbench" -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$SECS" \
        -h "$TMP" -p "$PORT" "$@" bench >"$out" 2>&1 || rc=$?
    b1=$(busy_jiffies)
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out" | tail -n 1)
    n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    if [ "$rc" -ne 0 ] || [ -z "$tps" ] || [ -z "$n" ] || [ "$n" = 0 ] || grep -q 'aborted in command' "$out"; then
        echo "ERR $(grep -m1 -E 'ERROR|error' "$out" | cut -c1-160)"
    else
        echo "$tps $n $(awk -v b=$((b1 - b0)) -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", b * 1e6 / hz / n }')"
    fi
}

# median X...: the middle value (the mean of the two middle ones for an even count).
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ab NAME "OURS ARGS" "BASELINE ARGS": A B A B ... (ROUNDS times); sets OURS/BASE (median TPS of
# the side's runs, or ERR), OURS_N/BASE_N (transactions processed, summed), OURS_CPU/BASE_CPU
# (median CPU per transaction) and notes the first error of a side.  The median, not the mean:
# one run disturbed by the VM's neighbours moves it less.
ab() {
    local name=$1 a=$2 b=$3 i r side tps n cpu
    local -a oa ob ours_runs=() base_runs=() ours_cpu=() base_cpu=()
    read -r -a oa <<<"$a"
    read -r -a ob <<<"$b"
    OURS=0; BASE=0; OURS_N=0; BASE_N=0; OURS_CPU=ERR; BASE_CPU=ERR
    local ours_err="" base_err=""
    if [ "$a" = SKIP ]; then ours_err="skipped"; oa=(-f -); fi
    ub_log "$name: ours = $(basename -- "${oa[*]: -1}"), baseline = $(basename -- "${ob[*]: -1}"), $ROUNDS x 2 runs of ${SECS}s"
    for i in $(seq 1 "$ROUNDS"); do
        for side in ours base; do
            if [ "$side" = ours ]; then
                [ -n "$ours_err" ] && continue
                r=$(pgbench_run "${oa[@]}")
            else
                [ -n "$base_err" ] && continue
                r=$(pgbench_run "${ob[@]}")
            fi
            echo "    run $i $side: $r"
            if [ "${r%% *}" = ERR ]; then
                if [ "$side" = ours ]; then ours_err=${r#ERR }; else base_err=${r#ERR }; fi
                continue
            fi
            read -r tps n cpu <<<"$r"
            if [ "$side" = ours ]; then
                ours_runs+=("$tps"); ours_cpu+=("$cpu")
                OURS_N=$((OURS_N + n))
            else
                base_runs+=("$tps"); base_cpu+=("$cpu")
                BASE_N=$((BASE_N + n))
            fi
        done
    done
    [ ${#ours_runs[@]} -eq 0 ] || OURS=$(median "${ours_runs[@]}")
    [ ${#base_runs[@]} -eq 0 ] || BASE=$(median "${base_runs[@]}")
    [ ${#ours_cpu[@]} -eq 0 ] || OURS_CPU=$(median "${ours_cpu[@]}")
    [ ${#base_cpu[@]} -eq 0 ] || BASE_CPU=$(median "${base_cpu[@]}")
    if [ -n "$ours_err" ]; then OURS=ERR; [ "$ours_err" = skipped ] || NOTES+=("$name, ours: $ours_err"); fi
    if [ -n "$base_err" ]; then BASE=ERR; NOTES+=("$name, baseline: $base_err"); fi
}

# cpu_row WORKLOAD OURS BASE [UNIT]: a row of the CPU table (microseconds per transaction, or per
# UNIT); the ratio is baseline / ours, so above 1 means ours costs less.
cpu_row() {
    local r="-"
    if [ "$2" != ERR ] && [ "$3" != ERR ]; then
        r=$(awk -v o="$2" -v b="$3" 'BEGIN { if (o > 0) printf "%.2fx", b / o; else print "-" }')
    fi
    CPUS+=("$1|$2|$3|$r|${4:-transaction}")
}

# ab_row WORKLOAD MIN-RATIO: the table row and the CPU row of the last ab() run.
ab_row() {
    row "$1" "$OURS" "$BASE" "$2" TPS
    cpu_row "$1" "$OURS_CPU" "$BASE_CPU"
}

# row WORKLOAD OURS BASE MIN-RATIO UNIT [SCALE]: adds a table row; ratio = ours / baseline.
row() {
    local w=$1 o=$2 b=$3 min=$4 unit=$5 scale=${6:-1} ratio="-" met="-" os bs
    if [ "$o" != ERR ]; then o=$(awk -v x="$o" -v s="$scale" 'BEGIN { printf "%.0f", x * s }'); os="$o $unit"; else os=ERR; fi
    if [ "$b" != ERR ]; then b=$(awk -v x="$b" -v s="$scale" 'BEGIN { printf "%.0f", x * s }'); bs="$b $unit"; else bs=ERR; fi
    if [ "$o" != ERR ] && [ "$b" != ERR ] && awk -v b="$b" 'BEGIN { exit !(b > 0) }'; then
        ratio=$(awk -v x="$o" -v y="$b" 'BEGIN { printf "%.2fx", x / y }')
        if [ "$min" = report ]; then
            met="-"
        elif awk -v x="$o" -v y="$b" -v m="$min" 'BEGIN { exit !(x / y >= m) }'; then
            met=yes
        else
            met=NO
        fi
    fi
    if [ "$min" = report ]; then min="report"; else min=">= ${min}x"; fi
    ROWS+=("$w|$os|$bs|$ratio|$min|$met")
}

S="$TMP/scripts"

if want inc_spread; then
    ab "increment_usage, 10,000 customers" "-f $S/inc_spread.sql" "-f $S/naive_counter_spread.sql"
    ab_row "increment_usage spread (10,000 customers) vs naive counter" 1.0
    # reference, no target: a naive app that keeps a ledger writes a row and bumps a counter
    ab "increment_usage vs naive counter + ledger row, 10,000 customers" \
        "-f $S/inc_spread.sql" "-f $S/naive_counter_ledger_spread.sql"
    ab_row "  reference: vs naive counter + naive ledger row" report
    NOTES+=("reference rows carry no target: the baseline does what ours does at the least (same durable work), or is what ours can at best reach (a constant result row)")
fi

if want inc_hot; then
    before_o=$(val "SELECT coalesce(sum(total), 0) FROM usage_billing.get_usage_summary('hot') WHERE meter = 'api_calls'" || echo ERR)
    before_b=$(val "SELECT coalesce(sum(count), 0) FROM usage WHERE user_id = 'hot'" || echo ERR)
    ab "increment_usage, one hot customer" "-f $S/inc_hot.sql" "-f $S/naive_counter_hot.sql"
    ab_row "increment_usage hot key vs naive counter hot key" 2.5
    after_o=$(val "SELECT coalesce(sum(total), 0) FROM usage_billing.get_usage_summary('hot') WHERE meter = 'api_calls'" || echo ERR)
    after_b=$(val "SELECT coalesce(sum(count), 0) FROM usage WHERE user_id = 'hot'" || echo ERR)
    for side in ours baseline; do
        if [ "$side" = ours ]; then b0=$before_o; b1=$after_o; n=$OURS_N; else b0=$before_b; b1=$after_b; n=$BASE_N; fi
        if [ "$b0" = ERR ] || [ "$b1" = ERR ] || [ "$n" = 0 ]; then
            NOTES+=("hot key exactness, $side: not measured")
        else
            d=$(awk -v x="$b1" -v y="$b0" 'BEGIN { printf "%.0f", x - y }')
            if [ "$d" = "$n" ]; then v=exact; else v="NOT EXACT"; fi
            NOTES+=("hot key exactness, $side: $n calls committed, total grew by $d: $v")
        fi
    done
fi

if want check_limit; then
    ab "check_limit, 10,000 customers" "-f $S/check_limit_spread.sql" "-f $S/select1.sql"
    ab_row "check_limit spread vs SELECT 1" 0.8
    # reference, no target: check_limit's eight result columns as constants, no function call
    ab "check_limit's result row as constants vs SELECT 1" "-f $S/check_limit_shape.sql" "-f $S/select1.sql"
    ab_row "  reference: check_limit's result row as constants" report
fi

if want summary; then
    if [ "$LOADED" = yes ]; then
        ab "get_usage_summary, 1,000,000 vs 1,000 events" "-f $S/summary_big.sql" "-f $S/summary_small.sql"
        row "get_usage_summary 1M events vs 1k events (ours both)" "$OURS" "$BASE" 0.9 TPS
    else
        row "get_usage_summary 1M events vs 1k events (ours both)" ERR ERR 0.9 TPS
    fi
    # the naive ledger side runs even when ours could not be loaded
    ab "get_usage_summary vs naive ledger sum, 1,000,000 events" \
        "$([ "$LOADED" = yes ] && echo "-f $S/summary_big.sql" || echo SKIP)" "-f $S/naive_ledger_sum.sql"
    row "get_usage_summary 1M events vs naive ledger sum 1M rows" "$OURS" "$BASE" 100 TPS
fi

if want batch; then
    # 50 batches of 100 events over disjoint customer ranges, sent as a jsonb parameter
    batch_args=()
    for k in $(seq 0 49); do
        json=$(awk -v k="$k" 'BEGIN { printf "["; for (i = 1; i <= 100; i++) printf "%s{\"customer_id\":\"c%d\",\"meter\":\"api_calls\",\"amount\":1}", (i > 1 ? "," : ""), k * 100 + i; printf "]" }')
        printf 'SELECT * FROM usage_billing.increment_usage_batch(:ev%d::jsonb);\n' "$k" >"$S/batch_$k.sql"
        batch_args+=("-D" "ev$k=$json" "-f" "$S/batch_$k.sql")
    done
    if ub_is_root; then chown postgres: "$S"/batch_*.sql; fi
    # ab() splits on blanks, so pass the batch arguments through a file-free route
    OURS=0; OURS_N=0; BASE=0; BASE_N=0; oerr=""; berr=""
    batch_runs=(); single_runs=(); batch_cpu=(); single_cpu=()
    ub_log "batch ingestion: ours = increment_usage_batch (100 events per call), baseline = single increment_usage calls"
    for i in $(seq 1 "$ROUNDS"); do
        if [ -z "$oerr" ]; then
            r=$(pgbench_run "${batch_args[@]}"); echo "    run $i ours (calls/s): $r"
            if [ "${r%% *}" = ERR ]; then oerr=${r#ERR }; else read -r tps n cpu <<<"$r"; batch_runs+=("$tps"); batch_cpu+=("$cpu"); fi
        fi
        if [ -z "$berr" ]; then
            r=$(pgbench_run -f "$S/inc_spread.sql"); echo "    run $i base (calls/s): $r"
            if [ "${r%% *}" = ERR ]; then berr=${r#ERR }; else read -r tps n cpu <<<"$r"; single_runs+=("$tps"); single_cpu+=("$cpu"); fi
        fi
    done
    [ ${#batch_runs[@]} -eq 0 ] || OURS=$(median "${batch_runs[@]}")
    [ ${#single_runs[@]} -eq 0 ] || BASE=$(median "${single_runs[@]}")
    [ -z "$oerr" ] || { OURS=ERR; NOTES+=("batch, ours: $oerr"); }
    [ -z "$berr" ] || { BASE=ERR; NOTES+=("batch, single calls: $berr"); }
    if [ "$OURS" != ERR ]; then OURS=$(awk -v x="$OURS" 'BEGIN { print x * 100 }'); fi
    row "increment_usage_batch (100/call) vs single increment_usage" "$OURS" "$BASE" 10 "events/s"
    # per event: a batch call carries 100
    OURS_CPU=ERR; BASE_CPU=ERR
    [ ${#batch_cpu[@]} -eq 0 ] || OURS_CPU=$(awk -v x="$(median "${batch_cpu[@]}")" 'BEGIN { printf "%.1f", x / 100 }')
    [ ${#single_cpu[@]} -eq 0 ] || BASE_CPU=$(median "${single_cpu[@]}")
    cpu_row "increment_usage_batch (100/call) vs single increment_usage" "$OURS_CPU" "$BASE_CPU" event
fi

if want disk; then
    psql_b -d bench -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null 2>&1 || true
    ours_b=$(val "
        SELECT round(sum(pg_total_relation_size(c.oid))::numeric
                     / nullif((SELECT count(*) FROM usage_billing.usage_events), 0))
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'usage_billing' AND c.relkind IN ('r', 'p', 'm')
           AND c.relname NOT IN ('meters', 'plans', 'plan_limits', 'customers', 'customer_limits')" || true)
    base_b=$(val "SELECT round(pg_total_relation_size('usage_records')::numeric / nullif(count(*), 0)) FROM usage_records" || true)
    ev=$(val "SELECT count(*) FROM usage_billing.usage_events" || echo "?")
    [ -n "$ours_b" ] || ours_b=ERR
    [ -n "$base_b" ] || base_b=ERR
    NOTES+=("disk: ours = all usage_billing tables but the catalog, with indexes and TOAST, over $ev ledger rows; baseline = usage_records with its 2 indexes over its rows; after VACUUM")
    row "disk per event (lower is better) vs naive ledger" "$ours_b" "$base_b" report "B"
fi

if want export; then
    # its own scratch cluster and mock (test/bench/export_bench.sh): v1, then v2, same settings
    exp_n=${BENCH_EXPORT_CUSTOMERS:-2000}
    exp_rounds=${BENCH_EXPORT_ROUNDS:-5}
    ub_log "export to the mock: v1 then v2, $exp_n customers x $exp_rounds rounds each, 8 requests in flight"
    if bash test/bench/export_bench.sh "$PGBIN" "$exp_n" "$exp_rounds" 8 >"$TMP/export.log" 2>&1; then
        sed 's/^/    /' "$TMP/export.log"
        res=$(grep '^RESULT' "$TMP/export.log" || true)
        ev1=$(sed -n 's/.* v1=\([0-9]*\).*/\1/p' <<<"$res")
        ev2=$(sed -n 's/.* v2=\([0-9]*\).*/\1/p' <<<"$res")
        row "export to the mock, v2 stream vs v1 (events/s)" "${ev2:-ERR}" "${ev1:-ERR}" report "events/s"
        NOTES+=("export: events/s from export_now() until every row is in sync, $exp_n events per round, $exp_rounds rounds per API after one warm-up round; v1 sends one event per request, v2 up to 100 (the Python mock on the same cores bounds both)")
    else
        tail -n 5 "$TMP/export.log" | sed 's/^/    /'
        row "export to the mock, v2 stream vs v1 (events/s)" ERR ERR report "events/s"
        NOTES+=("export: $(grep -m1 ERROR "$TMP/export.log" || tail -n 1 "$TMP/export.log")")
    fi
fi

if want citus; then
    if [ ! -f "$("$PG_CONFIG" --pkglibdir)/citus.so" ]; then
        NOTES+=("citus: skipped, Citus is not installed in $("$PG_CONFIG" --pkglibdir)")
    else
        # a coordinator and two workers on loopback, each its own throwaway cluster
        ub_log "citus: a coordinator and two workers on 127.0.0.1, the same 10,000 customers, distribute_with_citus()"
        CPORTS=()
        for k in 0 1 2; do
            d="$TMP/citus$k"
            mkdir "$d"
            if ub_is_root; then chown postgres: "$d"; fi
            CPORTS+=("$((PORT + 1 + k))")
            ub_initdb "$d"
            ub_conf "$d" \
                "listen_addresses = '127.0.0.1'" \
                "port = ${CPORTS[$k]}" \
                "unix_socket_directories = '$d'" \
                "shared_preload_libraries = 'citus,usage_billing'" \
                "usage_billing.export_interval = 0" \
                "max_connections = 100" \
                "shared_buffers = 256MB" \
                "synchronous_commit = on" \
                "max_wal_size = 4GB" \
                "checkpoint_timeout = 30min" \
                "timezone = 'UTC'"
            printf 'host all all 127.0.0.1/32 trust\n' | ub_as_pg tee -a "$d/data/pg_hba.conf" >/dev/null
            ub_pg_start "$d"
            ub_as_pg "$PGBIN/psql" -X -q -h 127.0.0.1 -p "${CPORTS[$k]}" -v ON_ERROR_STOP=1 -d postgres \
                -c "CREATE DATABASE bench" >/dev/null
            ub_as_pg "$PGBIN/psql" -X -q -h 127.0.0.1 -p "${CPORTS[$k]}" -v ON_ERROR_STOP=1 -d bench \
                -c "CREATE EXTENSION citus" >/dev/null
        done
        psql_c() { ub_as_pg "$PGBIN/psql" -X -q -h 127.0.0.1 -p "${CPORTS[0]}" -v ON_ERROR_STOP=1 -d bench "$@"; }
        if psql_c -c "SELECT citus_set_coordinator_host('127.0.0.1', ${CPORTS[0]})" \
                  -c "SELECT citus_add_node('127.0.0.1', ${CPORTS[1]})" \
                  -c "SELECT citus_add_node('127.0.0.1', ${CPORTS[2]})" \
                  -c "SET client_min_messages = warning" \
                  -c "CREATE EXTENSION usage_billing" \
                  -c "SELECT usage_billing.distribute_with_citus()" >"$TMP/citus.log" 2>&1 &&
           sed -e '/^CREATE EXTENSION usage_billing;/d' -e '/^-- the naive counter/,$d' test/bench/setup.sql |
               psql_c -f - >>"$TMP/citus.log" 2>&1; then
            C="-h 127.0.0.1 -p ${CPORTS[0]}"
            W="-h 127.0.0.1 -p ${CPORTS[1]}"
            ab "citus: routed increment_usage vs one node" "$C -f $S/inc_spread.sql" "-f $S/inc_spread.sql"
            row "citus: increment_usage routed by the coordinator vs one node" "$OURS" "$BASE" report TPS
            cpu_row "citus: increment_usage routed vs one node" "$OURS_CPU" "$BASE_CPU"
            ab "citus: routed check_limit vs one node" "$C -f $S/check_limit_spread.sql" "-f $S/check_limit_spread.sql"
            row "citus: check_limit routed by the coordinator vs one node" "$OURS" "$BASE" report TPS
            cpu_row "citus: check_limit routed vs one node" "$OURS_CPU" "$BASE_CPU"
            ab "citus: routed increment_usage vs routed plain SELECT" "$C -f $S/inc_spread.sql" "$C -f $S/routed_select.sql"
            row "citus: increment_usage routed vs a routed plain SELECT" "$OURS" "$BASE" report TPS
            cpu_row "citus: increment_usage routed vs routed SELECT" "$OURS_CPU" "$BASE_CPU"
            ab "citus: increment_usage on a worker vs routed by the coordinator" "$W -f $S/inc_spread.sql" "$C -f $S/inc_spread.sql"
            row "citus: increment_usage sent to a worker vs routed by the coordinator" "$OURS" "$BASE" report TPS
            cpu_row "citus: increment_usage on a worker vs via the coordinator" "$OURS_CPU" "$BASE_CPU"
            NOTES+=("citus: every node on this machine (3 servers sharing its CPUs); calls via the coordinator are delegated to the worker holding the customer's shard, calls sent to a worker run there (half of them route on to the other worker's shard)")
        else
            NOTES+=("citus: the cluster could not be set up: $(grep -m1 ERROR "$TMP/citus.log")")
        fi
    fi
fi

# --- the table ---------------------------------------------------------------------------------
{
    echo
    echo "usage_billing benchmark -- $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), $(awk '/MemTotal/ { printf "%.0f GB", $2 / 1048576 }' /proc/meminfo) RAM"
    echo "$("$PGBIN/postgres" --version), pgbench -M prepared -c $CLIENTS -j $THREADS -T $SECS, A B x $ROUNDS (median run per side), shared_buffers 1GB, synchronous_commit on"
    echo
    printf '| %-58s | %-16s | %-16s | %-8s | %-9s | %-4s |\n' workload ours baseline ratio target met
    printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..60})" "$(printf -- '-%.0s' {1..18})" "$(printf -- '-%.0s' {1..18})" "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..6})"
    for r in "${ROWS[@]}"; do
        IFS='|' read -r w o b ra t m <<<"$r"
        printf '| %-58s | %-16s | %-16s | %-8s | %-9s | %-4s |\n' "$w" "$o" "$b" "$ra" "$t" "$m"
    done
    if [ "${#CPUS[@]}" -gt 0 ]; then
        echo
        echo "Busy CPU per transaction, whole machine (server, pgbench and kernel), median run per side:"
        echo
        printf '| %-58s | %-10s | %-10s | %-18s |\n' workload "ours (us)" "base (us)" "base / ours"
        printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..60})" "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..20})"
        for r in "${CPUS[@]}"; do
            IFS='|' read -r w o b ra u <<<"$r"
            [ "$u" = transaction ] || ra="$ra (per $u)"
            printf '| %-58s | %-10s | %-10s | %-18s |\n' "$w" "$o" "$b" "$ra"
        done
    fi
    if [ "${#NOTES[@]}" -gt 0 ]; then
        echo
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
} | tee "$TMP/table.txt"
if [ -n "${BENCH_OUT:-}" ]; then cp "$TMP/table.txt" "$BENCH_OUT"; fi
