# A Citus cluster: a coordinator and two workers on loopback, distributed with one call of
# usage_billing.distribute_with_citus() (what the README's "Scaling out" says to do), then
#  - the call refuses clearly where Citus is missing, and a second call changes nothing;
#  - the contract's recording calls through the coordinator (routed to the customer's worker)
#    and straight on a worker: single, keyed retry, batch, reservations, duration; every total
#    a call returns is what Citus reads from the shards, and the workers' shell tables stay
#    empty, with the settings that lost usage on 1.3 (direct_reads on, catalog preload on);
#  - reads: check_limit, summaries, preview_invoice, plan changes, corrections;
#  - a hard cap under 8 concurrent clients, on the coordinator and a worker at once, stops at
#    exactly the limit;
#  - a limit, a plan change and a new customer are seen at once by connections that already
#    served calls, on every node;
#  - a shard move in the middle of recording loses and doubles nothing;
#  - the coordinator's export worker sends Stripe (the mock) exactly what the test recorded,
#    once, although every node runs an export worker.
# Without Citus the whole file is skipped ("skipped: citus not installed").
use strict;
use warnings;
use IPC::Run;
use Time::HiRes qw(sleep time);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $pkglibdir = `pg_config --pkglibdir`;
chomp $pkglibdir;
plan skip_all => 'citus not installed' unless $pkglibdir && -f "$pkglibdir/citus.so";

do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";
our $UB_KEY;
my $mock = ub_start_mock();

# --- the cluster --------------------------------------------------------------------------
sub citus_node
{
	my ($name) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'citus,usage_billing'
listen_addresses = '127.0.0.1'
max_connections = 100
timezone = 'UTC'
usage_billing.database = 'postgres'
usage_billing.export_interval = 3600
usage_billing.stripe_api_key = '$UB_KEY'
usage_billing.stripe_api_base = '$mock->{url}'
usage_billing.export_max_rps = 1000
usage_billing.export_backoff_base = 100ms
usage_billing.export_backoff_max = 1s
# what lost usage on 1.3: index probes by relation name, the whole catalog preloaded
usage_billing.direct_reads = on
usage_billing.catalog_preload_limit = 100000
citus.shard_count = 8
});
	$node->append_conf('pg_hba.conf', "host all all 127.0.0.1/32 trust\n");
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION citus');
	return $node;
}

my $coord = citus_node('coord');
my @workers = (citus_node('worker1'), citus_node('worker2'));
my @nodes = ($coord, @workers);

# A database with the library but not the Citus extension: the call must refuse.
$coord->safe_psql('postgres', 'CREATE DATABASE plain');
$coord->safe_psql('plain', 'CREATE EXTENSION usage_billing');
my ($rc, $out, $err) = $coord->psql('plain', 'SELECT usage_billing.distribute_with_citus()',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+0A000: Citus is not installed/, 'without Citus: 0A000');
like($err, qr/HINT:.*CREATE EXTENSION citus/, 'without Citus: the hint says what to do');

$coord->safe_psql('postgres', "SELECT citus_set_coordinator_host('127.0.0.1', " . $coord->port . ")");
$coord->safe_psql('postgres', "SELECT citus_add_node('127.0.0.1', " . $_->port . ")") for @workers;
# created on the coordinator after the workers joined: Citus creates it on every node
$coord->safe_psql('postgres', 'CREATE EXTENSION usage_billing');

($rc, $out, $err) = $coord->psql('postgres', 'SELECT usage_billing.distribute_with_citus()');
is($rc, 0, 'distribute_with_citus() succeeds') or diag($err);
like($err, qr/NOTICE:  usage_billing distributed with Citus/, 'it says what it did');
($rc, $out, $err) = $coord->psql('postgres', 'SELECT usage_billing.distribute_with_citus()');
is($rc, 0, 'a second call succeeds');
like($err, qr/already distributed: nothing to do/, 'a second call changes nothing and says so');

