#!/bin/bash
# export_bench.sh - throughput and memory of the export worker against the mock, over
# Stripe's v1 meter events (one event per request) and the v2 meter event stream (up to
# 100 events per request), in the same run.
#
#   test/bench/export_bench.sh [PG_BINDIR] [CUSTOMERS] [ROUNDS] [CONCURRENCY] [MAX_RPS] [APIS]
#
# MAX_RPS (default 100000, i.e. no ceiling) sets usage_billing.export_max_rps (requests per
# second: for v2 a request carries up to 100 events): with a ceiling below what the worker
# reaches, events/s shows how close it stays to the ceiling.  APIS (default "v1 v2") are the
# values of usage_billing.stripe_api measured, one after the other on the same cluster.
# EXPORT_BATCH_SIZE in the environment sets usage_billing.export_batch_size (default 500).
#
# Creates a scratch cluster (port 5498, socket in its directory, no TCP), a mock Stripe on
# 127.0.0.1 (its API port and its events port), CUSTOMERS customers with one sum meter, and
# then, per API, ROUNDS times adds usage to every customer and runs export_now(): every
# round is CUSTOMERS meter events.  Prints events/s per round and the worker's memory (VmRSS
# = RssAnon, the worker's own memory, + RssFile + RssShmem, shared buffers it touched) before
# the first and after the last round; per API the export events/s (the time from
# export_now() until every row is in sync, usage inserts not counted) and the overall
# events/s; then "export: v1 X events/s, v2 Y events/s, v2/v1 R" and a line
# "RESULT api=events/s ..." that test/bench/run.sh reads.  Each API gets one round of warm-up
# first (not counted), and the run checks that Stripe (the mock) holds exactly the exported
# totals.  Run it as the cluster owner (or as root: it switches to postgres).  Benchmarks
# print numbers; they are not tests.
set -euo pipefail
BIN=${1:-$(pg_config --bindir)}
N=${2:-2000}
ROUNDS=${3:-50}
CONC=${4:-8}
RPS=${5:-100000}
APIS=${6:-v1 v2}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
D=$(mktemp -d /tmp/ub_bench.XXXXXX)
KEY=sk_test_bench
RUN=()
if [ "$(id -u)" = 0 ]; then chown postgres "$D"; RUN=(runuser -u postgres --); fi

cleanup() {
	"${RUN[@]}" "$BIN/pg_ctl" -D "$D/data" -m immediate stop >/dev/null 2>&1 || true
	[ -n "${MOCK_PID:-}" ] && kill "$MOCK_PID" 2>/dev/null || true
	rm -rf "$D"
}
trap cleanup EXIT

python3 "$HERE/test/mock_stripe.py" --port-file "$D/port" --events-port-file "$D/events_port" \
	--key $KEY --lifetime 3600 >/dev/null &
MOCK_PID=$!
for i in $(seq 50); do [ -s "$D/port" ] && break; sleep 0.1; done
PORT=$(head -n 1 "$D/port")
EPORT=$(head -n 1 "$D/events_port")
MOCK=http://127.0.0.1:$PORT

"${RUN[@]}" "$BIN/initdb" -D "$D/data" -A trust >/dev/null
cat >> "$D/data/postgresql.conf" <<EOC
shared_preload_libraries = 'usage_billing'
listen_addresses = ''
unix_socket_directories = '$D'
port = 5498
usage_billing.stripe_api_key = '$KEY'
usage_billing.stripe_api_base = '$MOCK'
usage_billing.stripe_meter_events_base = 'http://127.0.0.1:$EPORT'
usage_billing.export_interval = 0
usage_billing.export_max_rps = $RPS
usage_billing.export_concurrency = $CONC
usage_billing.export_batch_size = ${EXPORT_BATCH_SIZE:-500}
EOC
"${RUN[@]}" "$BIN/pg_ctl" -D "$D/data" -l "$D/log" -w start >/dev/null
psql() { "${RUN[@]}" "$BIN/psql" -h "$D" -p 5498 -X -q -At -d postgres "$@"; }

psql -c "CREATE EXTENSION usage_billing" \
     -c "SELECT usage_billing.create_plan('basic')" \
     -c "SELECT usage_billing.create_meter('api_calls', 'sum', stripe_event_name => 'api_calls')" \
     -c "SELECT usage_billing.upsert_customer('c' || i, 'basic', NULL, 'cus_' || i) FROM generate_series(1, $N) i" >/dev/null
