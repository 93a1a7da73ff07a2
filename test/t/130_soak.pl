# 130_soak.pl - a bounded soak: rounds of usage under mixed faults (processed-then-500,
# processed-then-lost, 500s, hangs, closed connections, 429s, slow answers), corrections
# that lower totals (cancels processed-then-500 or lost), duplicate
# identifiers answered in a random v1 form each time, a worker killed with SIGKILL (a
# crash restart of the server) and an immediate shutdown.  At the end Stripe must hold
# exactly what the test recorded, every identifier it holds must be recorded as sent, no
# request may have broken the spec, and export_status must say in sync everywhere.
# Bounded: the rounds stop after 90 s, the final settling after 90 s more.
# 131_soak_v2.pl runs this file with $UB_SOAK_API = 'v2' (the v2 meter event stream).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

our ($UB_KEY, %UB_BOOK);
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $seed = $ENV{UB_SOAK_SEED} // int(time() * 1000) % 2**31;
srand($seed);
note("seed $seed (set UB_SOAK_SEED to replay)");

our $UB_SOAK_API //= 'v1';
my $mock = ub_start_mock(v2 => $UB_SOAK_API eq 'v2');
ub_mock_post($mock, 'config', { dup_answer => 'random' });
my $node = ub_node('soak', $mock, q{
usage_billing.export_interval = 1
usage_billing.export_timeout = 2s
usage_billing.export_concurrency = 4
restart_after_crash = on
} . ($UB_SOAK_API eq 'v2' ? ub_v2_conf($mock) : ''));
ub_customers($node, 1, 20);

# Waits until the server takes queries again (after a crash restart).
sub up
{
	return ub_wait_for(sub { my ($r) = $node->psql('postgres', 'SELECT 1'); $r == 0 }, 60);
}

my @kinds = ([ '500_after' ], [ 'drop_after' ], [ '500' ], [ 'close' ], [ '429' ],
	[ 'hang', 1 ], [ 'slow', 0.3 ], [ '429_retry_after' ]);
my $started = time();
my ($rounds, $kills, $stops, $storage, $lowered) = (0, 0, 0, 0, 0);
while (time() - $started < 90 && $rounds < 16)
{
	$rounds++;
	for (1 .. 3)
	{
		my $k = $kinds[ int(rand(@kinds)) ];
		ub_mock_post($mock, 'faults', { kind => $k->[0], count => 1 + int(rand(3)),
			seconds => $k->[1] // 1, retry_after => 1 });
	}
	my @some = grep { rand() < 0.5 } 1 .. 20;
	@some = (1) unless @some;
	my $list = join(', ', map { "'c$_'" } @some);
	ub_add_usage($node, $list, 'api_calls', 1 + int(rand(5)));
	if ($rounds % 3 == 0)
	{
		# a correction lowers one customer's total: the worker cancels events Stripe holds
		# (through cancels processed-then-500 or lost) and resends the difference
		my $c = 1 + int(rand(20));
		my $held = $UB_BOOK{"c$c|api_calls|now()"} // 0;
		if ($held >= 2)
		{
			my $k = (qw(500_after drop_after 500 close))[ int(rand(4)) ];
			ub_mock_post($mock, 'adjustment_faults', { kind => $k, count => 1 });
			ub_add_usage($node, "'c$c'", 'api_calls', -(1 + int(rand($held - 1))));
			$lowered++;
		}
	}
	$storage = 1 + int(rand(100));
	ub_add_usage($node, q{'c1'}, 'storage', $storage, 1);
	$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
	sleep(0.5 + rand(1.5));
	if ($rounds % 5 == 0)
	{
		# SIGKILL of the worker: the postmaster restarts every backend (crash recovery)
		my $pid = ub_worker_pid($node);
		if ($pid ne '')
		{
			kill 'KILL', $pid;
			$kills++;
			sleep(0.5);
			ok(up(), "round $rounds: the server is back after the worker was killed");
		}
	}
	elsif ($rounds % 7 == 0)
	{
		$node->stop('immediate');
		$node->start;
		$stops++;
		ok(up(), "round $rounds: the server is back after an immediate stop");
	}
}
note(sprintf('%d rounds, %d corrections, %d kills, %d immediate stops in %.0f s',
	$rounds, $lowered, $kills, $stops, time() - $started));
ok($kills >= 1 || $rounds < 5, 'the worker was killed at least once');

# no more faults: let the export settle
ub_mock_post($mock, 'clear_faults');
my $settled = ub_wait_for(sub {
	return 0 unless up();
	my ($r, $pending) = $node->psql('postgres', q{SELECT (SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'pending')
  + (SELECT count(*) FROM usage_billing.export_cancels WHERE status = 'pending')});
	return 0 if $r != 0 || $pending ne '0';
	return JSON::PP->new->canonical->encode(ub_mock_totals($node, $mock))
	  eq JSON::PP->new->canonical->encode(ub_recorded_totals($node));
}, 90);
ok($settled, 'settled: Stripe holds exactly what the test recorded');
is_deeply(ub_mock_totals($node, $mock), ub_recorded_totals($node), 'Stripe totals per customer = the test\'s book');
my @mismatch = ub_identifier_mismatches($node, $mock);
is(scalar(@mismatch), 0, 'every identifier Stripe holds is recorded as sent, and only those')
  or diag(join("\n", @mismatch));
my $st = ub_mock_get($mock, 'stats');
is($st->{violations}, 0, 'no request broke the spec') or diag(explain($st->{violation_log}));
ok($st->{duplicates} > 0 || $st->{replays} > 0, "ambiguous answers were resolved ($st->{duplicates} duplicates, $st->{replays} replays)");
my $adj = ub_mock_get($mock, 'adjustments');
ok($lowered == 0 || $adj->{cancelled} > 0, "corrections reached Stripe as cancels ($adj->{cancelled} cancelled, $adj->{already} already cancelled)");
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_cancels WHERE status <> 'cancelled'}), '0',
	'every cancel done (none refused)');
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'failed'}), '0',
	'no row failed');
ok(ub_wait_for(sub { (ub_mock_get($mock, 'last')->{'cus_1|storage_gb'} // -1) == $storage }, 30),
	"the max meter's latest value ($storage) reached Stripe");
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_status WHERE state <> 'in_sync'}), '0',
	'export_status: in sync everywhere');

ok(ub_mock_get($mock, 'v2')->{events} > 0 && ub_mock_get($mock, 'stats')->{requests} == ub_mock_get($mock, 'v2')->{requests},
	'every meter event went through the v2 stream') if $UB_SOAK_API eq 'v2';

$node->stop;
done_testing();
