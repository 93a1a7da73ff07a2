# Check-then-act against reserve-then-act, 20 clients at once at 49 of a hard cap of 50.
#  a. Each client asks check_limit for 1 and, if allowed, "does the work": many are told
#     yes, but only one increment_usage succeeds afterwards -- the others got the work for
#     free.  This is the pattern reservations replace (the test shows it, it asserts only
#     that the cap held).
#  b. Each client calls reserve_usage for 1: exactly one gets a hold, the 19 others get
#     PT402; the one commits and the total is exactly 50.
# The clients start together: each waits on an advisory lock that the test holds until all
# 20 are waiting.
use strict;
use warnings;
use IPC::Run;
use Time::HiRes qw(sleep time);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $clients = 20;
my $node = PostgreSQL::Test::Cluster->new('reservations');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
max_connections = 40
});
$node->start;

$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_meter('renders', 'sum');
SELECT usage_billing.create_plan('p', 0);
SELECT usage_billing.set_plan_limit('p', 'renders', included => 50, hard_cap => true);
SELECT usage_billing.upsert_customer('check_then_act', 'p');
SELECT usage_billing.upsert_customer('reserve_then_act', 'p');
SELECT usage_billing.increment_usage(c, 'renders', 49)
  FROM unnest(ARRAY['check_then_act', 'reserve_then_act']) c;
CREATE TABLE outcomes (pattern text, client int, outcome text);
});

# Runs one SQL text in $clients sessions released together; returns when all are done.
sub race
{
	my ($sql) = @_;
	my $gate = IPC::Run::start(
		[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres') ],
		'<', \(my $gate_in = "SELECT pg_advisory_lock(4242);\n\\echo locked\n"),
		'>', \(my $gate_out = ''), '2>', \(my $gate_err = ''));
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	$gate->pump_nb until $gate_out =~ /locked/ || time() > $deadline;
	my @h;
	for my $i (1 .. $clients)
	{
		my $file = $node->basedir . "/client_$i.sql";
		open my $f, '>', $file or die "$file: $!";
		print $f "SELECT pg_advisory_lock_shared(4242);\n" . ($sql =~ s/:client/$i/gr);
		close $f;
		push @h, IPC::Run::start(
			[ 'psql', '-X', '-q', '-f', $file, '-d', $node->connstr('postgres') ],
			'<', \undef, '>', \my $out, '2>', \my $err);
	}
	# all clients wait on the gate, then it opens
	$node->poll_query_until('postgres', qq{
SELECT count(*) = $clients FROM pg_locks WHERE locktype = 'advisory' AND NOT granted})
	  or die 'the clients did not reach the gate';
	$gate_in .= "SELECT pg_advisory_unlock(4242);\n\\q\n";
	$gate->finish;
	$_->finish for @h;
}

# a. check, then act
race(q{
DO $$
DECLARE
    ok boolean;
BEGIN
    SELECT allowed INTO ok FROM usage_billing.check_limit('check_then_act', 'renders', 1);
    IF ok THEN
        PERFORM pg_sleep(0.2);   -- the expensive work
        BEGIN
            PERFORM usage_billing.increment_usage('check_then_act', 'renders', 1);
            INSERT INTO outcomes VALUES ('check', :client, 'recorded');
        EXCEPTION WHEN SQLSTATE 'PT402' THEN
            INSERT INTO outcomes VALUES ('check', :client, 'worked for free');
        END;
    ELSE
        INSERT INTO outcomes VALUES ('check', :client, 'refused');
    END IF;
END $$;
});
my $free = $node->safe_psql('postgres',
	q{SELECT count(*) FROM outcomes WHERE pattern = 'check' AND outcome = 'worked for free'});
note("check-then-act: $free of $clients clients did the work and could not record it");
is($node->safe_psql('postgres', q{
SELECT total FROM usage_billing.aggregate_totals WHERE customer_id = 'check_then_act'}),
	'50', 'check-then-act: the cap held (but the work was given away)');

# b. reserve, then act, then commit
race(q{
DO $$
DECLARE
    id uuid;
BEGIN
    SELECT reservation_id INTO id FROM usage_billing.reserve_usage('reserve_then_act', 'renders', 1);
    PERFORM pg_sleep(0.2);   -- the expensive work, only with a hold
    PERFORM usage_billing.commit_reservation(id);
    INSERT INTO outcomes VALUES ('reserve', :client, 'recorded');
EXCEPTION WHEN SQLSTATE 'PT402' THEN
    INSERT INTO outcomes VALUES ('reserve', :client, 'refused');
END $$;
});
is($node->safe_psql('postgres', q{
SELECT string_agg(outcome || ' ' || n, ', ' ORDER BY outcome)
  FROM (SELECT outcome, count(*) AS n FROM outcomes WHERE pattern = 'reserve' GROUP BY 1) o}),
	'recorded 1, refused 19', 'reserve-then-act: exactly one hold, 19 PT402, nobody works for free');
is($node->safe_psql('postgres', q{
SELECT total || '/' || event_count FROM usage_billing.aggregate_totals WHERE customer_id = 'reserve_then_act'}),
	'50/2', 'the total is exactly the cap, with the committed event');
is($node->safe_psql('postgres', q{
SELECT count(*) FILTER (WHERE status = 'committed') || '/' || count(*) FROM usage_billing.reservations}),
	'1/1', 'one reservation, committed');
is($node->safe_psql('postgres', q{SELECT sum(reserved) FROM usage_billing.usage_aggregates}),
	'0', 'no hold left');

$node->stop;
done_testing();
