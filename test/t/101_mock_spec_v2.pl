# 101_mock_spec_v2.pl - the mock's v2 meter event stream itself: sessions on the API host,
# the stream on the events host only, refusing what Stripe refuses (more than 100 events,
# unknown fields, a missing event_name or payload, a bad or expired token, the secret key on
# the stream) and what this mock refuses on purpose (an event without identifier), dropping
# what Stripe's asynchronous validation drops, storing a duplicate identifier once, and the
# faults of v1.  No PostgreSQL node needed.
use strict;
use warnings;
use HTTP::Tiny;
use JSON::PP;
use POSIX qw(strftime);
use Test::More;

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $m = ub_start_mock(v2 => 1);
my $http = HTTP::Tiny->new(timeout => 10);
my $seq = 0;

# POSTs JSON (a string, or a structure to encode); returns (status, decoded body or undef).
sub post
{
	my ($url, $body, %h) = @_;
	my %headers = ('Content-Type' => 'application/json', 'Stripe-Version' => '2026-07-29.dahlia', %h);
	delete $headers{$_} for grep { !defined $headers{$_} } keys %headers;
	my $r = $http->post($url, { content => ref $body ? encode_json($body) : $body, headers => \%headers });
	my $d = eval { decode_json($r->{content}) };
	return ($r->{status}, $d);
}

sub session
{
	my ($st, $d) = post("$m->{url}/v2/billing/meter_event_session", '', Authorization => "Bearer $UB_KEY",
		'Content-Type' => undef);
	return ($st, $d);
}

