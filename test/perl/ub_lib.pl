# test/perl/ub_lib.pl - helpers shared by the export worker's TAP tests in test/t/, loaded with
# `do './test/perl/ub_lib.pl'` (prove runs test/t/*.pl only, so this is not a test itself).
# Vocabulary: "mock" is test/mock_stripe.py on 127.0.0.1; "expected" totals are
# what the database says Stripe must hold: floor(total) per Stripe customer and
# event name (sum/count meters, summed over periods).
use strict;
use warnings;
use HTTP::Tiny;
use JSON::PP;
use Time::HiRes qw(time sleep);
use File::Temp qw(tempdir);
use POSIX ();

our $UB_KEY = 'sk_test_ub' . join('', map { ('a' .. 'z')[ int(rand(26)) ] } 1 .. 24);
my @ub_mocks;

# The test's own book of what it recorded with ub_add_usage: exact totals per customer,
# meter and point in time ($at, one period), so that Stripe's totals can be compared with
# what the test did rather than with the extension's views.  "customer|meter|at" -> total.
our %UB_BOOK;

# Starts the mock; returns { pid, port, url }.  Dies when it does not come up in 10 s.
sub ub_start_mock
{
	my (%o) = @_;
	my $dir = tempdir(CLEANUP => 1);
	my $portfile = "$dir/port";
	my @args = ('python3', 'test/mock_stripe.py', '--port', $o{port} // 0,
		'--port-file', $portfile, '--key', $o{key} // $UB_KEY,
		'--lifetime', $o{lifetime} // 600);
	push @args, '--rate-limit', $o{rate_limit} if $o{rate_limit};
	push @args, '--events-port-file', "$portfile.events" if $o{v2};
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDOUT, '>', '/dev/null');
		exec(@args) or POSIX::_exit(1);
	}
	my $deadline = time() + 10;
	while (!-s $portfile)
	{
		die "mock stripe did not start" if time() > $deadline;
		sleep(0.05);
	}
	open(my $fh, '<', $portfile) or die;
	my $port = <$fh>;
	chomp $port;
	close $fh;
	my $m = { pid => $pid, port => $port, url => "http://127.0.0.1:$port" };
	$m->{events_url} = ub_v2_events_url("$portfile.events") if $o{v2};
	push @ub_mocks, $m;
	return $m;
}

# Stops a mock (SIGKILL: it holds nothing worth flushing).
sub ub_stop_mock
{
	my ($m) = @_;
	return unless $m->{pid};
	kill 'KILL', $m->{pid};
	waitpid($m->{pid}, 0);
	$m->{pid} = 0;
}

END { local $?; ub_stop_mock($_) for @ub_mocks; }

# GET a control endpoint, decoded.
sub ub_mock_get
{
	my ($m, $what) = @_;
	my $r = HTTP::Tiny->new(timeout => 10)->get("$m->{url}/_mock/$what");
	die "mock $what: $r->{status} $r->{content}" unless $r->{success};
	return decode_json($r->{content});
}

