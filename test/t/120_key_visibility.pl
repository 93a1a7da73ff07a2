# 120_key_visibility.pl - the Stripe key set with ALTER SYSTEM SET is never visible to a
# non-superuser who may read other sessions and settings (pg_read_all_stats,
# pg_read_all_settings): not in pg_stat_activity while the session that set it stays
# connected, not in pg_file_settings; and not in the server log, even with
# log_statement = 'all' and debug messages.  The worker then sends with the new key.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $new_key = 'sk_test_rotated' . join('', map { ('a' .. 'z')[ int(rand(26)) ] } 1 .. 20);
my $mock = ub_start_mock(key => $new_key);
my $node = ub_node('keyvis', $mock, "log_statement = 'all'\nlog_min_messages = debug1\n");
ub_customers($node, 1, 3);
$node->safe_psql('postgres', q{CREATE ROLE watcher LOGIN;
GRANT pg_read_all_stats, pg_read_all_settings TO watcher;});

sub as_watcher
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql, extra_params => [ '-U', 'watcher' ]);
	return ($ret, "$out $err");
}

# a superuser session sets the key and stays connected
my $admin = $node->background_psql('postgres');
$admin->query_safe("ALTER SYSTEM SET usage_billing.stripe_api_key = '$new_key'");

my ($ret, $seen) = as_watcher(q{SELECT pid, state, query FROM pg_stat_activity});
is($ret, 0, 'the watcher reads pg_stat_activity');
like($seen, qr/ALTER SYSTEM SET usage_billing\.stripe_api_key/, 'and sees the statement');
unlike($seen, qr/\Q$new_key\E/, 'but not the key');
unlike($seen, qr/sk_test_[a-z]/, 'nor any key-shaped text');

($ret, $seen) = as_watcher(q{SELECT name, setting FROM pg_file_settings});
isnt($ret, 0, 'pg_file_settings is refused to the watcher');
unlike($seen, qr/\Q$new_key\E/, 'and the refusal does not show the key');

$admin->query_safe('SELECT pg_reload_conf()');
ok(ub_wait_for(sub {
	ub_add_usage($node, q{'c1'}, 'api_calls', 1);
	ub_export_and_wait($node, $mock, 5) }, 30), 'the worker exports with the key set by ALTER SYSTEM');
($ret, $seen) = as_watcher(q{SELECT query FROM pg_stat_activity});
unlike($seen, qr/\Q$new_key\E/, 'pg_stat_activity after the reload: no key');
$admin->quit;

my $log = slurp_file($node->logfile);
like($log, qr/ALTER SYSTEM SET usage_billing\.stripe_api_key/, 'the log has the statement');
unlike($log, qr/\Q$new_key\E/, 'the server log never shows the new key');
unlike($log, qr/\Q$UB_KEY\E/, 'nor the old one');

$node->stop;
done_testing();
