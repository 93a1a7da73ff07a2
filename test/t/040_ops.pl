# 040_ops.pl - operations: the API key stays secret (SHOW, pg_settings, log, status
# view), the key file, SIGHUP reload of stripe_api_base and export_interval, and the
# requests-per-second ceiling.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

# the mock expects another key: every request is refused with 401
my $wrong = ub_start_mock(key => 'sk_test_somethingelse');
my $node = ub_node('ops', $wrong, "log_min_messages = debug1\nlog_statement = 'all'\n", { allows_streaming => 1 });
ub_customers($node, 1, 30);
my $all = q{SELECT customer_id FROM usage_billing.customers};
$node->safe_psql('postgres', q{CREATE ROLE alice LOGIN; GRANT USAGE ON SCHEMA usage_billing TO alice;});

# --- key secrecy ---
my ($ret, $out, $err) = $node->psql('postgres', 'SHOW usage_billing.stripe_api_key',
	extra_params => [ '-U', 'alice' ]);
isnt($ret, 0, 'non-superuser cannot SHOW the key');
like($err, qr/must be superuser|permission denied|privileges of pg_read_all_settings/, 'refused with a privilege error');
unlike("$out $err", qr/\Q$UB_KEY\E/, 'the refusal does not contain the key');
($ret, $out, $err) = $node->psql('postgres', q{SELECT current_setting('usage_billing.stripe_api_key')},
	extra_params => [ '-U', 'alice' ]);
isnt($ret, 0, 'non-superuser cannot read it with current_setting()');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_settings WHERE name = 'usage_billing.stripe_api_key'},
	extra_params => [ '-U', 'alice' ]), '0', 'not in pg_settings for a non-superuser');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_settings WHERE name = 'usage_billing.stripe_api_key'}),
	'0', 'not in pg_settings at all (GUC_NO_SHOW_ALL)');
($ret, $out, $err) = $node->psql('postgres', 'SHOW ALL', extra_params => [ '-U', 'alice' ]);
unlike($out, qr/\Q$UB_KEY\E/, 'not in SHOW ALL');
is($node->safe_psql('postgres', 'SHOW usage_billing.stripe_api_key'), $UB_KEY, 'a superuser can SHOW it');
for my $where ('ROLE alice', 'DATABASE postgres')
{
	($ret, $out, $err) = $node->psql('postgres', "ALTER $where SET usage_billing.stripe_api_key = '$UB_KEY'");
	isnt($ret, 0, "ALTER $where SET of the key refused (pg_db_role_setting is public)");
	ok($err =~ /cannot be stored in a role, database or function setting/ && $err !~ /\Q$UB_KEY\E/,
		"ALTER $where SET: clear error without the key");
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_db_role_setting'), '0', 'nothing stored');

# a faulty run: 401 on every request, and a failing cycle, with the log at debug1
ub_add_usage($node, $all, 'api_calls', 4);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { $node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_attempts
  WHERE http_status = 401}) >= 10 }, 20), '401s recorded');
like($node->safe_psql('postgres', q{SELECT last_error FROM usage_billing.export_status WHERE customer_id = 'c1'}),
	qr/Invalid API Key/, "Stripe's 401 message in export_status");
is($node->safe_psql('postgres', q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'failed'}),
	'0', 'a bad key fails no row for good (401 is retried)');
$node->safe_psql('postgres', q{ALTER FUNCTION usage_billing.export_record(bigint[], text[], integer[], text[], text[], integer[], boolean[], integer[]) RENAME TO er_away});
ub_add_usage($node, q{'c1'}, 'api_calls', 1);
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { slurp_file($node->logfile) =~ /export_record\(.*does not exist/ }, 15), 'a cycle failed');
$node->safe_psql('postgres', q{ALTER FUNCTION usage_billing.er_away(bigint[], text[], integer[], text[], text[], integer[], boolean[], integer[]) RENAME TO export_record});
my $everything = $node->safe_psql('postgres', q{
SELECT coalesce(string_agg(t::text, ' '), '') FROM (
  SELECT s::text AS t FROM usage_billing.export_status s
  UNION ALL SELECT o::text FROM usage_billing.export_outbox o
  UNION ALL SELECT a::text FROM usage_billing.export_attempts a) x});