# POST a control endpoint with a JSON body.
sub ub_mock_post
{
	my ($m, $what, $arg) = @_;
	my $r = HTTP::Tiny->new(timeout => 10)->post("$m->{url}/_mock/$what",
		{ content => encode_json($arg // {}), headers => { 'Content-Type' => 'application/json' } });
	die "mock $what: $r->{status} $r->{content}" unless $r->{success};
	return decode_json($r->{content});
}

# A started node with the library preloaded, pointed at the mock, extension and fixtures created.
sub ub_node
{
	my ($name, $mock, $extra, $init) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%{ $init // {} });
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.database = 'postgres'
usage_billing.stripe_api_key = '$UB_KEY'
usage_billing.stripe_api_base = '$mock->{url}'
usage_billing.export_interval = 3600
usage_billing.export_max_rps = 1000
usage_billing.export_backoff_base = 100ms
usage_billing.export_backoff_max = 1s
usage_billing.export_timeout = 3s
usage_billing.export_connect_timeout = 1s
timezone = 'UTC'
} . ($extra // ''));
	$node->start;
	$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
SELECT usage_billing.create_plan('basic');
SELECT usage_billing.create_meter('api_calls', 'sum', stripe_event_name => 'api_calls');
SELECT usage_billing.create_meter('storage', 'max', stripe_event_name => 'storage_gb');
SELECT usage_billing.create_meter('internal', 'sum');
});
	return $node;
}

# Creates customers c<from>..c<to> with Stripe ids cus_<i>.
sub ub_customers
{
	my ($node, $from, $to) = @_;
	$node->safe_psql('postgres', qq{
SELECT usage_billing.upsert_customer('c' || i, 'basic', NULL, 'cus_' || i)
  FROM generate_series($from, $to) i;});
}

# Adds amount to the current period's aggregate of each customer in the SQL list (as increment_usage would).
sub ub_add_usage
{
	my ($node, $customers_sql, $meter, $amount, $set, $at) = @_;
	$at //= 'now()';
	my $op = $set ? 'EXCLUDED.total' : 'a.total + EXCLUDED.total';
	for my $c (split /\n/, $node->safe_psql('postgres',
		"SELECT customer_id FROM usage_billing.customers WHERE customer_id IN ($customers_sql)"))
	{
		my $k = "$c|$meter|$at";
		$UB_BOOK{$k} = $set ? $amount : ($UB_BOOK{$k} // 0) + $amount;
	}
	$node->safe_psql('postgres', qq{
INSERT INTO usage_billing.usage_aggregates AS a (customer_id, meter, period_start, period_end, total, event_count)
SELECT c.customer_id, '$meter', pb.period_start, pb.period_end, $amount, 1
  FROM usage_billing.customers c
  JOIN usage_billing.plans p ON p.plan = c.plan
 CROSS JOIN LATERAL usage_billing.period_bounds(c.billing_anchor, p.period, $at) pb
 WHERE c.customer_id IN ($customers_sql)
ON CONFLICT (customer_id, meter, period_start) DO UPDATE
   SET total = $op, event_count = a.event_count + 1, updated_at = now();});
}

# What Stripe must hold per "cus|event" for sum/count meters: floor(total) summed over periods
# (aggregate_totals: a key's total includes its escrow slots).
sub ub_expected_totals
{
	my ($node) = @_;
	my $out = $node->safe_psql('postgres', q{
SELECT c.stripe_customer_id || '|' || m.stripe_event_name, sum(floor(a.total))::bigint
  FROM usage_billing.aggregate_totals a
  JOIN usage_billing.meters m ON m.meter = a.meter
  JOIN usage_billing.customers c ON c.customer_id = a.customer_id
 WHERE m.stripe_event_name IS NOT NULL AND c.stripe_customer_id IS NOT NULL
   AND m.aggregation IN ('sum', 'count') AND c.stripe_customer_id NOT LIKE 'cus_bad%'
   AND a.period_end - interval '1 second' >= now() - interval '35 days' + interval '1 hour'
 GROUP BY 1 HAVING sum(floor(a.total)) > 0 ORDER BY 1});
	my %h;
	for my $line (split /\n/, $out)
	{
		my @parts = split /\|/, $line;
		$h{"$parts[0]|$parts[1]"} = $parts[2] + 0;
	}
	return \%h;
}

# What Stripe must hold per "cus|event" for sum/count meters, from the test's own book
# (ub_add_usage): floor of each recorded period total, summed; the customers' Stripe ids and
# the meters' event names are the test's fixtures.  Customers "cus_bad..." are left out.
sub ub_recorded_totals
{
	my ($node) = @_;
	my %cus = map { split /\|/ } split /\n/, $node->safe_psql('postgres',
		q{SELECT customer_id || '|' || stripe_customer_id FROM usage_billing.customers
		   WHERE stripe_customer_id IS NOT NULL AND stripe_customer_id NOT LIKE 'cus_bad%'});
	my %ev = map { split /\|/ } split /\n/, $node->safe_psql('postgres',
		q{SELECT meter || '|' || stripe_event_name FROM usage_billing.meters
		   WHERE stripe_event_name IS NOT NULL AND aggregation IN ('sum', 'count')});
	my %h;
	for my $k (keys %UB_BOOK)
	{
		my ($c, $meter) = split /\|/, $k;
		next unless defined $cus{$c} && defined $ev{$meter};
		my $v = POSIX::floor($UB_BOOK{$k});
		$h{"$cus{$c}|$ev{$meter}"} += $v if $v > 0;
	}
	return \%h;
}

# Compares the identifiers Stripe (the mock) accepted with the outbox rows the worker
# marked sent: returns a list of differences, empty when every accepted event is recorded
# as sent and every sent row was accepted.  A row marked failed or retried while Stripe
# holds its identifier (double billing once retried) shows here.
sub ub_identifier_mismatches
{
	my ($node, $m) = @_;
	my %mock = map { $_->{identifier} => 1 } @{ ub_mock_get($m, 'events') };
	my %db = map { $_ => 1 } split /\n/, $node->safe_psql('postgres',
		q{SELECT identifier FROM usage_billing.export_outbox WHERE status = 'sent'});
	my @diff = ((map { "accepted by Stripe, not sent in the outbox: $_" } grep { !$db{$_} } sort keys %mock),
		(map { "sent in the outbox, unknown to Stripe: $_" } grep { !$mock{$_} } sort keys %db));
	return @diff;
}

# The mock's totals restricted to the event names of sum/count meters.
sub ub_mock_totals
{
	my ($node, $m) = @_;
	my $t = ub_mock_get($m, 'totals');
	my %additive = map { $_ => 1 } split /\n/, $node->safe_psql('postgres',
		q{SELECT stripe_event_name FROM usage_billing.meters WHERE aggregation IN ('sum', 'count') AND stripe_event_name IS NOT NULL});
	my %h;
	for my $k (keys %$t)
	{
		my ($cus, $ev) = split /\|/, $k, 2;
		$h{$k} = $t->{$k} + 0 if $additive{$ev};
	}
	return \%h;
}

# Polls cond every 0.2 s until it holds or timeout seconds pass; returns whether it held.
sub ub_wait_for
{
	my ($cond, $timeout) = @_;
	my $deadline = time() + ($timeout // 30);
	while (time() < $deadline)
	{
		return 1 if $cond->();
		sleep(0.2);
	}
	return $cond->() ? 1 : 0;
}

# True when the mock holds exactly the expected totals.
sub ub_in_sync
{
	my ($node, $m) = @_;
	my $e = ub_expected_totals($node);
	my $t = ub_mock_totals($node, $m);
	return JSON::PP->new->canonical->encode($e) eq JSON::PP->new->canonical->encode($t);
}

# Wakes the worker and waits until the mock holds the expected totals and the worker has
# recorded every outcome (no pending outbox row); returns whether it did.
sub ub_export_and_wait
{
	my ($node, $m, $timeout) = @_;
	$node->safe_psql('postgres', 'SELECT usage_billing.export_now()');
	my $ok = ub_wait_for(sub {
		ub_in_sync($node, $m) && $node->safe_psql('postgres',
			q{SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'pending'}) eq '0' }, $timeout // 30);
	# on a timeout, say where things stand
	Test::More::diag("not in sync; outbox: " . $node->safe_psql('postgres', q{
SELECT status, count(*), min(next_attempt_at) - clock_timestamp(), max(attempts), max(last_error)
  FROM usage_billing.export_outbox GROUP BY status})
		. "\nworker: " . $node->safe_psql('postgres', q{
SELECT pid, state, wait_event, query FROM pg_stat_activity WHERE backend_type = 'usage_billing export worker'})
		. "\nmock: " . JSON::PP->new->canonical->encode(ub_mock_get($m, 'stats'))) unless $ok;
	return $ok;
}

# The worker's pid, or '' when it does not run.
sub ub_worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'usage_billing export worker'});
}

# --- v2: the meter event stream (usage_billing.stripe_api = 'v2') ---------------------------

# The events host's URL of a mock started with v2 => 1 (it writes that port file first).
sub ub_v2_events_url
{
	my ($file) = @_;
	open(my $fh, '<', $file) or die "mock stripe: no events port file: $!";
	my $port = <$fh>;
	chomp $port;
	close $fh;
	return "http://127.0.0.1:$port";
}

# postgresql.conf lines that make the worker send through the mock's v2 stream.
sub ub_v2_conf
{
	my ($m) = @_;
	return "usage_billing.stripe_api = 'v2'\n"
	  . "usage_billing.stripe_meter_events_base = '$m->{events_url}'\n";
}

# Wakes the worker; waits until nothing is pending (events and cancels) and cond holds.
sub ub_settle
{
	my ($node, $m, $cond, $timeout) = @_;
	my $sql = sub { $node->safe_psql('postgres', $_[0]) };
	$sql->('SELECT usage_billing.export_now()');
	my $ok = ub_wait_for(sub {
		$sql->(q{SELECT (SELECT count(*) FROM usage_billing.export_outbox WHERE status = 'pending')
  + (SELECT count(*) FROM usage_billing.export_cancels WHERE status = 'pending')}) eq '0'
		  && (!$cond || $cond->()) }, $timeout // 30);
	Test::More::diag("not settled: " . $sql->(q{SELECT string_agg(status || ' ' || attempts || ' '
  || coalesce(last_error, ''), E'\n') FROM usage_billing.export_outbox WHERE status <> 'sent'})
		. "\nmock: " . JSON::PP->new->canonical->encode(ub_mock_get($m, 'stats'))) unless $ok;
	return $ok;
}

# True when the mock's totals equal what the test itself recorded (ub_add_usage's book).
sub ub_recorded_in_sync
{
	my ($node, $m) = @_;
	return JSON::PP->new->canonical->encode(ub_mock_totals($node, $m))
	  eq JSON::PP->new->canonical->encode(ub_recorded_totals($node));
}

1;