is($coord->safe_psql('postgres', q{
SELECT string_agg(logicalrelid::regclass::text || ':' || partmethod::text, ',' ORDER BY logicalrelid::regclass::text)
  FROM pg_dist_partition WHERE partmethod = 'n'}),
	'usage_billing.export_epoch:n,usage_billing.meters:n,usage_billing.plan_limits:n,'
	  . 'usage_billing.plans:n,usage_billing.settings:n',
	'the catalog is in reference tables');
is($coord->safe_psql('postgres', q{
SELECT count(*) FROM pg_class c
 WHERE c.relnamespace = 'usage_billing'::regnamespace AND c.relkind = 'r'
   AND NOT EXISTS (SELECT 1 FROM pg_dist_partition d WHERE d.logicalrelid = c.oid)}),
	'0', 'no table of the schema is left local on the coordinator');
is($coord->safe_psql('postgres', q{
SELECT count(DISTINCT colocationid) FROM pg_dist_partition
 WHERE partmethod = 'h' AND logicalrelid::text LIKE 'usage_billing.%'}),
	'1', 'every customer table is co-located with customers');
is($coord->safe_psql('postgres', q{
SELECT count(*) FROM pg_dist_object o JOIN pg_dist_partition p
    ON p.logicalrelid = 'usage_billing.customers'::regclass AND p.colocationid = o.colocationid
 WHERE o.classid = 'pg_proc'::regclass AND o.distribution_argument_index = 0
   AND o.objid IN ('usage_billing.increment_usage(text,text,numeric,text,timestamptz,jsonb)'::regprocedure,
                   'usage_billing.check_limit(text,text,numeric)'::regprocedure,
                   'usage_billing.reserve_usage(text,text,numeric,interval,text)'::regprocedure,
                   'usage_billing.get_usage_summary(text,timestamptz,timestamptz)'::regprocedure,
                   'usage_billing.preview_invoice(text,timestamptz)'::regprocedure)}),
	'5', 'the per-customer functions are routed by customer_id');

$coord->safe_psql('postgres', q{
SELECT usage_billing.create_plan('basic', 10);
SELECT usage_billing.create_plan('pro', 50);
SELECT usage_billing.create_meter('api_calls', 'sum', stripe_event_name => 'api_calls');
SELECT usage_billing.create_meter('seconds', 'duration', unit => 'seconds');
SELECT usage_billing.set_plan_limit('basic', 'api_calls', included => 100000, overage_price => 0.01);
SELECT usage_billing.set_plan_limit('pro', 'api_calls', included => 1000000, overage_price => 0.001);
SELECT usage_billing.upsert_customer('c' || i, 'basic', NULL, 'cus_' || i) FROM generate_series(1, 20) i;
});

# --- recording lands in the shards ------------------------------------------------------------
# Citus' own reading of a customer's total (routed to its shard), and the sum over every shard.
sub citus_total
{
	my ($c, $meter) = @_;
	$meter //= 'api_calls';
	return $coord->safe_psql('postgres', qq{
SELECT coalesce(sum(total), 0) FROM usage_billing.usage_aggregates
 WHERE customer_id = '$c' AND meter = '$meter'});
}

sub shards_total
{
	return $coord->safe_psql('postgres', q{
SELECT sum(result::numeric) FROM run_command_on_shards('usage_billing.usage_aggregates',
    'SELECT coalesce(sum(total), 0) FROM %s')});
}

my %book;    # what the test recorded, per customer
my $last;
for my $i (1 .. 10)
{
	$last = $coord->safe_psql('postgres',
		"SELECT total FROM usage_billing.increment_usage('c1', 'api_calls', $i)");
	$book{c1} += $i;
}
is($last, $book{c1}, 'routed increment_usage on the coordinator returns the running total');
is(citus_total('c1'), $last, "Citus reads the call's total from the shard");

