#!/bin/bash
# test/fuzz/run.sh [SECONDS]: builds the libFuzzer harnesses (clang -fsanitize=fuzzer,address)
# and runs each for a bounded time (SECONDS, else $FUZZ_SECONDS, else 20 s) on its corpus in
# test/fuzz/corpus/<name>.  test/run_tests.sh runs it as its "fuzz" stage.
# Needs clang and libFuzzer: apt-get install clang libclang-rt-14-dev (fails loudly without).
# New inputs found go to a scratch directory, not to the kept corpus (pass KEEP=1 to merge
# them in).  Prints one line per harness, "fuzz NAME: ok (...)" or "fuzz NAME: FAILED (...)"
# (libFuzzer's own output only on failure).  Exit status: 0 when no harness found a crash, a
# leak or a timeout.
#
# Feasible here: the Stripe answer handling of src/export/stripe_client.c (pure C: libcurl, cJSON).
# Not feasible standalone: tier parsing and pricing (src/pricing/pricing.c) and billing-period
# arithmetic (src/util/periods.c) are written on PostgreSQL's numeric, jsonb and timestamp code,
# which lives in the server binary and cannot be linked into a fuzzer; they are fuzzed at the
# SQL level by test/t/080_sql_fuzz.pl instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-${FUZZ_SECONDS:-20}}
pg_config=${PG_CONFIG:-pg_config}
cc=${CLANG:-clang}
if ! command -v "$cc" >/dev/null; then
	echo "test/fuzz/run.sh: $cc not found: apt-get install clang libclang-rt-14-dev" >&2
	exit 1
fi
inc=$($pg_config --includedir-server)
libdir=$($pg_config --libdir)
pkglibdir=$($pg_config --pkglibdir)
# libpgcommon/libpgport: the frontend builds (palloc, StringInfo, snprintf, pg_prng)
for d in "$libdir" "$pkglibdir" "$(dirname "$pkglibdir")"; do
	[ -f "$d/libpgcommon.a" ] && { pglib=$d; break; }
done
: "${pglib:?libpgcommon.a not found}"
out=${FUZZ_OUT:-$(mktemp -d /tmp/ub-fuzz.XXXXXX)}
status=0
for src in "$here"/*_fuzzer.c; do
	name=$(basename "$src" _fuzzer.c)
	bin=$out/${name}_fuzzer
	$cc -g -O1 -w -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
		-I"$inc" -I"$here/../../src" -I"$here/../../src/util" -I"$here/../../src/export" "$src" -o "$bin" \
		"$pglib/libpgcommon.a" "$pglib/libpgport.a" -lcurl -lcjson -lm
	mkdir -p "$out/$name.new"
	log=$out/$name.log
	echo "fuzz $name: running for ${secs}s"
	rc=0
	(cd "$out" && "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
		-print_final_stats=1 "$out/$name.new" "$here/corpus/$name" >"$log" 2>&1) || rc=$?
	# one line per harness (test/run_tests.sh counts them); libFuzzer's full output, which ends
	# with its recommended dictionary, stays in $log and is shown (without that list) on failure
	runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n 1)
	if [ "$rc" -eq 0 ] && [ -n "$runs" ] &&
		! ls "$out"/crash-* "$out"/leak-* "$out"/timeout-* "$out"/oom-* >/dev/null 2>&1; then
		echo "fuzz $name: ok ($runs, no crash, leak or timeout)"
	else
		status=1
		sed '/^###### Recommended dictionary/,/^###### End of recommended dictionary/d' "$log" | tail -n 40
		echo "fuzz $name: FAILED (exit $rc${runs:+, $runs}; findings and the full log in $out)"
	fi
	if [ "${KEEP:-0}" = 1 ]; then
		"$bin" -merge=1 "$here/corpus/$name" "$out/$name.new" >/dev/null 2>&1 || true
	fi
done
if [ $status = 0 ] && [ -z "${FUZZ_OUT:-}" ]; then rm -rf "$out"; fi
exit $status
