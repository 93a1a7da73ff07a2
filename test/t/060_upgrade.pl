# Upgrade from 1.0: install the previous version, record usage, ALTER EXTENSION UPDATE; nothing
# recorded changes, recording goes on (keys recorded before still deduplicate), the 1.1 objects
# exist.  Upgrade from 1.3 with data that breaks 1.4's input rules: kept, listed by
# input_violations, recording goes on under the new rules; the 1.3 customer's plan is its
# history from the beginning, and a change after the update has history.  (The catalog columns
# compared are those of 1.0; the meters' columns of 1.4 are checked below.)
#
# Then both updated databases are compared, object by object, with a fresh install of the
# default version (its own install script, usage_billing--<version>.sql) in a second cluster:
# every fact test/extension_objects.sql prints (members, columns, constraints, indexes,
# triggers, policies, view and function definitions, flags, grants, comments, pg_dump
# registrations, the roles and their memberships) must be the same; the facts that differ are
# printed.  Both clusters have the roles a Supabase project has (authenticated, service_role),
# so the grants the extension gives them are compared too.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my ($ret13, $out13, $err13);

my $node = PostgreSQL::Test::Cluster->new('upgrade');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
usage_billing.late_event_grace = -1
timezone = 'UTC'
});
$node->start;
# the roles of a Supabase project: the install and the updates grant them access
my $supabase_roles = 'CREATE ROLE authenticated NOLOGIN; CREATE ROLE service_role NOLOGIN;';
$node->safe_psql('postgres', $supabase_roles);
$node->safe_psql('postgres', 'CREATE DATABASE old; CREATE DATABASE old13;');

$node->safe_psql('old', q{
CREATE EXTENSION usage_billing VERSION '1.0';
SELECT usage_billing.create_meter('calls', 'sum');
SELECT usage_billing.create_meter('users', 'unique_count', value_property => 'user');
SELECT usage_billing.create_plan('pro', 10);
SELECT usage_billing.set_plan_limit('pro', 'calls', included => 100, overage_price => 0.5);
SELECT usage_billing.upsert_customer('acme', 'pro', '2025-01-01 00:00+00');
SELECT usage_billing.set_customer_limit('acme', 'calls', 150);
SELECT count(*) FROM generate_series(1, 40) i,
  LATERAL usage_billing.increment_usage('acme', 'calls', i, 'k' || i, '2025-01-01'::timestamptz + i * interval '2 days');
SELECT count(*) FROM generate_series(1, 5) i,
  LATERAL usage_billing.increment_usage('acme', 'users', properties => jsonb_build_object('user', i % 3));
});
is($node->safe_psql('old', "SELECT extversion FROM pg_extension WHERE extname = 'usage_billing'"),
	'1.0', 'version 1.0 installed');
is($node->safe_psql('old', "SELECT count(*) FROM pg_proc WHERE proname = 'my_usage'"),
	'0', '1.0 has no 1.1 objects');

my $state_q = q{
SELECT 'agg ' || string_agg(x::text, ' | ' ORDER BY x::text) FROM
  (SELECT customer_id, meter, period_start, period_end, total, event_count, first_usage, last_usage
     FROM usage_billing.usage_aggregates) x
UNION ALL
SELECT 'events ' || string_agg(x::text, ' | ' ORDER BY x::text) FROM
  (SELECT event_id, customer_id, meter, period_start, occurred_at, amount, idempotency_key, properties, recorded_by
     FROM usage_billing.usage_events) x
UNION ALL
SELECT 'catalog ' || (SELECT string_agg(m::text, ',' ORDER BY m::text)
                       FROM (SELECT meter, aggregation, unit, display_name, stripe_event_name, value_property, created_at
                               FROM usage_billing.meters) m)
  || (SELECT string_agg(p::text, ',' ORDER BY p::text) FROM usage_billing.plans p)
  || (SELECT string_agg(l::text, ',' ORDER BY l::text) FROM usage_billing.plan_limits l)
  || (SELECT string_agg(c::text, ',' ORDER BY c::text)
        FROM (SELECT customer_id, plan, billing_anchor, stripe_customer_id, status, created_at, updated_at
                FROM usage_billing.customers) c)
  || (SELECT string_agg(c::text, ',' ORDER BY c::text) FROM usage_billing.customer_limits c)
  || (SELECT string_agg(u::text, ',' ORDER BY u::text) FROM usage_billing.usage_unique_values u)};
my $before = $node->safe_psql('old', $state_q);

$node->safe_psql('old', 'ALTER EXTENSION usage_billing UPDATE');
my $default_version = $node->safe_psql('old',
	"SELECT default_version FROM pg_available_extensions WHERE name = 'usage_billing'");