# straight on each worker, for customers whose shard may be on the other node
for my $w (0, 1)
{
	for my $c ('c2', 'c3', 'c4')
	{
		$last = $workers[$w]->safe_psql('postgres',
			"SELECT total FROM usage_billing.increment_usage('$c', 'api_calls', 7)");
		$book{$c} += 7;
		is($last, $book{$c}, "increment_usage on worker " . ($w + 1) . " for $c returns $book{$c}");
	}
}
is(citus_total($_), $book{$_}, "Citus holds the total of $_") for ('c2', 'c3', 'c4');

# a keyed retry is a duplicate, on any node
is($coord->safe_psql('postgres',
		"SELECT total || '|' || duplicate FROM usage_billing.increment_usage('c5', 'api_calls', 5, 'key-1')"),
	'5|false', 'a keyed call records');
$book{c5} += 5;
is($workers[0]->safe_psql('postgres',
		"SELECT total || '|' || duplicate FROM usage_billing.increment_usage('c5', 'api_calls', 5, 'key-1')"),
	'5|true', 'its retry on a worker is a duplicate');
($rc, $out, $err) = $workers[1]->psql('postgres',
	"SELECT * FROM usage_billing.increment_usage('c5', 'api_calls', 6, 'key-1')",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/23505/, 'the same key with other parameters is 23505, not an internal error');

