# SQL-level fuzzing of every function of the usage_billing schema, for about a minute.
#
# Thousands of calls with hostile arguments: unicode and binary-looking names, 10 MB strings,
# numerics (huge, tiny, NaN, +-Infinity, negative zero), jsonb (deep nesting, huge arrays,
# wrong shapes), timestamps (+-infinity, year 1, 294276, BC) and intervals.  Every call runs
# in a subtransaction of a PL/pgSQL harness that records its SQLSTATE.  Calls are of three
# kinds: "valid" calls on a set of valid customers (must succeed; their contributions are
# tracked), "invalid" calls on those same customers (must fail and change nothing), and "any"
# calls everywhere else (junk customers with extreme billing anchors, random names, every
# function with random arguments of its declared types), and "tenant" calls run as PostgREST
# runs them (SET LOCAL ROLE authenticated, hostile request.jwt.claims: other customers, unicode,
# 10 MB, invalid JSON) that probe every readable table, view and reading function for another
# customer's rows, and try to write.
#
# Passes when: the postmaster never restarts (same pid, no "terminated by signal" in the log),
# no failure is an internal error (SQLSTATE class XX), every valid call succeeded, every
# invalid call failed (reservations too), no tenant call saw another customer or wrote anything, and afterwards the valid customers' totals equal the sum of the valid
# calls alone, and aggregates equal the ledger for every customer's current period.
# FUZZ_SECONDS (default 50) bounds the generation; FUZZ_SEED makes a run reproducible.
use strict;
use warnings;
use Encode ();
use Time::HiRes qw(time);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $seconds = $ENV{FUZZ_SECONDS} // 50;
my $seed = $ENV{FUZZ_SEED} // int(time * 1000) % 2**31;
srand($seed);
note("fuzz seed $seed (set FUZZ_SEED to replay)");

my $node = PostgreSQL::Test::Cluster->new('fuzz');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
restart_after_crash = off
max_stack_depth = '2MB'
});
$node->start;
my $postmaster_pid = postmaster_pid();

sub postmaster_pid
{
	open my $f, '<', $node->data_dir . '/postmaster.pid' or return 'none';
	my $pid = <$f>;
	chomp $pid;
	return $pid;
}