ok($everything !~ /\Q$UB_KEY\E/, 'key absent from export_status, outbox and attempts');
my $tail = substr($UB_KEY, -4);
ok($everything =~ /Invalid API Key provided: sk_test_\*+"/, "Stripe's 401 message kept, key masked");
ok($everything !~ /\*\Q$tail\E/, "not even the last four characters Stripe's 401 quotes");
ok(slurp_file($node->logfile) !~ /\Q$UB_KEY\E/, 'key absent from the server log');

# the key file, used when stripe_api_key is empty
my $good = ub_start_mock();
my $keyfile = $node->data_dir . '/stripe.key';
open(my $fh, '>', $keyfile) or die;
print $fh "$UB_KEY\n";
close $fh;
chmod 0600, $keyfile;
$node->append_conf('postgresql.conf', qq{
usage_billing.stripe_api_key = ''
usage_billing.stripe_api_key_file = '$keyfile'
usage_billing.stripe_api_base = '$good->{url}'
});
$node->reload;
sleep(0.5);
ok(ub_export_and_wait($node, $good, 30), 'key file and reloaded stripe_api_base: in sync');
is_deeply(ub_mock_totals($node, $good), ub_expected_totals($node), 'totals equal on the new base URL');
is(ub_mock_get($wrong, 'stats')->{accepted}, 0, 'the old base URL got nothing accepted');

# key rotation through ALTER SYSTEM (logged by log_statement) and reload (PostgreSQL
# logs 'parameter ... changed to "<value>"'): the log hook masks both
$node->safe_psql('postgres', qq{ALTER SYSTEM SET usage_billing.stripe_api_key = '$UB_KEY'});
$node->reload;
ub_add_usage($node, q{'c3'}, 'api_calls', 1);
ok(ub_export_and_wait($node, $good, 30), 'key set by ALTER SYSTEM used after reload');
my $log = slurp_file($node->logfile);
ok($log =~ /parameter "usage_billing.stripe_api_key" changed to "\*+"/, 'the reload message is logged, value masked');
ok($log =~ /statement: ALTER SYSTEM SET usage_billing.stripe_api_key = 'sk_test_\*+'/, 'the statement is logged, key masked');
ok($log !~ /\Q$UB_KEY\E/, 'key absent from the server log (reload, statements, errors)');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET usage_billing.stripe_api_key});
$node->reload;

# --- SIGHUP reload of the interval (export_now is not called here) ---
$node->safe_psql('postgres', q{ALTER SYSTEM SET usage_billing.export_interval = 1; SELECT pg_reload_conf();});
ub_add_usage($node, q{'c2'}, 'api_calls', 5);
ok(ub_wait_for(sub { ub_in_sync($node, $good) }, 10), 'export_interval = 1 after reload: exported without export_now');
$node->safe_psql('postgres', q{ALTER SYSTEM SET usage_billing.export_interval = 0; SELECT pg_reload_conf();});
# the worker has the new interval once its cycle counter, which moved every second, stands still
my $cycles = sub { $node->safe_psql('postgres', q{SELECT cycles FROM usage_billing.export_worker_info()}) };
my ($seen, $since) = ($cycles->(), time());
ok(ub_wait_for(sub { my $c = $cycles->(); ($seen, $since) = ($c, time()) if $c ne $seen; time() - $since >= 2.5 }, 30),
	'export_interval = 0 after reload: the worker stops its periodic cycles');
ub_add_usage($node, q{'c2'}, 'api_calls', 5);
ok(!ub_wait_for(sub { ub_in_sync($node, $good) }, 3), 'export_interval = 0: no periodic export');
ok(ub_export_and_wait($node, $good, 10), 'export_now still exports with interval 0');

# --- the requests-per-second ceiling ---
my $paced = ub_start_mock();
$node->safe_psql('postgres', qq{ALTER SYSTEM SET usage_billing.export_max_rps = 5;
ALTER SYSTEM SET usage_billing.stripe_api_base = '$paced->{url}'; SELECT pg_reload_conf();});
sleep(0.5);
ub_add_usage($node, $all, 'api_calls', 1);
my $t0 = time();
$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
ok(ub_wait_for(sub { ub_mock_get($paced, 'stats')->{accepted} >= 30 }, 20), '30 events sent at 5 per second');
my $took = time() - $t0;
my $st = ub_mock_get($paced, 'stats');
# without the ceiling the 30 requests arrive within a fraction of a second; 10 leaves room for
# requests that a loaded machine delivers to the mock in bunches
ok($st->{max_window} <= 10, "at most 5 requests a second (10 with bunching) in any 1 s window: $st->{max_window}");
ok($took >= 4, sprintf('pacing took %.1f s for 30 requests', $took));	# a lower bound: load only adds

# --- DROP DATABASE is never held up by the worker (it absorbs procsignal barriers) ---
$node->safe_psql('postgres', 'CREATE DATABASE scratch');
# a worker that ignores the barrier holds DROP DATABASE for good: the statement timeout ends that
my ($drop_rc, $drop_out, $drop_err) = $node->psql('postgres', q{SET statement_timeout = '60s'; DROP DATABASE scratch});
is($drop_rc, 0, 'DROP DATABASE of another database is not held up by the worker') or diag($drop_err);
is(ub_worker_pid($node) ne '', 1, 'worker still running');

# --- never on a standby ---
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
$standby->start;
$node->wait_for_catchup($standby);	# the standby streams: a worker would have started by now
ok(!ub_wait_for(sub { $standby->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity
  WHERE backend_type = 'usage_billing export worker'}) ne '0' }, 3), 'no export worker on a standby');
is($standby->safe_psql('postgres', q{SELECT pid IS NULL FROM usage_billing.export_worker_info()}), 't',
	'export_worker_info on the standby: no worker');
$standby->stop;

# --- without shared_preload_libraries: SQL works, export_now() says why nothing happens ---
my $plain = PostgreSQL::Test::Cluster->new('plain');
$plain->init;
$plain->start;
$plain->safe_psql('postgres', 'CREATE EXTENSION usage_billing');
($ret, $out, $err) = $plain->psql('postgres', 'SELECT usage_billing.export_now()');
is($ret, 0, 'export_now() without preloading succeeds');
like($err, qr/NOTICE:  the usage_billing export worker is not running/, 'with a NOTICE');
is($plain->safe_psql('postgres', 'SELECT preloaded, pid IS NULL FROM usage_billing.export_worker_info()'),
	'f|t', 'export_worker_info: not preloaded');
$plain->stop;

$node->stop;
done_testing();