is($node->safe_psql('old', "SELECT extversion FROM pg_extension WHERE extname = 'usage_billing'"),
	$default_version, "updated to the default version ($default_version)");
is($node->safe_psql('old', "SELECT reloptions::text FROM pg_class WHERE oid = 'usage_billing.usage_aggregates'::regclass"),
	'{fillfactor=30}', 'the aggregates leave room for HOT updates (1.2)');
is($node->safe_psql('old', $state_q), $before, 'nothing recorded changed in the update');

# the 1.1 objects exist and work
is($node->safe_psql('old', q{
SELECT count(*) FROM pg_roles WHERE rolname IN ('usage_billing_admin', 'usage_billing_writer', 'usage_billing_reader')}),
	'3', 'the three roles exist');
is($node->safe_psql('old', q{
SELECT to_regprocedure('usage_billing.my_usage()') IS NOT NULL
   AND to_regprocedure('usage_billing.current_customer_id()') IS NOT NULL
   AND to_regprocedure('usage_billing.drop_ledger_before(timestamptz)') IS NOT NULL
   AND to_regclass('usage_billing.settings') IS NOT NULL}), 't', 'my_usage, current_customer_id, drop_ledger_before and settings exist');
is($node->safe_psql('old', "SELECT relrowsecurity FROM pg_class WHERE oid = 'usage_billing.usage_events'::regclass"),
	't', 'row-level security is on after the update');
is($node->safe_psql('old', "SELECT has_function_privilege('public', 'usage_billing.increment_usage(text,text,numeric,text,timestamptz,jsonb)', 'EXECUTE')"),
	'f', 'PUBLIC lost EXECUTE on increment_usage');
is($node->safe_psql('old', "SELECT duplicate FROM usage_billing.increment_usage('acme', 'calls', 7, 'k7', '2025-01-15')"),
	't', 'a key recorded under 1.0 still deduplicates');
my $jan = $node->safe_psql('old',
	"SELECT total FROM usage_billing.usage_aggregates WHERE period_start = '2025-01-01' AND meter = 'calls'");
is($node->safe_psql('old', q{
SELECT total FROM usage_billing.increment_usage('acme', 'calls', 2, 'after-update', '2025-01-31 12:00+00')}),
	$jan + 2, 'recording continues on the same aggregate');

# 1.3 -> 1.4 with data that breaks 1.4's input rules: the update keeps it as it was, the view
# input_violations lists it, recording goes on under the new rules
$node->safe_psql('old13', q{
CREATE EXTENSION usage_billing VERSION '1.3';
SELECT usage_billing.create_meter('calls', 'sum');
SELECT usage_billing.create_meter('logins', 'count');
SELECT usage_billing.create_plan('pro', 10);
SELECT usage_billing.set_plan_limit('pro', 'calls', included => 100, hard_cap => true, overage_price => 0.5);
SELECT usage_billing.upsert_customer('acme', 'pro', '2025-01-01 00:00+00', repeat('c', 124));
});
# recorded by 1.3's SQL (the library is already the new one): what 1.3 accepted
$node->safe_psql('old13', q{
INSERT INTO usage_billing.usage_events (customer_id, meter, period_start, occurred_at, amount, idempotency_key)
VALUES ('acme', 'logins', '2025-01-01', '2025-01-02', 5, 'l1'),
       ('acme', 'calls', '2025-01-01', '2025-01-03', 1e-20, 'c1');
INSERT INTO usage_billing.usage_aggregates (customer_id, meter, period_start, period_end, total, event_count)
VALUES ('acme', 'logins', '2025-01-01', '2025-02-01', 1, 1),
       ('acme', 'calls', '2025-01-01', '2025-02-01', 1e-20, 1);
});
my $before13 = $node->safe_psql('old13', $state_q);
$node->safe_psql('old13', 'ALTER EXTENSION usage_billing UPDATE');
is($node->safe_psql('old13', "SELECT extversion FROM pg_extension WHERE extname = 'usage_billing'"),
	$default_version, "1.3 updated to the default version ($default_version)");
is($node->safe_psql('old13', $state_q), $before13, 'nothing recorded in 1.3 changed in the update');
is($node->safe_psql('old13', q{SELECT string_agg(meter || ' ' || decimals || ' ' || max_amount, ', ' ORDER BY meter) FROM usage_billing.meters}),
	'calls 6 1000000000000, logins 6 1000000000000', 'existing meters take the default decimals and max_amount');