sub rfc3339 { return strftime('%Y-%m-%dT%H:%M:%S.000Z', gmtime($_[0] // time())); }

sub event
{
	my (%o) = @_;
	my $e = { event_name => $o{event_name} // 'api_calls',
		identifier => $o{identifier} // ('v2spec-' . ++$seq),
		timestamp => $o{timestamp} // rfc3339(),
		payload => { stripe_customer_id => $o{customer} // 'cus_1', value => $o{value} // '3' } };
	delete $e->{$_} for @{ $o{without} // [] };
	return $e;
}

sub stream
{
	my ($token, $events, %h) = @_;
	return post("$m->{events_url}/v2/billing/meter_event_stream",
		ref $events eq 'ARRAY' ? { events => $events } : $events, Authorization => "Bearer $token", %h);
}

sub violations { ub_mock_get($m, 'stats')->{violations} }
sub total { ub_mock_get($m, 'totals')->{ $_[0] // 'cus_1|api_calls' } // 0 }

# a session, in the spec's shape
my ($st, $s) = session();
is($st, 200, 'a session is opened with the secret key');
is_deeply([ sort keys %$s ], [qw(authentication_token created expires_at id livemode object)],
	'the answer has exactly the fields of v2.billing.meter_event_session');
is($s->{object}, 'v2.billing.meter_event_session', 'its object');
like($s->{expires_at}, qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/, 'expires_at is RFC 3339');
my $tok = $s->{authentication_token};
($st) = post("$m->{url}/v2/billing/meter_event_session", '', Authorization => 'Bearer sk_test_wrong',
	'Content-Type' => undef);
is($st, 401, 'a wrong key opens no session');
($st) = post("$m->{url}/v2/billing/meter_event_session", { foo => 1 }, Authorization => "Bearer $UB_KEY");
is($st, 400, 'a session takes no parameters');
is(violations(), 1, 'counted as a violation');

# accepted: one event, 100 events, answer {}
my $d;
($st, $d) = stream($tok, [ event(identifier => 'ok-1') ]);
is($st, 200, 'one event is accepted');
is_deeply($d, {}, 'the answer is {}');
is(total(), 3, 'and stored');
($st) = stream($tok, [ map { event(customer => "cus_h$_", value => '1') } 1 .. 100 ]);
is($st, 200, '100 events in one request are accepted');
is(ub_mock_get($m, 'v2')->{max_events}, 100, 'the mock saw 100 events in one request');
($st) = stream($tok, [ event(without => ['timestamp'], value => '2') ]);
is($st, 200, 'an event without timestamp is accepted (Stripe uses now)');
($st) = stream($tok, [ event(customer => 'cus_1', value => '1') ], 'Stripe-Version' => undef);
is($st, 200, 'with or without Stripe-Version');
is(violations(), 1, 'no violation counted for valid requests');

# a duplicate identifier is stored once and the request still answers {}
my $dups = ub_mock_get($m, 'stats')->{duplicates};
my $t0 = total();
($st, $d) = stream($tok, [ event(identifier => 'ok-1'), event(identifier => 'new-1', value => '5') ]);
is($st, 200, 'a request with a duplicate identifier answers 200');
is(total(), $t0 + 5, 'only the new event counts');
is(ub_mock_get($m, 'stats')->{duplicates}, $dups + 1, 'the duplicate is counted');

# refused at once, nothing of the request stored, each a violation
my $before = violations();
$t0 = total();
my @bad = (
	[ '101 events', { events => [ map { event() } 1 .. 101 ] } ],
	[ 'an event without identifier', { events => [ event(), event(without => ['identifier']) ] } ],
	[ 'an empty identifier', { events => [ event(identifier => '') ] } ],
	[ 'an identifier over 100 characters', { events => [ event(identifier => 'i' x 101) ] } ],
	[ 'an event without event_name', { events => [ event(without => ['event_name']) ] } ],
	[ 'an event without payload', { events => [ event(without => ['payload']) ] } ],
	[ 'an event_name over 100 characters', { events => [ event(event_name => 'e' x 101) ] } ],
	[ 'an unknown event field', { events => [ { %{ event() }, value => '1' } ] } ],
	[ 'an unknown top-level field', { events => [ event() ], foo => 1 } ],
	[ 'a number as payload value', { events => [ { %{ event() }, payload => { stripe_customer_id => 'cus_1', value => 3 } } ] } ],
	[ 'a Unix timestamp', { events => [ { %{ event() }, timestamp => time() } ] } ],
	[ 'no events array', {} ],
	[ 'a body that is not JSON', 'events=1' ],
);
for my $b (@bad)
{
	my ($what, $body) = @$b;
	($st, $d) = stream($tok, $body);
	is($st, 400, "$what: refused");
	is($d->{error}{code}, 'invalid_fields', "$what: code invalid_fields");
}
($st) = stream($tok, [ event() ], 'Content-Type' => 'application/x-www-form-urlencoded');
is($st, 400, 'a form body: refused');
is(violations(), $before + @bad + 1, 'each refusal counted as a violation');
is(total(), $t0, 'nothing of a refused request stored');
($st, $d) = stream($tok, { events => [ event(), event(without => ['identifier']) ] });
is($d->{error}{param}, 'events[1].identifier', 'the refusal names the event');

# tokens: unknown, the secret key, expired; the stream only on the events host
$before = violations();
($st) = stream('ek_test_unknown', [ event() ]);
is($st, 401, 'an unknown token: 401');
($st) = stream($UB_KEY, [ event() ]);
is($st, 401, 'the secret key on the stream: 401');
is(violations(), $before + 2, 'both counted as violations');
($st) = post("$m->{url}/v2/billing/meter_event_stream", { events => [ event() ] }, Authorization => "Bearer $tok");
is($st, 404, 'the stream is not on the API host');
ub_mock_post($m, 'v2/expire', {});
($st, $d) = stream($tok, [ event() ]);
is($st, 401, 'an expired token: 401');
is($d->{error}{type}, 'temporary_session_expired', 'type temporary_session_expired');
is($d->{error}{code}, 'billing_meter_event_session_expired', 'code billing_meter_event_session_expired');
is(violations(), $before + 2, 'an expired session is no violation');
(undef, $s) = session();
$tok = $s->{authentication_token};
($st) = stream($tok, [ event() ]);
is($st, 200, 'a new session sends again');

# Stripe's asynchronous validation: accepted, then dropped (and counted)
$before = violations();
$t0 = total();
for my $case ([ 'a decimal value', event(value => '1.5') ], [ 'a negative value', event(value => '-2') ],
	[ 'a timestamp 400 s ahead', event(timestamp => rfc3339(time() + 400)) ],
	[ 'a timestamp 36 days old', event(timestamp => rfc3339(time() - 36 * 86400)) ],
	[ 'a customer id with a blank', event(customer => 'cus_a b') ])
{
	($st) = stream($tok, [ $case->[1] ]);
	is($st, 200, "$case->[0]: answered 200, as Stripe validates later");
}
is(violations(), $before + 5, 'each dropped event counted as a violation');
is(total(), $t0, 'none of them stored');
($st) = stream($tok, [ event(customer => 'cus_bad_1') ]);
ok((grep { /No such customer: 'cus_bad_1'/ } @{ ub_mock_get($m, 'v2')->{error_reports} }),
	'an unknown customer is dropped and reported, not a violation');
is(violations(), $before + 5, 'no violation for it');

# the faults of v1 on stream requests
$t0 = total();
ub_mock_post($m, 'faults', { kind => '500_after', count => 1 });
($st) = stream($tok, [ event(identifier => 'f-1', value => '7') ]);
is($st, 500, '500_after: answered 500');
is(total(), $t0 + 7, '500_after: stored all the same');
($st) = stream($tok, [ event(identifier => 'f-1', value => '7') ]);
is($st, 200, '500_after: the resend answers 200');
is(total(), $t0 + 7, '500_after: and is not counted twice');
ub_mock_post($m, 'faults', { kind => '500', count => 1 });
($st) = stream($tok, [ event(identifier => 'f-2', value => '4') ]);
is($st, 500, '500: answered 500');
is(total(), $t0 + 7, '500: nothing stored');
ub_mock_post($m, 'faults', { kind => 'drop_after', count => 1 });
($st) = stream($tok, [ event(identifier => 'f-3', value => '2') ]);
ok($st >= 599 || $st == 0, 'drop_after: no answer');
is(total(), $t0 + 9, 'drop_after: stored');
ub_mock_post($m, 'faults', { kind => '429_retry_after', count => 1, retry_after => 2 });
my $r = $http->post("$m->{events_url}/v2/billing/meter_event_stream",
	{ content => encode_json({ events => [ event() ] }),
	  headers => { 'Content-Type' => 'application/json', Authorization => "Bearer $tok" } });
is($r->{status}, 429, '429_retry_after: 429');
is($r->{headers}{'retry-after'}, '2', 'with Retry-After');
ok($r->{headers}{'request-id'}, 'answers carry a Request-Id');

done_testing();
