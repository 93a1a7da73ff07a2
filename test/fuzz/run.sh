#!/bin/bash
# test/fuzz/run.sh [SECONDS]: builds the libFuzzer harnesses (clang -fsanitize=fuzzer,address)
# and runs each for a bounded time (SECONDS, else $FUZZ_SECONDS, else 20 s) on its corpus in
# test/fuzz/corpus/<name>.  test/run_tests.sh runs it as its "fuzz" stage.
# Needs clang and libFuzzer: apt-get install clang libclang-rt-14-dev (fails loudly without).
# New inputs found go to a scratch directory, not to the kept corpus (pass KEEP=1 to merge
# them in).  Exit status: 0 when no harness found a crash, a leak or a timeout.
#
# Feasible here: the Stripe answer handling of src/stripe_client.c (pure C: libcurl, cJSON).
# Not feasible standalone: tier parsing and pricing (src/pricing.c) and billing-period
# arithmetic (src/periods.c) are written on PostgreSQL's numeric, jsonb and timestamp code,
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
for name in stripe_answer; do
	bin=$out/${name}_fuzzer
	$cc -g -O1 -w -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
		-I"$inc" -I"$here/../../src" "$here/${name}_fuzzer.c" -o "$bin" \
		"$pglib/libpgcommon.a" "$pglib/libpgport.a" -lcurl -lcjson -lm
	mkdir -p "$out/$name.new"
	echo "== $name: ${secs}s"
	if ! (cd "$out" && "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
			-print_final_stats=1 "$out/$name.new" "$here/corpus/$name" 2>&1 | tail -n 25); then
		status=1
	fi
	if ls "$out"/crash-* "$out"/leak-* "$out"/timeout-* >/dev/null 2>&1; then
		echo "!! $name: findings in $out"
		status=1
	fi
	if [ "${KEEP:-0}" = 1 ]; then
		"$bin" -merge=1 "$here/corpus/$name" "$out/$name.new" >/dev/null 2>&1 || true
	fi
done
if [ $status = 0 ] && [ -z "${FUZZ_OUT:-}" ]; then rm -rf "$out"; fi
exit $status