is($node->safe_psql('old13', q{
SELECT string_agg(object || ' ' || field, ', ' ORDER BY object, field, problem) FROM usage_billing.input_violations}),
	'customer stripe_customer_id, plan_limit hard_cap, usage_event amount, usage_event amount',
	'input_violations lists the 1.3 rows that break the 1.4 rules');
is($node->safe_psql('old13', "SELECT duplicate FROM usage_billing.increment_usage('acme', 'logins', 5, 'l1', '2025-01-02')"),
	't', 'a key recorded under 1.3 with an amount 1.4 refuses still answers as a duplicate');
($ret13, $out13, $err13) = $node->psql('old13', "SELECT usage_billing.increment_usage('acme', 'logins', 5, 'l2', '2025-01-02')");
like($err13, qr/amount of count meter "logins" must be NULL or 1/, 'a new event follows the 1.4 rules');
is($node->safe_psql('old13', "SELECT total FROM usage_billing.increment_usage('acme', 'logins', 1, 'l3', '2025-01-02')"),
	'2', 'recording continues on the aggregate kept from 1.3');

# plan history after 1.3: the customer's plan is in force from the beginning, its invoices
# start with the period of the update (nothing before it is invoiced), and a plan change now
# has history (a period priced by segments)
is($node->safe_psql('old13', q{
SELECT string_agg(customer_id || ' ' || plan || ' ' || effective_from || ' ' || coalesce(effective_to::text, '-'), ', ')
  FROM usage_billing.plan_history}), 'acme pro -infinity -', 'the 1.3 plan is in force from the beginning');
is($node->safe_psql('old13', q{
SELECT count(*) FROM usage_billing.invoice_starts WHERE invoices_from > '2025-12-01'}), '1',
	'invoices of 1.3 customers start at the update');
is($node->safe_psql('old13', "SELECT usage_billing.finalize_invoices()"), '0',
	'finalize_invoices right after the update invoices no period of 1.3');
$node->safe_psql('old13', q{
SELECT usage_billing.create_plan('pro2', 40);
SELECT usage_billing.change_plan('acme', 'pro2', 'immediate', '2025-01-16 00:00+00');});
is($node->safe_psql('old13', q{
SELECT string_agg(line || ' ' || amount || ' ' || coalesce(segment_start::text, '-'), ', ')
  FROM usage_billing.preview_invoice('acme', '2025-01-10')}),
	'base 4.84 2025-01-01 00:00:00+00, usage 0.00 2025-01-01 00:00:00+00, base 20.65 2025-01-16 00:00:00+00, total 25.49 -',
	'a change after the update splits its period: pro for 15 days, pro2 for 16');

# updated == fresh install, object by object.  The fresh install runs in a cluster of its own,
# so that it creates the roles itself (as a first install does).
my $fresh_node = PostgreSQL::Test::Cluster->new('fresh');
$fresh_node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$fresh_node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
usage_billing.late_event_grace = -1
timezone = 'UTC'
});
$fresh_node->start;
$fresh_node->safe_psql('postgres', $supabase_roles);
$fresh_node->safe_psql('postgres', 'CREATE DATABASE fresh');
my $sharedir = $fresh_node->config_data('--sharedir');
ok(-f "$sharedir/extension/usage_billing--$default_version.sql",
	"an install script of the default version exists (CREATE EXTENSION runs it, not the updates)");
$fresh_node->safe_psql('fresh', 'CREATE EXTENSION usage_billing');
is($fresh_node->safe_psql('fresh', "SELECT extversion FROM pg_extension WHERE extname = 'usage_billing'"),
	$default_version, "fresh install at the default version ($default_version)");

my $shape_sql = slurp_file('test/extension_objects.sql');
my @fresh = split /\n/, $fresh_node->safe_psql('fresh', $shape_sql);