# a batch of several customers through the coordinator
is($coord->safe_psql('postgres', q{
SELECT accepted || '|' || duplicates FROM usage_billing.increment_usage_batch(
  '[{"customer_id": "c6", "meter": "api_calls", "amount": 3},
    {"customer_id": "c7", "meter": "api_calls", "amount": 4, "idempotency_key": "b-1"},
    {"customer_id": "c8", "meter": "api_calls", "amount": 5},
    {"customer_id": "c7", "meter": "api_calls", "amount": 4, "idempotency_key": "b-1"}]')}),
	'3|1', 'a batch of three customers: three accepted, one duplicate');
$book{c6} += 3;
$book{c7} += 4;
$book{c8} += 5;
is(citus_total($_), $book{$_}, "the batch's usage of $_ is in its shard") for ('c6', 'c7', 'c8');

# reservations: reserve (routed), commit and release by id
my $rid = $coord->safe_psql('postgres',
	"SELECT reservation_id FROM usage_billing.reserve_usage('c9', 'api_calls', 30)");
like($rid, qr/^[0-9a-f-]{36}$/, 'reserve_usage returns a reservation');
is($coord->safe_psql('postgres',
		"SELECT total || '|' || duplicate FROM usage_billing.commit_reservation('$rid', 25)"),
	'25|false', 'commit_reservation records the actual amount');
is($coord->safe_psql('postgres',
		"SELECT total || '|' || duplicate FROM usage_billing.commit_reservation('$rid', 25)"),
	'25|true', 'a repeated commit is a duplicate');
$book{c9} += 25;
my $rid2 = $workers[1]->safe_psql('postgres',
	"SELECT reservation_id FROM usage_billing.reserve_usage('c9', 'api_calls', 40)");
$workers[0]->safe_psql('postgres', "SELECT usage_billing.release_reservation('$rid2')");
is($coord->safe_psql('postgres',
		"SELECT status FROM usage_billing.reservations WHERE reservation_id = '$rid2'"),
	'released', 'release_reservation on another worker releases it');
is(citus_total('c9'), $book{c9}, "the committed reservation is in c9's shard");

# duration
is($coord->safe_psql('postgres', q{
SELECT total FROM usage_billing.record_duration('c10', 'seconds', now() - interval '90 seconds', now())}),
	'90', 'record_duration through the coordinator');
is(citus_total('c10', 'seconds'), '90', "the duration is in c10's shard");

# the shells on the workers (the extension's own tables, which Citus plans against) never got a
# row: what 1.3 wrote there was lost to Citus.  pg_relation_size counts dead rows' pages too.
for my $w (0, 1)
{
	is($workers[$w]->safe_psql('postgres', q{
SELECT pg_relation_size('usage_billing.usage_aggregates') + pg_relation_size('usage_billing.usage_events')
     + pg_relation_size('usage_billing.reservations')}),
		'0', 'worker ' . ($w + 1) . ': nothing was ever written outside a shard');
}
my $expected_all = 0;
$expected_all += $book{$_} for keys %book;
is(shards_total(), $expected_all + 90, 'the shards hold exactly what the test recorded, nothing elsewhere');

# --- reads -----------------------------------------------------------------------------------
like($coord->safe_psql('postgres',
		"SELECT allowed || '|' || current FROM usage_billing.check_limit('c1', 'api_calls', 1)"),
	qr/^true\|$book{c1}$/, 'check_limit reads the shard');
is($workers[1]->safe_psql('postgres',
		"SELECT total FROM usage_billing.get_usage_summary('c2') WHERE meter = 'api_calls'"),
	$book{c2}, 'get_usage_summary on a worker');
is($coord->safe_psql('postgres',
		"SELECT amount FROM usage_billing.preview_invoice('c1') WHERE line = 'base'"),
	'10.00', 'preview_invoice');
is($coord->safe_psql('postgres',
		"SELECT plan FROM usage_billing.change_plan('c11', 'pro', 'immediate')"),
	'pro', 'change_plan');
is($coord->safe_psql('postgres', "SELECT count(*) FROM usage_billing.plan_history WHERE customer_id = 'c11'"),
	'2', 'plan_history');
is($coord->safe_psql('postgres',
		"SELECT sum(usage) FROM usage_billing.usage_history('c1', 'api_calls', now() - interval '1 day')"),
	$book{c1}, 'usage_history');
is($workers[0]->safe_psql('postgres',
		"SELECT total FROM usage_billing.current_usage WHERE customer_id = 'c2' AND meter = 'api_calls'"),
	$book{c2}, 'current_usage');
($rc, $out, $err) = $coord->psql('postgres', 'SELECT * FROM usage_billing.alerts',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+0A000/, 'the alerts view is refused with 0A000 (read alert_log and pending_alerts())');
$coord->safe_psql('postgres', "SELECT usage_billing.void_usage('c5', 'key-1', 'test')");
is(citus_total('c5'), '0', 'void_usage');
$book{c5} = 0;

# --- a hard cap under 8 clients, on two nodes at once ----------------------------------------
$coord->safe_psql('postgres', q{
SELECT usage_billing.upsert_customer('cap', 'basic');
SELECT usage_billing.set_customer_limit('cap', 'api_calls', 40, true);
});
my $dir = $coord->basedir . '/load';
mkdir $dir or die "mkdir $dir: $!";
open my $f, '>', "$dir/cap.sql" or die;
print $f q{DO $$
BEGIN
    PERFORM usage_billing.increment_usage('cap', 'api_calls', 1);
EXCEPTION WHEN SQLSTATE 'PT402' THEN
    NULL;
END $$;
};
close $f;

sub start_bench
{
	my ($node, $script, $clients, $transactions) = @_;
	my ($o, $e) = ('', '');
	my $h = IPC::Run::start(
		[ 'pgbench', '--no-vacuum', "--client=$clients", '--jobs=2',
		  "--transactions=$transactions", '-f', $script, $node->connstr('postgres') ],
		'>', \$o, '2>', \$e);
	return { h => $h, out => \$o, err => \$e };
}

sub finish_bench
{
	my ($b, $name) = @_;
	$b->{h}->finish;
	my ($n) = ${ $b->{out} } =~ /number of transactions actually processed: (\d+)/;
	ok(defined $n && $n > 0 && ${ $b->{err} } !~ /ERROR|aborted/,
		"$name: the clients ran without an unexpected error (" . ($n // 'no') . " calls)")
	  or diag(${ $b->{out} } . ${ $b->{err} });
	return $n // 0;
}

my @loads = (start_bench($coord, "$dir/cap.sql", 4, 20), start_bench($workers[0], "$dir/cap.sql", 4, 20));
finish_bench($loads[0], 'hard cap, coordinator');
finish_bench($loads[1], 'hard cap, worker 1');
is(citus_total('cap'), '40', '160 calls by 8 clients on two nodes stop at exactly the hard cap of 40');
is($coord->safe_psql('postgres',
		"SELECT count(*) FROM usage_billing.usage_events WHERE customer_id = 'cap'"),
	'40', 'and the ledger holds exactly 40 events');

# --- caches: connections that already served calls see catalog changes at once ---------------
# A psql that stays connected; query() sends one statement and waits (bounded) for its answer.
sub session
{
	my ($node) = @_;
	my $s = { in => '', out => '', err => '' };
	$s->{h} = IPC::Run::start(
		[ 'psql', '-X', '-A', '-t', '-q', '-d', $node->connstr('postgres') ],
		'<', \$s->{in}, '>', \$s->{out}, '2>', \$s->{err});
	return $s;
}

sub query
{
	my ($s, $sql) = @_;
	$s->{out} = '';
	$s->{err} = '';
	$s->{in} .= "$sql;\n\\echo __end__\n";
	my $deadline = time() + 60;
	$s->{h}->pump until $s->{out} =~ /__end__/ || time() > $deadline;
	my $o = $s->{out};
	$o =~ s/__end__\n?//;
	chomp $o;
	return ($o, $s->{err});
}

$coord->safe_psql('postgres', "SELECT usage_billing.upsert_customer('cached', 'basic')");
my @sessions = map { session($_) } @nodes;
my @names = ('coordinator', 'worker 1', 'worker 2');
for my $i (0 .. 2)
{
	my ($o, $e) = query($sessions[$i],
		"SELECT status FROM usage_billing.check_limit('cached', 'api_calls', 100)");
	is($o, 'ok', "$names[$i]: a connection serves calls (catalog read)") or diag($e);
}
# a hard cap of 40 set on the coordinator
$coord->safe_psql('postgres', "SELECT usage_billing.set_customer_limit('cached', 'api_calls', 40, true)");
for my $i (0 .. 2)
{
	my ($o, $e) = query($sessions[$i],
		"SELECT total FROM usage_billing.increment_usage('cached', 'api_calls', 100)");
	like($e, qr/hard cap|PT402|limit/i, "$names[$i]: the cached connection refuses +100 under the new cap");
}
is(citus_total('cached'), '0', 'nothing passed the new hard cap');
# a plan change, set on a worker
$workers[1]->safe_psql('postgres', "SELECT usage_billing.change_plan('cached', 'pro', 'immediate')");
$coord->safe_psql('postgres', "SELECT usage_billing.set_customer_limit('cached', 'api_calls', NULL, NULL)");
for my $i (0 .. 2)
{
	my ($o, $e) = query($sessions[$i],
		"SELECT included FROM usage_billing.check_limit('cached', 'api_calls', 1)");
	is($o, '1000000', "$names[$i]: the cached connection sees the plan change at once") or diag($e);
}
# a new customer, created on the coordinator
$coord->safe_psql('postgres', "SELECT usage_billing.upsert_customer('newcomer', 'basic')");
for my $i (0 .. 2)
{
	my ($o, $e) = query($sessions[$i],
		"SELECT total FROM usage_billing.increment_usage('newcomer', 'api_calls', 1)");
	is($o, $i + 1, "$names[$i]: the cached connection records for a customer created a moment before")
	  or diag($e);
}
for my $s (@sessions)
{
	$s->{in} .= "\\q\n";
	$s->{h}->finish;
}

# --- a shard move in the middle of recording --------------------------------------------------
$coord->safe_psql('postgres', "SELECT usage_billing.upsert_customer('moving', 'basic')");
open $f, '>', "$dir/move.sql" or die;
print $f "SELECT usage_billing.increment_usage('moving', 'api_calls', 1);\n";
close $f;
my $load = start_bench($coord, "$dir/move.sql", 8, 150);
sleep(0.5);
my ($shard, $from_port) = split /\|/, $coord->safe_psql('postgres', q{
SELECT s.shardid || '|' || p.nodeport
  FROM pg_dist_shard s JOIN pg_dist_shard_placement p ON p.shardid = s.shardid
 WHERE s.logicalrelid = 'usage_billing.customers'::regclass
   AND get_shard_id_for_distribution_column('usage_billing.customers', 'moving') = s.shardid});
my $to_port = $from_port == $workers[0]->port ? $workers[1]->port : $workers[0]->port;
($rc, $out, $err) = $coord->psql('postgres', qq{
SELECT citus_move_shard_placement($shard, '127.0.0.1', $from_port, '127.0.0.1', $to_port,
                                  shard_transfer_mode => 'block_writes')});
is($rc, 0, 'the shard of a customer being recorded moves to the other worker') or diag($err);
my $moved = finish_bench($load, 'recording during the move');
is(citus_total('moving'), $moved, 'every call made during the move is counted once');
is($coord->safe_psql('postgres',
		"SELECT count(*) FROM usage_billing.usage_events WHERE customer_id = 'moving'"),
	$moved, 'and the ledger has one row per call');

# --- the export: the coordinator's worker, for every shard --------------------------------------
# What Stripe must hold: the test's own book, for the customers with a Stripe id (c1..c20).
my %want;
for my $c (keys %book)
{
	my ($i) = $c =~ /^c(\d+)$/;
	$want{"cus_$i|api_calls"} = $book{$c} if defined $i && $book{$c} > 0;
}
my $want_json = JSON::PP->new->canonical->encode(\%want);
is(JSON::PP->new->canonical->encode(ub_expected_totals($coord)), $want_json,
	"the extension's export view agrees with the test's book");
ok(ub_export_and_wait($coord, $mock, 60), 'export_now() on the coordinator brings the mock in sync');
is(JSON::PP->new->canonical->encode(ub_mock_totals($coord, $mock)), $want_json,
	'Stripe holds exactly what the test recorded');
my $events = scalar @{ ub_mock_get($mock, 'events') };
# more usage, and a second export: only the difference goes
$coord->safe_psql('postgres', "SELECT usage_billing.increment_usage('c1', 'api_calls', 11)");
$want{'cus_1|api_calls'} += 11;
$want_json = JSON::PP->new->canonical->encode(\%want);
ok(ub_export_and_wait($coord, $mock, 60), 'a second export');
is(JSON::PP->new->canonical->encode(ub_mock_totals($coord, $mock)), $want_json,
	'Stripe holds the new total');
is(scalar @{ ub_mock_get($mock, 'events') }, $events + 1, 'one more meter event, nothing sent twice');
is(join(',', ub_identifier_mismatches($coord, $mock)), '',
	'every event Stripe accepted is recorded as sent, and nothing else');
is($coord->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_status
    WHERE stripe_customer_id IS NOT NULL AND state <> 'in_sync'}),
	'0', 'export_status: every key of a Stripe customer is in sync');
for my $w (0, 1)
{
	is($workers[$w]->safe_psql('postgres',
			q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'usage_billing export worker'}),
		'1', 'worker ' . ($w + 1) . ' runs an export worker too');
	$workers[$w]->safe_psql('postgres', 'SELECT usage_billing.export_now()');
	ok(ub_wait_for(sub { $workers[$w]->log_contains("the coordinator's worker exports") }, 30),
		'worker ' . ($w + 1) . ": it leaves the export to the coordinator's");
}

done_testing();