my $valid_customers = 4;
$node->safe_psql('postgres', q{
CREATE EXTENSION usage_billing;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fuzzer') THEN
    CREATE ROLE fuzzer LOGIN;
  END IF;
END $$;
GRANT usage_billing_admin, usage_billing_writer, usage_billing_reader TO fuzzer;
SELECT usage_billing.create_meter('fz_sum', 'sum');
SELECT usage_billing.create_meter('fz_count', 'count');
SELECT usage_billing.create_meter('fz_users', 'unique_count', value_property => 'user');
SELECT usage_billing.create_meter('fz_max', 'max');
SELECT usage_billing.create_meter('fz_dur', 'duration', unit => 'seconds');
SELECT usage_billing.create_plan('fz_plan', 5);
SELECT usage_billing.set_plan_limit('fz_plan', 'fz_sum', included => 1000, overage_price => 0.01);
SELECT usage_billing.create_plan('fz_junk_plan', 0);
SELECT usage_billing.upsert_customer('fz_valid_' || i, 'fz_plan') FROM generate_series(1, 4) i;
SELECT usage_billing.upsert_customer('fz_garbage', 'fz_junk_plan');
-- junk customers with extreme billing anchors: period arithmetic at the edges
SELECT usage_billing.upsert_customer('fz_junk_' || i, 'fz_junk_plan', a)
  FROM (VALUES (1, '0001-01-01 00:00+00'::timestamptz), (2, '294276-12-01 00:00+00'),
               (3, '4713-01-01 00:00+00 BC'), (4, '2000-02-29 23:59:59.999999+00'),
               (5, '1999-12-31 12:00+00')) v(i, a);

CREATE TABLE public.fz_result (id int, kind text, sqlstate text, message text, query text);
CREATE TABLE public.fz_expect (id int, customer_id text, meter text, contribution numeric);
CREATE FUNCTION public.fz_try(id int, kind text, q text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    BEGIN
        EXECUTE q;
        INSERT INTO public.fz_result VALUES (id, kind, '00000', NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
        INSERT INTO public.fz_result VALUES (id, kind, SQLSTATE, left(SQLERRM, 300), left(q, 300));
    END;
END $$;
GRANT INSERT, SELECT ON public.fz_result, public.fz_expect TO fuzzer;
-- the PostgREST tenant role: end users, with hostile claims
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN;
  END IF;
END $$;
SELECT usage_billing.grant_tenant_access('authenticated');
GRANT authenticated TO fuzzer;
GRANT INSERT ON public.fz_result TO authenticated;
-- raised by the tenant probes when they see another customer (volatile: never folded at plan time)
CREATE FUNCTION public.fz_leak(what text) RETURNS int LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'tenant leak: %', what USING ERRCODE = 'UBLK1';
END $$;
});
# plans of the junk customers with extreme periods
$node->safe_psql('postgres', q{
SELECT usage_billing.create_plan('fz_plan_' || i, 0, 'usd', p)
  FROM (VALUES (1, '1 microsecond'::interval), (2, '100000 years'), (3, '1 day 1 microsecond'),
               (4, '1 month'), (5, '7 days')) v(i, p);
SELECT usage_billing.upsert_customer('fz_junk_p' || i, 'fz_plan_' || i, a)
  FROM (VALUES (1, '2020-01-01 00:00+00'::timestamptz), (2, '0001-01-01 00:00+00'),
               (3, '294276-01-01 00:00+00'), (4, '2024-01-31 00:00+00'), (5, '0001-01-01 00:00+00 BC')) v(i, a);
});

# --- random SQL values -------------------------------------------------------------

sub pick { return $_[ int(rand(@_)) ]; }
sub lit { my ($s) = @_; $s =~ s/'/''/g; return "'$s'"; }

sub random_chars
{
	my ($n, $class) = @_;
	my $s = '';
	for (1 .. $n)
	{
		my $cp;
		if ($class eq 'binary') { $cp = 1 + int(rand(255)); }
		elsif ($class eq 'ascii') { $cp = 32 + int(rand(95)); }
		else
		{
			$cp = pick(1 + int(rand(127)), 0x80 + int(rand(0x780)), 0x800 + int(rand(0xD000)),
				0xE000 + int(rand(0x2000)), 0x10000 + int(rand(0x100000)), 0xFFFD, 0xFEFF, 0x202E);
			$cp = 0xFFFD if $cp >= 0xD800 && $cp <= 0xDFFF;
		}
		$s .= chr($cp);
	}
	return $s;
}

my @junk_customers = ('fz_garbage', map({ "fz_junk_$_" } 1 .. 5), map({ "fz_junk_p$_" } 1 .. 5));
my @known_names = (@junk_customers, 'fz_junk_plan', 'fz_sum', 'fz_count', 'fz_users', 'fz_max',
	'sum', 'count', 'max', 'last', 'unique_count', 'active', 'suspended', 'canceled', 'graduated',
	'volume', 'usd', 'jpy', 'EUR', 'user', 'sub');
my $big_count = 0;

sub rtext
{
	my $r = rand;
	return 'NULL' if $r < 0.06;
	return "''" if $r < 0.10;
	return lit(pick(@known_names)) if $r < 0.35;
	return lit(random_chars(1 + int(rand(40)), 'unicode')) if $r < 0.55;
	return lit(random_chars(1 + int(rand(40)), 'binary')) if $r < 0.70;
	return lit(pick("'; DROP TABLE usage_billing.usage_events; --", '%s%s%n%x', '\\', '"', '$$', 'NaN',
			'-1', ' ', "a\tb\nc", 'public.lower', 'usage_billing', chr(0x202E) . 'evil', 'x' x 201,
			'x' x 2700, 'é' x 3000)) if $r < 0.85;
	return lit(random_chars(200 + int(rand(3000)), 'unicode')) if $r < 0.985;
	# very long strings, generated on the server: 10 MB and 4 MB of 4-byte characters
	$big_count++;
	return pick("repeat('x', 10000000)", "repeat(chr(128512), 1000000)",
		"(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 330000) g)");
}

sub rnum
{
	my $r = rand;
	return 'NULL' if $r < 0.05;
	return pick("'NaN'::numeric", "'Infinity'::numeric", "'-Infinity'::numeric", "'-0'::numeric",
		"'-0.000'::numeric") if $r < 0.30;
	return pick('0', '1', '-1', '2.5', '0.001', '1e-20', '-1e-20', '99999999999999999999999',
		"'1e131071'::numeric", "'-1e131071'::numeric", "('0.' || repeat('0', 16382) || '1')::numeric",
		"(10::numeric ^ 1000)", '123456789.123456789123456789', '2147483648', '-9223372036854775809')
	  if $r < 0.65;
	return sprintf('%.*f', int(rand(30)), (rand() - 0.3) * 10**int(rand(40)));
}

sub rint { return pick('NULL', '0', '-1', '1', '3', '2147483647', '-2147483648', int(rand(100))); }
sub rbigint { return pick('NULL', '0', '-1', '9223372036854775807', '-9223372036854775808', int(rand(1e9))); }
sub rbool { return pick('true', 'false', 'NULL'); }

sub rts
{
	my $r = rand;
	return 'NULL' if $r < 0.05;
	return pick("'infinity'::timestamptz", "'-infinity'::timestamptz", "'0001-01-01 00:00:00+00'::timestamptz",
		"'294276-12-31 23:59:59.999999+00'::timestamptz", "'4713-01-01 00:00:00+00 BC'::timestamptz",
		"'294276-12-31 23:59:59+14'::timestamptz", "'2000-02-29 00:00+00'::timestamptz",
		"'1970-01-01 00:00+00'::timestamptz", 'now()', "now() - interval '1 month'",
		"now() + interval '10 years'") if $r < 0.6;
	return lit(sprintf('%04d-%02d-%02d %02d:%02d:%02d+00', 1 + int(rand(9999)), 1 + int(rand(12)),
			1 + int(rand(28)), int(rand(24)), int(rand(60)), int(rand(60)))) . '::timestamptz';
}

sub rinterval
{
	return pick('NULL', "'1 month'::interval", "'0'::interval", "'-1 day'::interval", "'1 microsecond'::interval",
		"'178000000 years'::interval", "'-178000000 years'::interval", "'1 mon -40 days'::interval",
		"'2147483647 days'::interval", "'2147483647 months 2147483647 days'::interval", "'1 year'::interval",
		"'7 days'::interval", "'1 day -1 microsecond'::interval", "'-2147483648 months'::interval");
}

sub rjson_value
{
	my ($depth) = @_;
	my $r = rand;
	return pick('null', 'true', 'false', '0', '-0', '1e1000', '-1e-1000', '1.5', '"NaN"', '"Infinity"', '"-1"',
		'"\u00e9"', '"\ud83d\ude00"', '""', '"' . random_chars(5, 'ascii') =~ s/["\\]//gr . '"')
	  if $r < 0.5 || $depth > 3;
	if ($r < 0.75)
	{
		return '[' . join(',', map { rjson_value($depth + 1) } 1 .. int(rand(4))) . ']';
	}
	return '{' . join(',', map { '"' . pick('up_to', 'unit_price', 'flat_fee', 'user', 'customer_id', 'meter',
				'amount', 'idempotency_key', 'occurred_at', 'properties', 'x') . '":' . rjson_value($depth + 1) } 1 .. int(rand(5))) . '}';
}

sub rjsonb
{
	my $r = rand;
	return 'NULL' if $r < 0.05;
	if ($r < 0.11)
	{
		$big_count++;
		return pick("(repeat('[', 100000) || repeat(']', 100000))::jsonb",
			"(repeat('{\"a\":', 3000) || '1' || repeat('}', 3000))::jsonb",
			"(repeat('[', 6000) || repeat(']', 6000))::jsonb",
			"(SELECT jsonb_agg(g) FROM generate_series(1, 300000) g)",
			"(SELECT jsonb_agg(jsonb_build_object('up_to', g, 'unit_price', 1)) FROM generate_series(1, 20000) g)",
			"(SELECT jsonb_object_agg('k' || g, g) FROM generate_series(1, 100000) g)",
			"jsonb_build_object('user', repeat('u', 10000000))");
	}
	return lit(pick('{}', '[]', 'null', '1', '"x"', '{"user": "\u0000"}', '[{"up_to": null, "unit_price": 1}]',
			'[{"up_to": 10, "unit_price": "NaN"}, {"up_to": null, "unit_price": 1}]',
			'[{"up_to": -1, "unit_price": 1}, {"up_to": null}]', '[{"up_to": 1e1000, "unit_price": 1e-1000}, {"up_to": null, "unit_price": 0}]'))
	  . '::jsonb' if $r < 0.35;
	return lit(rjson_value(0)) . '::jsonb';
}

sub rbatch
{
	my ($customer_pool) = @_;
	my @ev;
	for (1 .. 1 + int(rand(5)))
	{
		my %e;
		$e{customer_id} = '"' . pick(@$customer_pool) . '"' if rand() < 0.9;
		$e{meter} = '"' . pick('fz_sum', 'fz_count', 'fz_users', 'fz_max', 'nope') . '"' if rand() < 0.9;
		$e{amount} = pick('1', '-1', '"NaN"', '"Infinity"', '1e1000', 'null', '"abc"', '[]', '0.5', '-0') if rand() < 0.7;
		$e{idempotency_key} = pick('null', '1', '"k' . int(rand(50)) . '"', '""', '{}') if rand() < 0.5;
		$e{occurred_at} = pick('"infinity"', '"-infinity"', '"0001-01-01T00:00:00Z"', '"294276-12-31T23:59:59Z"',
			'"not a time"', '12', 'null', '"2024-02-30"') if rand() < 0.5;
		$e{properties} = pick('{"user": "u1"}', '[]', '"x"', 'null', '{"user": {"a": 1}}', '{"user": null}') if rand() < 0.5;
		$e{extra} = '1' if rand() < 0.1;
		push @ev, '{' . join(', ', map { "\"$_\": $e{$_}" } sort keys %e) . '}';
	}
	my $arr = '[' . join(', ', @ev) . ']';
	return lit(pick($arr, $arr, '{}', '[1, 2]', '[[]]', 'null', '[' . $arr . ']')) . '::jsonb';
}

my %by_type = (
	'text' => \&rtext, 'name' => \&rtext, 'character varying' => \&rtext,
	'numeric' => \&rnum, 'integer' => \&rint, 'bigint' => \&rbigint, 'smallint' => \&rint,
	'boolean' => \&rbool, 'timestamp with time zone' => \&rts, 'interval' => \&rinterval,
	'jsonb' => \&rjsonb);

# every function of the schema, with its argument types
my @functions;
for my $line (split /\n/, $node->safe_psql('postgres', q{
SELECT p.proname || '|' || coalesce(array_to_string(array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t), ','), '')
  FROM pg_proc p WHERE p.pronamespace = 'usage_billing'::regnamespace AND p.prokind = 'f' ORDER BY 1}))
{
	my ($name, $types) = split /\|/, $line, 2;
	push @functions, [ $name, [ split /,/, ($types // '') ] ];
}
note('fuzzing ' . scalar(@functions) . ' functions: ' . join(', ', map { $_->[0] } @functions));

sub generic_call
{
	my $f = pick(@functions);
	my ($name, $types) = @$f;
	my @args = map { my $g = $by_type{$_}; $g ? $g->() : 'NULL' } @$types;
	return "SELECT count(*) FROM (SELECT * FROM usage_billing.$name(" . join(', ', @args) . ")) s";
}

# --- the calls -----------------------------------------------------------------------

my $id = 0;
my @valid_keys;
my %count = (valid => 0, invalid => 0, read => 0, any => 0, tenant => 0, tenant_write => 0);

sub valid_customer { return 'fz_valid_' . (1 + int(rand($valid_customers))); }

# amounts every sum meter takes (at most 6 decimals, at most 1e12); a count meter takes NULL or 1
sub valid_amount
{
	my ($meter) = @_;
	return pick('1', 'NULL', '1.000') if $meter eq 'fz_count';
	return pick('0', '1', '2.5', '0.000001', '0.001', '123456789.123456', '1e12', '1.50000000000', int(rand(1000)), '-0');
}

# returns (kind, sql, [expectations])
sub next_call
{
	my $r = rand;
	if ($r < 0.25)
	{
		# a valid increment on a valid customer
		my $c = valid_customer();
		my $m = pick('fz_sum', 'fz_count');
		my $amount = valid_amount($m);
		my $props = pick('NULL', "'{}'::jsonb", "'{\"a\": [1, 2, {\"b\": null}]}'::jsonb", lit('{"t": "' . (random_chars(10, 'ascii') =~ s/["\\]//gr) . '"}') . '::jsonb');
		my ($key, $contribution);
		if (@valid_keys && rand() < 0.1)
		{
			# a retry repeats the original call exactly: a duplicate
			my $k = pick(@valid_keys);
			($c, $m, $key, $amount, $props) = @$k;
			$contribution = 0;
		}
		else
		{
			$key = rand() < 0.7 ? "v$id" : undef;
			$contribution = $m eq 'fz_count' ? 1 : $amount;
			push @valid_keys, [ $c, $m, $key, $amount, $props ] if defined $key;
		}
		my $sql = sprintf('SELECT * FROM usage_billing.increment_usage(%s, %s, %s, %s, properties => %s)',
			lit($c), lit($m), $amount, defined $key ? lit($key) : 'NULL', $props);
		return ('valid', $sql, [ [ $c, $m, $contribution ] ]);
	}
	if ($r < 0.27)
	{
		# a valid span on a duration meter: exactly its seconds, wherever the periods split it
		my $c = valid_customer();
		my $secs = pick(0, 1, 59, 3600, int(rand(100000)));
		return ('valid', sprintf("SELECT * FROM usage_billing.record_duration(%s, 'fz_dur', now() - interval '%d seconds', now())",
				lit($c), $secs), [ [ $c, 'fz_dur', $secs ] ]);
	}
	if ($r < 0.285)
	{
		# a valid reservation, committed in the same statement: exactly its amount
		my $c = valid_customer();
		my $amount = pick('1', '2.5', '0', '42', '0.000001');
		return ('valid', sprintf("SELECT * FROM usage_billing.commit_reservation("
				  . "(SELECT reservation_id FROM usage_billing.reserve_usage(%s, 'fz_sum', %s, '1 minute', %s)))",
				lit($c), $amount, lit("r$id")), [ [ $c, 'fz_sum', $amount ] ]);
	}
	if ($r < 0.30)
	{
		# a valid batch on valid customers
		my (@ev, @exp);
		for my $i (1 .. 1 + int(rand(4)))
		{
			my $c = valid_customer();
			my $m = pick('fz_sum', 'fz_count');
			my $amount = $m eq 'fz_count' ? pick('1', 'null') : pick('1', '2.5', '0', '1e-6', '42', '"0.50"');
			push @ev, qq({"customer_id": "$c", "meter": "$m", "amount": $amount, "idempotency_key": "b$id-$i"});
			push @exp, [ $c, $m, $m eq 'fz_count' ? 1 : $amount =~ s/"//gr ];
		}
		return ('valid', 'SELECT * FROM usage_billing.increment_usage_batch(' . lit('[' . join(', ', @ev) . ']') . '::jsonb)', \@exp);
	}
	if ($r < 0.45)
	{
		# certainly invalid on a valid customer: must fail and change nothing
		my $c = valid_customer();
		my $m = pick('fz_sum', 'fz_count');
		my $key = rand() < 0.5 ? lit("h$id") : 'NULL';
		my $bad = pick('amount', 'amount', 'occurred_at', 'properties', 'meter', 'batch', 'key', 'span');
		# no key recorded yet to conflict with: a bad amount instead
		$bad = 'amount' if $bad eq 'key' && !@valid_keys;
		my ($amount, $at, $props) = ('1', 'now()', 'NULL');
		if ($bad eq 'amount')
		{
			$amount = $m eq 'fz_count' ? pick('0', '2', '-1', '1.5', "'NaN'::numeric")
			  : pick("'NaN'::numeric", "'Infinity'::numeric", "'-Infinity'::numeric", 'NULL', '-1', '-1e-20',
				"'-1e131071'::numeric", '1e-20', '0.0000001', '1e30', '1000000000000.5');
		}
		elsif ($bad eq 'occurred_at') { $at = pick('NULL', "'2999-01-01'", "now() + interval '1 hour'", "'1900-01-01'"); }
		elsif ($bad eq 'span')
		{
			# a negative span, a span in the future, a meter that is not a duration meter
			return ('invalid', pick(
					"SELECT * FROM usage_billing.record_duration(" . lit($c) . ", 'fz_dur', now(), now() - interval '1 second')",
					"SELECT * FROM usage_billing.record_duration(" . lit($c) . ", 'fz_dur', now(), now() + interval '1 hour')",
					"SELECT * FROM usage_billing.record_duration(" . lit($c) . ", 'fz_sum', now() - interval '1 hour', now())",
					"SELECT * FROM usage_billing.record_duration(" . lit($c) . ", 'fz_dur', NULL, now())"), []);
		}
		elsif ($bad eq 'key')
		{
			# a recorded key with other parameters: 23505, nothing recorded
			my ($kc, $km, $kk, $ka, $kp) = @{ pick(@valid_keys) };
			my $other = $km eq 'fz_count' ? "'fz_sum', 1" : pick("'fz_count', NULL", "'fz_sum', 1000000");
			$other = "'fz_sum', 7" if $km eq 'fz_sum' && $ka eq '1000000';
			return ('invalid', sprintf('SELECT * FROM usage_billing.increment_usage(%s, %s, %s, properties => %s)',
					lit($kc), $other, lit($kk), $kp), []);
		}
		elsif ($bad eq 'properties') { $props = pick("'[]'::jsonb", "'1'::jsonb", "'\"x\"'::jsonb", "'null'::jsonb", "'[{\"user\": 1}]'::jsonb"); }
		elsif ($bad eq 'meter') { $m = pick(random_chars(1 + int(rand(20)), 'unicode'), 'FZ_SUM', 'fz_sum ', ''); }
		else
		{
			# one bad event spoils the whole batch
			my $good = qq({"customer_id": "$c", "meter": "fz_sum", "amount": 5, "idempotency_key": "hb$id"});
			my $evil = pick(qq({"customer_id": "$c", "meter": "fz_sum", "amount": "NaN"}),
				qq({"customer_id": "$c", "meter": "fz_sum", "amount": -3}),
				qq({"customer_id": "$c", "meter": "nope"}),
				qq({"customer_id": "fz_no_such_customer", "meter": "fz_sum"}),
				qq({"customer_id": "$c", "meter": "fz_sum", "occurred_at": "not a time"}),
				qq({"customer_id": "$c", "meter": "fz_sum", "properties": []}),
				qq({"customer_id": "$c", "meter": "fz_sum", "amount": "Infinity"}),
				qq({"customer_id": "$c", "meter": "fz_sum", "amout": 5}),
				qq({"customer_id": "$c", "amount": 5}),
				qq({"customer_id": "$c", "meter": "fz_count", "amount": 5}),
				qq({"customer_id": "$c", "meter": "fz_sum", "amount": 1e-20}),
				qq({"customer_id": "$c", "meter": "fz_sum", "occurred_at": "2999-01-01T00:00:00Z"}),
				qq({"customer_id": "$c", "meter": "fz_sum", "amount": 1, "idempotency_key": "hb$id"}));
			my @ev = rand() < 0.5 ? ($good, $evil) : ($evil, $good);
			return ('invalid', 'SELECT * FROM usage_billing.increment_usage_batch(' . lit('[' . join(', ', @ev) . ']') . '::jsonb)', []);
		}
		return ('invalid', sprintf('SELECT * FROM usage_billing.increment_usage(%s, %s, %s, %s, %s, %s)',
				lit($c), lit($m), $amount, $key, $at, $props), []);
	}
	if ($r < 0.65)
	{
		# anything on the junk customers and random names
		my $c = rand() < 0.8 ? lit(pick(@junk_customers)) : rtext();
		my $m = rand() < 0.8 ? lit(pick('fz_sum', 'fz_count', 'fz_users', 'fz_max')) : rtext();
		return ('any', sprintf('SELECT * FROM usage_billing.increment_usage(%s, %s, %s, %s, %s, %s)',
				$c, $m, rnum(), rand() < 0.5 ? 'NULL' : rtext(), rts(), rjsonb()), []);
	}
	if ($r < 0.70)
	{
		return ('any', 'SELECT * FROM usage_billing.increment_usage_batch(' . rbatch([ @junk_customers, 'nobody', '' ]) . ')', [])
		  if rand() < 0.6;
		# reservations with hostile arguments, on the junk customers' holds only
		my $c = rand() < 0.8 ? lit(pick(@junk_customers)) : rtext();
		my $m = rand() < 0.8 ? lit(pick('fz_sum', 'fz_count', 'fz_users', 'fz_max')) : rtext();
		my $rid = pick('NULL', "'00000000-0000-0000-0000-000000000000'", 'gen_random_uuid()',
			"(SELECT reservation_id FROM usage_billing.reservations WHERE customer_id = ANY (ARRAY["
			  . join(', ', map({ lit($_) } @junk_customers)) . ']) ORDER BY random() LIMIT 1)');
		return ('any', pick(
				"SELECT * FROM usage_billing.reserve_usage($c, $m, " . rnum() . ', ' . rinterval() . ', '
				  . (rand() < 0.5 ? 'NULL' : rtext()) . ')',
				"SELECT * FROM usage_billing.commit_reservation($rid, " . (rand() < 0.5 ? 'NULL' : rnum()) . ')',
				"SELECT usage_billing.release_reservation($rid)"), []);
	}
	if ($r < 0.78)
	{
		# reads of the valid customers with hostile periods: read-only, any outcome
		my $c = lit(valid_customer());
		return ('read', pick(
				"SELECT count(*) FROM usage_billing.get_usage_summary($c, " . rts() . ', ' . rts() . ')',
				"SELECT count(*) FROM usage_billing.calculate_overage($c, " . rts() . ')',
				"SELECT count(*) FROM usage_billing.preview_invoice($c, " . rts() . ')',
				"SELECT count(*) FROM usage_billing.check_limit($c, " . lit(pick('fz_sum', 'fz_count', 'fz_users')) . ', ' . rnum() . ')',
				"SELECT count(*) FROM usage_billing.period_bounds(" . rts() . ', ' . rinterval() . ', ' . rts() . ')'), []);
	}
	if ($r < 0.85)
	{
		# the catalog, with junk names only (the valid customers' plan is never touched)
		my $name = rand() < 0.5 ? lit('fz_new_' . random_chars(1 + int(rand(8)), 'unicode')) : rtext();
		$name = "'fz_junk_plan'" if $name =~ /^'fz_plan'$/;
		return ('any', pick(
				"SELECT usage_billing.create_meter($name, " . rtext() . ', ' . rtext() . ', ' . rtext() . ', ' . rtext() . ', ' . rtext() . ', ' . rint() . ', ' . rnum() . ')',
				"SELECT usage_billing.create_plan($name, " . rnum() . ', ' . rtext() . ', ' . rinterval() . ')',
				"SELECT usage_billing.set_plan_limit('fz_junk_plan', " . lit(pick('fz_sum', 'fz_count', 'fz_users', 'fz_max')) . ', '
				  . rnum() . ', ' . rbool() . ', ' . rnum() . ', ' . rnum() . ', ' . rnum() . ', ' . rjsonb() . ', ' . rtext() . ')',
				"SELECT usage_billing.upsert_customer($name, " . pick("'fz_junk_plan'", rtext()) . ', ' . rts() . ', ' . rtext() . ')',
				"SELECT usage_billing.set_customer_limit(" . lit(pick(@junk_customers)) . ', ' . rtext() . ', ' . rnum() . ', ' . rbool() . ')',
				"SELECT usage_billing.set_customer_status(" . lit(pick(@junk_customers)) . ', ' . rtext() . ')'), []);
	}
	if ($r < 0.90)
	{
		# an end user through PostgREST, with hostile claims: sees its own rows or nothing, writes nothing
		my $who = pick(map({ "fz_valid_$_" } 1 .. $valid_customers), @junk_customers);
		my $claims = pick(
			lit(qq({"sub": "$who", "role": "authenticated"})), lit(qq({"customer_id": "$who"})),
			lit('{"sub": ' . pick('null', '1', '[]', '{"sub": "fz_valid_1"}', '"fz_valid_1 "', '""', 'true') . '}'),
			lit('{"sub": "' . (random_chars(1 + int(rand(30)), 'unicode') =~ s/["\\]//gr) . '"}'),
			lit(pick('not json', '[', '{"sub": "fz_valid_1"', '["fz_valid_1"]', '', '{"sub": "\u0000"}', 'null')),
			"'{\"sub\": \"' || repeat('x', 10000000) || '\"}'", "repeat('[', 100000)", rtext());
		my $target = pick(map({ "fz_valid_$_" } 1 .. $valid_customers), $who, @junk_customers);
		my $rel = pick('customers', 'customer_limits', 'usage_events', 'usage_aggregates', 'usage_unique_values',
			'current_usage', 'effective_limits');
		# public.fz_leak() (SQLSTATE UBLK1) marks a leak: rows or answers about another customer
		my $mismatch = "usage_billing.current_customer_id() IS DISTINCT FROM " . lit($target);
		my ($kind, $q) = ('tenant', pick(
				"SELECT public.fz_leak(customer_id) FROM usage_billing.$rel WHERE customer_id IS DISTINCT FROM usage_billing.current_customer_id()",
				"SELECT count(*) FROM usage_billing.my_usage()",
				"SELECT count(CASE WHEN $mismatch THEN public.fz_leak('summary') END) FROM usage_billing.get_usage_summary(" . lit($target) . ', ' . rts() . ', ' . rts() . ')',
				"SELECT count(CASE WHEN $mismatch THEN public.fz_leak('overage') END) FROM usage_billing.calculate_overage(" . lit($target) . ', ' . rts() . ')',
				"SELECT count(CASE WHEN $mismatch THEN public.fz_leak('invoice') END) FROM usage_billing.preview_invoice(" . lit($target) . ', ' . rts() . ')'));
		if (rand() < 0.25)
		{
			$kind = 'tenant_write';
			$q = pick(
				'SELECT * FROM usage_billing.increment_usage(' . lit($target) . ", 'fz_sum', 1)",
				'SELECT * FROM usage_billing.increment_usage_batch(' . lit(qq([{"customer_id": "$target", "meter": "fz_sum"}])) . '::jsonb)',
				"INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount) VALUES (" . lit($target) . ", 'fz_sum', now(), now(), 1)",
				"UPDATE usage_billing.usage_aggregates SET total = total + 1",
				"DELETE FROM usage_billing.usage_events",
				"SELECT usage_billing.upsert_customer(" . lit($target) . ", 'fz_junk_plan')",
				"SELECT usage_billing.set_tenant_claim('role')",
				"SELECT * FROM usage_billing.check_limit(" . lit($target) . ", 'fz_sum')");
		}
		return ($kind, $q, [], $claims);
	}
	# every function of the schema with random arguments of its types
	my $sql = generic_call();
	# never hand a random call a valid customer or its plan (they come only from literals we chose)
	return ('any', $sql, []);
}

my $t0 = time;
my $calls = 0;
while (time - $t0 < $seconds)
{
	my $script = "SET statement_timeout = '15s';\n";
	for (1 .. 250)
	{
		$id++;
		my ($kind, $sql, $exp, $claims) = next_call();
		die "valid customer leaked into a random call: $sql" if $kind eq 'any' && $sql =~ /'fz_valid_|'fz_plan'/;
		my $tag = 'fz' . int(rand(1e9));
		$tag = 'fz' . int(rand(1e9)) while index($sql, "\$$tag\$") >= 0;
		my $call = "SELECT public.fz_try($id, '$kind', \$$tag\$$sql\$$tag\$);";
		$call = "BEGIN; SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claims', $claims, true) IS NULL; $call COMMIT;"
		  if defined $claims;
		$script .= "$call\n";
		for my $e (@$exp)
		{
			$script .= sprintf("INSERT INTO public.fz_expect VALUES (%d, %s, %s, %s);\n", $id, lit($e->[0]), lit($e->[1]), $e->[2]);
		}
		$count{$kind}++;
		$calls++;
	}
	my ($ret, $out, $err) = $node->psql('postgres', Encode::encode('UTF-8', $script),
		extra_params => [ '-U', 'fuzzer' ]);
	if ($err =~ /server closed the connection|terminated|could not connect/)
	{
		diag("the server went away during calls up to $id: $err");
		last;
	}
	last if postmaster_pid() ne $postmaster_pid;
}
my $elapsed = time - $t0;

# --- verdict -------------------------------------------------------------------------

is(postmaster_pid(), $postmaster_pid, 'the postmaster never restarted');
my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|was terminated by exception|PANIC:/, 'no backend crashed');

my $tried = $node->safe_psql('postgres', 'SELECT count(*) FROM public.fz_result');
note(sprintf('fuzz: %d calls generated (%d valid, %d invalid, %d reads, %d any, %d tenant reads, %d tenant writes; %d huge values) in %.0f s; %s recorded',
		$calls, $count{valid}, $count{invalid}, $count{read}, $count{any}, $count{tenant}, $count{tenant_write},
		$big_count, $elapsed, $tried));
cmp_ok($tried, '>=', 1000, 'thousands of calls ran');
cmp_ok($tried, '>=', $calls * 0.99, 'every generated call ran to an answer');
my $states = $node->safe_psql('postgres',
	"SELECT string_agg(sqlstate || ' ' || n, ', ' ORDER BY sqlstate) FROM (SELECT sqlstate, count(*) n FROM public.fz_result GROUP BY 1) s");
note("SQLSTATEs seen: $states");
is($node->safe_psql('postgres', q{
SELECT coalesce(string_agg(DISTINCT sqlstate || ': ' || message || ' [' || query || ']', E'\n'), '')
  FROM public.fz_result WHERE sqlstate LIKE 'XX%'}), '', 'no internal error (SQLSTATE class XX)');
is($node->safe_psql('postgres', q{
SELECT coalesce(string_agg(sqlstate || ': ' || message || ' [' || query || ']', E'\n'), '')
  FROM (SELECT * FROM public.fz_result WHERE kind = 'valid' AND sqlstate <> '00000' LIMIT 10) f}),
	'', 'every valid call succeeded');
is($node->safe_psql('postgres', q{
SELECT coalesce(string_agg(id::text, ', '), '') FROM public.fz_result WHERE kind = 'invalid' AND sqlstate = '00000'}),
	'', 'every certainly-invalid call failed');
is($node->safe_psql('postgres', q{
SELECT coalesce(string_agg(sqlstate || ': ' || message || ' [' || query || ']', E'\n'), '')
  FROM (SELECT * FROM public.fz_result WHERE kind = 'tenant' AND sqlstate = 'UBLK1' LIMIT 10) f}),
	'', 'no tenant request saw another customer\'s rows or answers, whatever its claims');
is($node->safe_psql('postgres', q{
SELECT coalesce(string_agg(sqlstate || ' [' || coalesce(query, '') || ']', E'\n'), '')
  FROM (SELECT * FROM public.fz_result WHERE kind = 'tenant_write' AND sqlstate <> '42501' LIMIT 10) f}),
	'', 'every tenant write was refused with 42501');
# control: the same probe run by a staff role does see other customers
$node->psql('postgres', q{SELECT public.fz_try(0, 'control', $q$SELECT public.fz_leak(customer_id) FROM usage_billing.usage_aggregates WHERE customer_id IS DISTINCT FROM usage_billing.current_customer_id()$q$)},
	extra_params => [ '-U', 'fuzzer' ]);
is($node->safe_psql('postgres', q{SELECT sqlstate FROM public.fz_result WHERE kind = 'control'}),
	'UBLK1', 'the leak probe fires for a role that sees every customer');
cmp_ok($node->safe_psql('postgres', q{SELECT count(*) FROM public.fz_result WHERE kind = 'tenant' AND sqlstate = '00000'}),
	'>', 0, 'some tenant reads succeeded (the probe is not vacuous)');
# totals through aggregate_totals: the concurrent fuzz clients may leave part of a total in escrow slots
my $totals = $node->safe_psql('postgres', q{
SELECT coalesce(string_agg(format('%s/%s: expected %s, got %s', customer_id, meter, e, a), E'\n'), '')
  FROM (SELECT customer_id, meter, sum(contribution) e FROM public.fz_expect GROUP BY 1, 2) x
  FULL JOIN (SELECT customer_id, meter, sum(total) a FROM usage_billing.aggregate_totals
              WHERE customer_id LIKE 'fz\_valid\_%' GROUP BY 1, 2) y USING (customer_id, meter)
 WHERE e IS DISTINCT FROM a});
is($totals, '', 'the valid customers\' totals equal the sum of the valid calls alone');
is($node->safe_psql('postgres', q{SELECT count(*) > 0 FROM public.fz_expect}), 't', 'valid calls were tracked');
is($node->safe_psql('postgres', q{
SELECT coalesce(string_agg(format('%s/%s: ledger %s (%s events), aggregate %s (%s events)', a.customer_id, a.meter, e.s, e.n, a.total, a.event_count), E'\n'), '')
  FROM usage_billing.aggregate_totals a
  JOIN usage_billing.meters m ON m.meter = a.meter AND m.aggregation IN ('sum', 'count')
  LEFT JOIN (SELECT customer_id, meter, period_start, count(*) n,
                    sum(CASE WHEN kind = 'usage' THEN amount END) s
               FROM usage_billing.usage_events GROUP BY 1, 2, 3) e
         ON e.customer_id = a.customer_id AND e.meter = a.meter AND e.period_start = a.period_start
 WHERE a.customer_id LIKE 'fz\_valid\_%'
   AND (coalesce(e.n, 0) <> a.event_count
        OR (m.aggregation = 'sum' AND coalesce(e.s, 0) <> a.total)
        OR (m.aggregation = 'count' AND coalesce(e.n, 0) <> a.total))}),
	'', 'the valid customers\' aggregates equal their ledger');

$node->stop;
done_testing();