WPID=$(psql -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'usage_billing export worker'")
mem() { grep -E '^(VmRSS|RssAnon|RssShmem)' /proc/$WPID/status | tr -s ' \t' ' ' | tr '\n' ' '; }
mock() { curl -s "$MOCK/_mock/$1"; }
jfield() { python3 -c "import json,sys; print(json.load(sys.stdin).get('$1'))"; }
echo "customers=$N rounds=$ROUNDS concurrency=$CONC max_rps=$RPS apis=\"$APIS\" worker pid=$WPID"
echo "memory before: $(mem)"

# round: one round of usage and export; sets T_EXPORT (seconds from export_now() to in sync)
round() {
	psql -c "INSERT INTO usage_billing.usage_aggregates AS a (customer_id, meter, period_start, period_end, total)
	         SELECT c.customer_id, 'api_calls', pb.period_start, pb.period_end, 1
	           FROM usage_billing.customers c
	          CROSS JOIN LATERAL usage_billing.period_bounds(c.billing_anchor, '1 month', now()) pb
	         ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET total = a.total + 1" >/dev/null
	local t0 t1 left
	t0=$(date +%s.%N)
	psql -c "SELECT usage_billing.export_now()" >/dev/null
	while :; do
		left=$(psql -c "SELECT count(*) FROM usage_billing.export_status WHERE state <> 'in_sync'")
		[ "$left" = 0 ] && break
		sleep 0.05
	done
	t1=$(date +%s.%N)
	T_EXPORT=$(echo "$t1 - $t0" | bc)
}

RESULT="RESULT"
SUMMARY=()
done_rounds=0
for api in $APIS; do
	psql -c "ALTER SYSTEM SET usage_billing.stripe_api = '$api'" -c "SELECT pg_reload_conf()" >/dev/null
	sleep 1
	# warm-up (not counted): the worker has taken the setting when the events go its way
	v2_before=$(mock v2 | jfield events)
	round
	done_rounds=$((done_rounds + 1))
	v2_after=$(mock v2 | jfield events)
	if [ "$api" = v2 ] && [ "$v2_after" -lt $((v2_before + N)) ]; then
		echo "ERROR: api v2: the warm-up round did not go through the stream" >&2; exit 1
	fi
	if [ "$api" = v1 ] && [ "$v2_after" != "$v2_before" ]; then
		echo "ERROR: api v1: the warm-up round went through the stream" >&2; exit 1
	fi
	req0=$(mock stats | jfield requests)
	total=0
	t_exp=0
	t_all=$(date +%s.%N)
	for r in $(seq "$ROUNDS"); do
		round
		done_rounds=$((done_rounds + 1))
		total=$((total + N))
		t_exp=$(echo "$t_exp + $T_EXPORT" | bc)
		if [ "$r" = 1 ] || [ $((r % 10)) = 0 ] || [ "$r" = "$ROUNDS" ]; then
			printf '%s round %3d: %d events in %.2f s = %.0f events/s; exported so far %d; %s\n' \
				"$api" "$r" "$N" "$T_EXPORT" "$(echo "$N / $T_EXPORT" | bc -l)" "$total" "$(mem)"
		fi
	done
	t_end=$(date +%s.%N)
	req1=$(mock stats | jfield requests)
	eps=$(echo "$total / $t_exp" | bc -l)
	printf '%s: %d events in %d requests; export %.0f events/s (%.1f s exporting), overall %.0f events/s (%.1f s, usage inserts and polling included)\n' \
		"$api" "$total" $((req1 - req0)) "$eps" "$t_exp" "$(echo "$total / ($t_end - $t_all)" | bc -l)" \
		"$(echo "$t_end - $t_all" | bc)"
	RESULT="$RESULT $api=$(printf '%.0f' "$eps")"
	SUMMARY+=("$api $(printf '%.0f' "$eps") events/s")
done
echo "memory after:  $(mem)"
echo "mock: $(mock stats)"
echo "mock v2: $(mock v2)"
got=$(mock totals | python3 -c "import json,sys; print(json.load(sys.stdin).get('cus_1|api_calls'))")
echo "check: mock total for cus_1 = $got (expected $done_rounds)"
[ "$got" = "$done_rounds" ] || { echo "ERROR: the mock holds $got for cus_1, not $done_rounds" >&2; exit 1; }
dups=$(mock stats | jfield duplicates)
echo "check: $dups duplicate identifiers received"
line="export: $(IFS=,; echo "${SUMMARY[*]}" | sed "s/,/, /g")"
v1=$(sed -n 's/.* v1=\([0-9]*\).*/\1/p' <<<"$RESULT")
v2=$(sed -n 's/.* v2=\([0-9]*\).*/\1/p' <<<"$RESULT")
if [ -n "$v1" ] && [ -n "$v2" ] && [ "$v1" -gt 0 ]; then
	line="$line, v2/v1 $(awk -v a="$v2" -v b="$v1" 'BEGIN { printf "%.2fx", a / b }')"
fi
echo "$line"
echo "$RESULT"
