# Runs the libFuzzer harnesses of test/fuzz (test/fuzz/run.sh) for a bounded time each
# (FUZZ_SECONDS, default 20).  Skipped when clang with libFuzzer is not installed.
use strict;
use warnings;
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;

my $clang = $ENV{CLANG} // 'clang';
my ($out, $err) = ('', '');
if (!IPC::Run::run([ $clang, '--version' ], '>', \$out, '2>', \$err))
{
	plan skip_all => 'clang is not installed (apt-get install clang libclang-rt-14-dev)';
}
# libFuzzer present?
my $probe = PostgreSQL::Test::Utils::tempdir() . '/probe';
open my $f, '>', "$probe.c" or die;
print $f "#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return 0; }\n";
close $f;
if (!IPC::Run::run([ $clang, '-fsanitize=fuzzer,address', "$probe.c", '-o', $probe ], '>', \$out, '2>', \$err))
{
	plan skip_all => "clang cannot link libFuzzer: $err";
}

my $secs = $ENV{FUZZ_SECONDS} // 20;
my $dir = $ENV{TESTDIR} // '.';
my $ok = IPC::Run::run([ "$dir/test/fuzz/run.sh", $secs ], '>&', \$out);
my @runs = $out =~ /Done (\d+) runs/g;
note($_) for grep { /^== |Done \d+ runs|new_units_added|findings/ } split /\n/, $out;
ok($ok, "libFuzzer harnesses ran ${secs}s each without a crash, leak or timeout") or diag($out);
cmp_ok(scalar(@runs), '>=', 1, 'at least one harness ran');
done_testing();
