#!/bin/bash
# export_bench.sh - throughput and memory of the export worker against the mock.
#
#   test/bench/export_bench.sh [PG_BINDIR] [CUSTOMERS] [ROUNDS] [CONCURRENCY] [MAX_RPS]
#
# MAX_RPS (default 100000, i.e. no ceiling) sets usage_billing.export_max_rps: with a ceiling
# below what the worker reaches, events/s shows how close it stays to the ceiling.
#
# Creates a scratch cluster (port 5498, socket in its directory, no TCP), a mock
# Stripe on 127.0.0.1, CUSTOMERS customers with one sum meter, and then ROUNDS
# times adds usage to every customer and runs export_now(): every round is
# CUSTOMERS meter events.  Prints events/s per round and the worker's memory
# (VmRSS = RssAnon, the worker's own memory, + RssFile + RssShmem, shared buffers it touched) before the first and after the last round.  Run it as the
# cluster owner (or as root: it switches to postgres).  Benchmarks print numbers;
# they are not tests.
set -euo pipefail
BIN=${1:-$(pg_config --bindir)}
N=${2:-2000}
ROUNDS=${3:-50}
CONC=${4:-8}
RPS=${5:-100000}
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

python3 "$HERE/test/mock_stripe.py" --port-file "$D/port" --key $KEY --lifetime 1800 >/dev/null &
MOCK_PID=$!
for i in $(seq 50); do [ -s "$D/port" ] && break; sleep 0.1; done
PORT=$(cat "$D/port")

"${RUN[@]}" "$BIN/initdb" -D "$D/data" -A trust >/dev/null
cat >> "$D/data/postgresql.conf" <<EOC
shared_preload_libraries = 'usage_billing'
listen_addresses = ''
unix_socket_directories = '$D'
port = 5498
usage_billing.stripe_api_key = '$KEY'
usage_billing.stripe_api_base = 'http://127.0.0.1:$PORT'
usage_billing.export_interval = 0
usage_billing.export_max_rps = $RPS
usage_billing.export_concurrency = $CONC
usage_billing.export_batch_size = 500
EOC
"${RUN[@]}" "$BIN/pg_ctl" -D "$D/data" -l "$D/log" -w start >/dev/null
psql() { "${RUN[@]}" "$BIN/psql" -h "$D" -p 5498 -X -q -At -d postgres "$@"; }

psql -c "CREATE EXTENSION usage_billing" \
     -c "SELECT usage_billing.create_plan('basic')" \
     -c "SELECT usage_billing.create_meter('api_calls', 'sum', stripe_event_name => 'api_calls')" \
     -c "SELECT usage_billing.upsert_customer('c' || i, 'basic', NULL, 'cus_' || i) FROM generate_series(1, $N) i" >/dev/null
WPID=$(psql -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'usage_billing export worker'")
mem() { grep -E '^(VmRSS|RssAnon|RssShmem)' /proc/$WPID/status | tr -s ' \t' ' ' | tr '\n' ' '; }
echo "customers=$N rounds=$ROUNDS concurrency=$CONC worker pid=$WPID"
echo "memory before: $(mem)"

total=0
t_all=$(date +%s.%N)
for r in $(seq "$ROUNDS"); do
	psql -c "INSERT INTO usage_billing.usage_aggregates AS a (customer_id, meter, period_start, period_end, total)
	         SELECT c.customer_id, 'api_calls', pb.period_start, pb.period_end, 1
	           FROM usage_billing.customers c
	          CROSS JOIN LATERAL usage_billing.period_bounds(c.billing_anchor, '1 month', now()) pb
	         ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET total = a.total + 1" >/dev/null
	t0=$(date +%s.%N)
	psql -c "SELECT usage_billing.export_now()" >/dev/null
	while :; do
		left=$(psql -c "SELECT count(*) FROM usage_billing.export_status WHERE state <> 'in_sync'")
		[ "$left" = 0 ] && break
		sleep 0.05
	done
	t1=$(date +%s.%N)
	total=$((total + N))
	if [ "$r" = 1 ] || [ $((r % 10)) = 0 ] || [ "$r" = "$ROUNDS" ]; then
		printf 'round %3d: %d events in %.2f s = %.0f events/s; exported so far %d; %s\n' \
			"$r" "$N" "$(echo "$t1 - $t0" | bc)" "$(echo "$N / ($t1 - $t0)" | bc -l)" "$total" "$(mem)"
	fi
done
t_end=$(date +%s.%N)
printf 'overall: %d events in %.1f s = %.0f events/s (including usage inserts and polling)\n' \
	"$total" "$(echo "$t_end - $t_all" | bc)" "$(echo "$total / ($t_end - $t_all)" | bc -l)"
echo "memory after:  $(mem)"
echo "mock: $(curl -s "http://127.0.0.1:$PORT/_mock/stats")"
echo "check: mock total for cus_1 = $(curl -s "http://127.0.0.1:$PORT/_mock/totals" | python3 -c "import json,sys; print(json.load(sys.stdin).get('cus_1|api_calls'))") (expected $ROUNDS)"
