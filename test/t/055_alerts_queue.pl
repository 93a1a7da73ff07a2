# hard_cap_blocked alerts outlive the refused transaction: in shared memory
# when preloaded (visible to every session, flushed by another session, lost
# by a restart before a flush), per session when the library is not preloaded.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $setup = q{
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_meter('q_gb', 'sum');
SELECT usage_billing.create_meter('q_calls', 'sum');
SELECT usage_billing.create_plan('q_plan', 0);
SELECT usage_billing.set_plan_limit('q_plan', 'q_gb', included => 10, hard_cap => true);
SELECT usage_billing.set_plan_limit('q_plan', 'q_calls', included => 1000);
SELECT usage_billing.upsert_customer('q_c', 'q_plan', '2025-01-01');
SELECT usage_billing.increment_usage('q_c', 'q_gb', 10, occurred_at => '2025-01-02');
};
my $refuse = q{SELECT usage_billing.increment_usage('q_c', 'q_gb', 1, occurred_at => '2025-01-03')};
my $alerts = q{SELECT count(*) FROM usage_billing.alerts WHERE kind = 'hard_cap_blocked'};
my $logged = q{SELECT count(*) FROM usage_billing.alert_log WHERE kind = 'hard_cap_blocked'};

# preloaded: shared memory
my $node = PostgreSQL::Test::Cluster->new('alerts_shared');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
usage_billing.late_event_grace = -1
});
$node->start;
$node->safe_psql('postgres', $setup);

my ($ret, $out, $err) = $node->psql('postgres', $refuse);
like($err, qr/would exceed the limit/, 'refused with PT402');
($ret, $out, $err) = $node->psql('postgres', $refuse);
is($node->safe_psql('postgres', $alerts), '1', 'another session sees one pending alert for two refusals');
is($node->safe_psql('postgres', $logged), '0', 'not yet in alert_log');

# a restart before any flush loses the pending alert (the documented limit)
$node->restart;
is($node->safe_psql('postgres', $alerts), '0', 'a restart before a flush loses the pending alert');

($ret, $out, $err) = $node->psql('postgres', $refuse);
# another session writes: the next successful call on a limited meter records it
$node->safe_psql('postgres', q{SELECT usage_billing.increment_usage('q_c', 'q_calls', 1, occurred_at => '2025-01-03')});
is($node->safe_psql('postgres', $logged), '1', 'flushed by the next successful call of another session');
$node->restart;
is($node->safe_psql('postgres', $alerts), '1', 'a flushed alert survives a restart');

# a burst of refusals in 300 different periods: 256 slots, the rest is logged as dropped
$node->safe_psql('postgres', q{
DO $$ BEGIN
    FOR k IN 1..300 LOOP
        BEGIN
            PERFORM usage_billing.increment_usage('q_c', 'q_gb', 11,
                occurred_at => '1990-01-15'::timestamptz + k * interval '1 month');
        EXCEPTION WHEN SQLSTATE 'PT402' THEN NULL;
        END;
    END LOOP;
END $$;
});
is($node->safe_psql('postgres', 'SELECT count(*) FROM usage_billing.pending_alerts()'), '256',
	'the queue holds 256 pending refusals');
like(slurp_file($node->logfile), qr/alert queue is full.*\n.*44 alerts dropped/,
	'the dropped refusals are logged');
is($node->safe_psql('postgres', 'SELECT usage_billing.flush_alerts()'), '256', 'one flush records them all');
is($node->safe_psql('postgres', $logged), '257', 'all in alert_log');
is($node->safe_psql('postgres', 'SELECT count(*) FROM usage_billing.pending_alerts()'), '0', 'nothing pending');
$node->stop;

# not preloaded: the queue belongs to the refused session
my $solo = PostgreSQL::Test::Cluster->new('alerts_local');
$solo->init;
$solo->append_conf('postgresql.conf', qq{shared_preload_libraries = ''\nusage_billing.late_event_grace = -1});
$solo->start;
$solo->safe_psql('postgres', $setup);
is($solo->safe_psql('postgres', $alerts), '0', 'no alert before a refusal');
($ret, $out, $err) = $solo->psql('postgres', $refuse);
like($err, qr/would exceed the limit/, 'refused without preloading too');
is($solo->safe_psql('postgres', $alerts), '0',
	'a refused session that ends without writing again takes its alert along');
my $same_session = $solo->safe_psql('postgres', qq{
DO \$\$ BEGIN
    PERFORM usage_billing.increment_usage('q_c', 'q_gb', 1, occurred_at => '2025-01-03');
EXCEPTION WHEN SQLSTATE 'PT402' THEN NULL;
END \$\$;
$alerts;
SELECT usage_billing.flush_alerts();
$logged;
});
is($same_session, "1\n1\n1", 'the refused session sees and flushes its own alert');
is($solo->safe_psql('postgres', $alerts), '1', 'recorded for everyone once flushed');
$solo->stop;

done_testing();