# the query sees what it must compare
my %kinds;
$kinds{$_}++ for map { /^member (\w+)/ ? $1 : () } @fresh;
cmp_ok($kinds{table} // 0, '>=', 20, 'the shape query sees the tables');
cmp_ok($kinds{view} // 0, '>=', 8, 'the shape query sees the views');
cmp_ok($kinds{function} // 0, '>=', 55, 'the shape query sees the functions');
cmp_ok($kinds{sequence} // 0, '>=', 4, 'the shape query sees the sequences');
for my $fact (
	qr/^table usage_billing\.meters: column 010 duration_unit text collate "default"$/,
	qr/^table usage_billing\.usage_events: column 012 recorded_by text not null default SESSION_USER /,
	qr/^table usage_billing\.usage_aggregates: relkind=r .* options=fillfactor=30 rowsecurity=true /,
	qr/^table usage_billing\.usage_events: policy tenant_own_rows cmd=r .* to=public /,
	qr/^function usage_billing\.increment_usage\(.*\): kind=f .* security_definer=true /,
	qr/^function usage_billing\.export_plan\(integer\): definition \d+ /,
	qr/^view usage_billing\.current_usage: grant SELECT to authenticated by /,
	qr/^extension usage_billing: config usage_billing\.usage_events_event_id_seq /,
	qr/^comment on policy staff_all on table usage_billing\.customers: /,
	qr/^role service_role: member of usage_billing_service$/,
	qr/^role usage_billing_reader: super=false .* login=false .* bypassrls=false /)
{
	ok((grep { $_ =~ $fact } @fresh), "the shape query prints $fact");
}

# Compares two lists of facts; on a difference, prints the objects that differ and the facts
# found on one side only.
sub same_shape
{
	my ($got, $want, $name) = @_;
	my %count;
	$count{$_}++ for @$got;
	$count{$_}-- for @$want;
	my @extra = grep { $count{$_} > 0 } sort keys %count;
	my @missing = grep { $count{$_} < 0 } sort keys %count;
	my $ok = ok(!@extra && !@missing, $name);
	if (!$ok)
	{
		my %objects;
		$objects{ (/^(.*?): / ? $1 : $_) } = 1 for @extra, @missing;
		diag("objects that differ:\n  " . join("\n  ", sort keys %objects));
		diag("only after the update:\n  " . join("\n  ", @extra)) if @extra;
		diag("only in the fresh install:\n  " . join("\n  ", @missing)) if @missing;
	}
	return $ok;
}

same_shape([ split /\n/, $node->safe_psql('old', $shape_sql) ], \@fresh,
	'1.0 updated to the default version has the objects of a fresh install, fact by fact');
same_shape([ split /\n/, $node->safe_psql('old13', $shape_sql) ], \@fresh,
	'1.3 updated to the default version has the objects of a fresh install, fact by fact');
$fresh_node->stop;

# roles are cluster-wide: one made beforehand with BYPASSRLS (or SUPERUSER) stops the install
$node->safe_psql('postgres', 'CREATE DATABASE squat; ALTER ROLE usage_billing_reader BYPASSRLS;');
my ($ret, $out, $err) = $node->psql('squat', 'CREATE EXTENSION usage_billing');
isnt($ret, 0, 'install refused while usage_billing_reader has BYPASSRLS');
like($err, qr/role "usage_billing_reader" already exists with SUPERUSER or BYPASSRLS/, 'with a clear message');
$node->safe_psql('postgres', 'ALTER ROLE usage_billing_reader NOBYPASSRLS; ALTER ROLE usage_billing_writer LOGIN;');
($ret, $out, $err) = $node->psql('squat', 'CREATE EXTENSION usage_billing');
is($ret, 0, 'install succeeds once the role is fixed');
like($err, qr/WARNING:  role "usage_billing_writer" already exists and can log in/, 'a pre-existing LOGIN role is reported');

# DROP EXTENSION removes every object of the extension; its schema (which the extension depends
# on, not the other way round) stays, empty, with its USAGE grants; DROP SCHEMA removes them; the
# roles are cluster-wide and stay
$node->safe_psql('squat', q{
CREATE ROLE squat_tenant NOLOGIN;
SELECT usage_billing.grant_tenant_access('squat_tenant');
DROP EXTENSION usage_billing;
});
my $left_q = q{
SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'usage_billing') || ' schema, '
    || (SELECT count(*) FROM pg_class WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = 'usage_billing'))
    + (SELECT count(*) FROM pg_proc WHERE pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = 'usage_billing')) || ' objects, '
    || (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'usage\_billing\_%') || ' roles, '
    || (SELECT count(*) FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid
         WHERE d.dbid = (SELECT oid FROM pg_database WHERE datname = 'squat')
           AND r.rolname IN ('squat_tenant', 'usage_billing_admin', 'usage_billing_writer', 'usage_billing_reader'))
    || ' privileges left'};
is($node->safe_psql('squat', $left_q), '1 schema, 0 objects, 4 roles, 4 privileges left',
	'DROP EXTENSION leaves the empty schema with its USAGE grants, and the roles');
$node->safe_psql('squat', 'DROP SCHEMA usage_billing');
is($node->safe_psql('squat', $left_q), '0 schema, 0 objects, 4 roles, 0 privileges left',
	'DROP SCHEMA removes the last privileges; the cluster-wide roles stay');
$node->safe_psql('postgres', 'DROP ROLE squat_tenant');
$node->safe_psql('squat', 'CREATE EXTENSION usage_billing');
pass('the extension installs again over the roles it left');

$node->stop;
done_testing();
