# Pricing with plan changes against an independent reference model: test/lifecycle_reference.py
# (Python, exact fractions and decimal, none of the extension's code) draws 200 random
# histories -- month-end anchors, immediate, period_end and auto changes (some exactly at a
# period boundary), events on a sum and a max meter, overage, graduated and volume tiers --
# and prices two billing periods of each.  Every invoice line preview_invoice returns (per
# segment the prorated base and the usage lines, then the total) must equal the model's to the
# cent, and finalize_invoices must write the same lines.
use strict;
use warnings;
use File::Temp qw(tempdir);
use FindBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $seed = $ENV{UB_REFERENCE_SEED} // 20261207;
my $histories = 200;
my $dir = tempdir(CLEANUP => 1);
my $script = "$FindBin::RealBin/../lifecycle_reference.py";

system('python3', $script, $seed, $histories, $dir) == 0
  or BAIL_OUT("the reference model failed: $?");

my $node = PostgreSQL::Test::Cluster->new('reference');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'usage_billing'
usage_billing.export_interval = 0
usage_billing.late_event_grace = -1
timezone = 'UTC'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION usage_billing');
$node->safe_psql('postgres', slurp_file("$dir/setup.sql"), on_error_stop => 1);

# the model's lines and the periods it priced, in order
my (@expected, @periods);
for my $row (split /\n/, slurp_file("$dir/expected.txt"))
{
	if ($row =~ /^#(.*)\|(\d+)$/) { push @periods, [ $1, $2 ]; }
	else { push @expected, $row; }
}
is(scalar(@periods), 2 * $histories, "the model priced two periods of $histories histories");

my $values = join(', ', map { "($_, '$periods[$_][0]', $periods[$_][1])" } 0 .. $#periods);
my $lines_q = qq{
SELECT v.c || '|' || v.ps || '|' || p.line || '|' || coalesce(p.meter, '') || '|'
       || coalesce(extract(epoch FROM p.segment_start)::bigint::text, '') || '|' || p.amount
  FROM (VALUES $values) v(i, c, ps),
       LATERAL usage_billing.preview_invoice(v.c, to_timestamp(v.ps)) WITH ORDINALITY p
 ORDER BY v.i, p.ordinality};
my @got = split /\n/, $node->safe_psql('postgres', $lines_q);

my @diff;
for my $i (0 .. ($#expected > $#got ? $#expected : $#got))
{
	my $e = $expected[$i] // '(none)';
	my $g = $got[$i] // '(none)';
	push @diff, "line $i: model $e, extension $g" if $e ne $g;
}
is(scalar(@got), scalar(@expected), 'as many invoice lines as the model');
is(scalar(@diff), 0, 'every invoice line equals the model to the cent')
  or diag(join("\n", @diff[ 0 .. ($#diff < 9 ? $#diff : 9) ]));

my @segmented = grep { /\|base\|\|/ } @expected;
my %periods_with_changes;
for (@segmented) { my ($c, $p) = split /\|/; $periods_with_changes{"$c|$p"}++; }
my $split = grep { $_ > 1 } values %periods_with_changes;
cmp_ok($split, '>=', 50, "at least 50 of the periods have a plan change ($split)");
my $billed = grep { /\|usage\|/ && !/\|0\.00$/ } @expected;
cmp_ok($billed, '>=', 100, "at least 100 usage lines bill something ($billed)");

# calculate_overage agrees with the invoice's usage lines (exact costs, rounded per line)
is($node->safe_psql('postgres', qq{
SELECT count(*) FROM (VALUES $values) v(i, c, ps),
       LATERAL (SELECT coalesce(sum(round(o.overage_cost, 2)), 0) AS cost
                  FROM usage_billing.calculate_overage(v.c, to_timestamp(v.ps)) o) o,
       LATERAL (SELECT coalesce(sum(p.amount), 0) AS amount
                  FROM usage_billing.preview_invoice(v.c, to_timestamp(v.ps)) p
                 WHERE p.line = 'usage') p
 WHERE o.cost <> p.amount}), '0', 'calculate_overage prices every period as the invoice does');

# finalized, the invoices keep exactly these lines
# (invoices from each customer's first priced period; every second period ends by May 2020)
$node->safe_psql('postgres', qq{
UPDATE usage_billing.invoice_starts s SET invoices_from = to_timestamp(v.ps)
  FROM (VALUES $values) v(i, c, ps) WHERE s.customer_id = v.c AND v.i % 2 = 0});
my $out = $node->safe_psql('postgres', q{
LISTEN usage_billing_invoices;
SELECT usage_billing.finalize_invoices('2020-05-01 01:00+00');});
my @notes = ($out =~ /Asynchronous notification "usage_billing_invoices" with payload "([^\n]*)" received/g);
my ($created) = ($out =~ /^(\d+)$/m);
cmp_ok($created, '>=', 2 * $histories, "finalize_invoices created the invoices ($created)");
is(scalar(@notes), $created, 'one notification per invoice');
like($notes[0] // '', qr/"invoice_number" : 1, "customer_id" : "rm_/, 'the notification names the invoice');
is($node->safe_psql('postgres', "SELECT usage_billing.finalize_invoices('2020-05-01 01:00+00')"), '0',
	'a second finalization creates none');
my @final = split /\n/, $node->safe_psql('postgres', qq{
SELECT v.c || '|' || v.ps || '|' || l.line || '|' || coalesce(l.meter, '') || '|'
       || coalesce(extract(epoch FROM l.segment_start)::bigint::text, '') || '|' || l.amount
  FROM (VALUES $values) v(i, c, ps)
  JOIN usage_billing.invoices i ON i.customer_id = v.c AND i.period_start = to_timestamp(v.ps)
  JOIN usage_billing.invoice_lines l ON l.invoice_id = i.invoice_id
 ORDER BY v.i, l.line_no});
is_deeply(\@final, \@expected, 'the finalized invoices hold the model\'s lines');

$node->stop;
done_testing();
