# 100_mock_spec.pl - the mock Stripe itself: it must accept what Stripe's published
# request schemas accept, refuse what they refuse (counting each refusal as a spec
# violation), answer in the spec's shapes, store a duplicate identifier once and answer it
# in each form, and inject the ambiguous answers on demand.  No PostgreSQL node needed.
use strict;
use warnings;
use HTTP::Tiny;
use JSON::PP;
use MIME::Base64;
use Test::More;

our $UB_KEY;
do './test/perl/ub_lib.pl' or die "ub_lib.pl: $@ $!";

my $m = ub_start_mock();
my $http = HTTP::Tiny->new(timeout => 10);
my $seq = 0;

# POSTs a raw form body; returns (status, decoded body or undef).
sub post
{
	my ($path, $body, %h) = @_;
	my %headers = ('Authorization' => "Bearer $UB_KEY",
		'Content-Type' => 'application/x-www-form-urlencoded',
		'Stripe-Version' => '2026-07-29.dahlia', %h);
	delete $headers{$_} for grep { !defined $headers{$_} } keys %headers;
	my $r = $http->post("$m->{url}$path", { content => $body, headers => \%headers });
	my $d = eval { decode_json($r->{content}) };
	return ($r->{status}, $d);
}

sub event_body
{
	my (%o) = @_;
	my $ident = $o{identifier} // ('spec-' . ++$seq);
	my $ts = $o{timestamp} // time();
	return join('&', "event_name=" . ($o{event_name} // 'api_calls'),
		'payload%5Bstripe_customer_id%5D=' . ($o{customer} // 'cus_1'),
		'payload%5Bvalue%5D=' . ($o{value} // '3'),
		"identifier=$ident", "timestamp=$ts", @{ $o{extra} // [] });
}

sub violations { ub_mock_get($m, 'stats')->{violations} }

# accepted, in Stripe's shape
my ($st, $d) = post('/v1/billing/meter_events', event_body(identifier => 'ok-1'));
is($st, 200, 'a valid meter event is accepted');
is_deeply([ sort keys %$d ], [qw(created event_name identifier livemode object payload timestamp)],
	'the answer has exactly the fields of billing.meter_event');
is($d->{payload}{value}, '3', 'values come back as strings');
($st) = post('/v1/billing/meter_events',
	'event_name=api_calls&payload[stripe_customer_id]=cus_1&payload[value]=2&identifier=ok-2');
is($st, 200, 'literal brackets and no timestamp are accepted');
($st) = post('/v1/billing/meter_events', event_body(extra => [ 'expand%5B%5D=payload', 'expand[]=x' ]));
is($st, 200, 'expand[] is accepted (the schema has it)');
($st, $d) = post('/v1/billing/meter_events', event_body(extra => ['payload%5Bregion%5D=eu']));
is($st, 200, 'a custom payload key is accepted (additionalProperties: string)');
is($d->{payload}{region}, 'eu', 'and comes back');
($st) = post('/v1/billing/meter_events', event_body(),
	Authorization => 'Basic ' . encode_base64("$UB_KEY:", ''));
is($st, 200, 'HTTP basic with the key as user is accepted');
is(violations(), 0, 'no violation counted for valid requests');

# refused, each counted
my $now = time();
my @bad = (
	[ 'unknown top-level parameter', event_body(extra => ['foo=1']) ],
	[ 'customer as a top-level parameter', event_body(extra => ['stripe_customer_id=cus_1']) ],
	[ 'missing event_name', 'payload%5Bstripe_customer_id%5D=cus_1&payload%5Bvalue%5D=1' ],
	[ 'missing payload', 'event_name=api_calls&identifier=x-1' ],
	[ 'event_name over 100 characters', event_body(event_name => 'e' x 101) ],
	[ 'identifier over 100 characters', event_body(identifier => 'i' x 101) ],
	[ 'empty identifier', event_body(identifier => '') ],
	[ 'decimal value', event_body(value => '1.5') ],
	[ 'negative value', event_body(value => '-3') ],
	[ 'missing value', 'event_name=api_calls&payload%5Bstripe_customer_id%5D=cus_1' ],
	[ 'timestamp not an integer', event_body(timestamp => 'abc') ],
	[ 'timestamp 400 s ahead', event_body(timestamp => $now + 400) ],
	[ 'timestamp 36 days old', event_body(timestamp => $now - 36 * 86400) ],
	[ 'customer id over 100 characters', event_body(customer => 'cus_' . ('x' x 97)) ],
	[ 'blank customer id', event_body(customer => '%20%20') ],
	[ 'customer id with a blank', event_body(customer => 'cus_1%20') ],
	[ 'payload value over 100 characters', event_body(extra => [ 'payload%5Bnote%5D=' . ('n' x 101) ]) ],
	[ 'nested payload', event_body(extra => ['payload%5Ba%5D%5Bb%5D=1']) ],
	[ 'payload as a scalar', 'event_name=api_calls&payload=1' ]);
for my $b (@bad)
{
	my $before = violations();
	my ($s, $e) = post('/v1/billing/meter_events', $b->[1]);
	is($s, 400, "refused: $b->[0]");
	is($e->{error}{type}, 'invalid_request_error', "$b->[0]: invalid_request_error");
	is(violations(), $before + 1, "$b->[0]: counted as a violation");
}
my $before = violations();
($st) = post('/v1/billing/meter_events', '{"event_name":"api_calls"}', 'Content-Type' => 'application/json');
is($st, 400, 'a JSON body is refused');
($st) = post('/v1/billing/meter_events', event_body(), 'Idempotency-Key' => 'k' x 256);
is($st, 400, 'an Idempotency-Key over 255 characters is refused');
is(violations(), $before + 2, 'both counted');
($st, $d) = post('/v1/billing/meter_events', event_body(), Authorization => 'Bearer sk_test_wrongwrongwrong');
is($st, 401, 'a wrong key gets 401');
unlike($d->{error}{message}, qr/wrongwrongwrong/, 'and is quoted masked');
is(ub_mock_get($m, 'stats')->{stripe_versions}{'2026-07-29.dahlia'} > 0, 1, 'Stripe-Version recorded');

# a duplicate identifier: stored once, answered in each form
for my $form (qw(200 code exists param))
{
	ub_mock_post($m, 'config', { dup_answer => $form });
	my $id = "dup-$form";
	my $t0 = ub_mock_get($m, 'totals')->{'cus_dup|api_calls'} // 0;
	post('/v1/billing/meter_events', event_body(identifier => $id, customer => 'cus_dup', value => 5));
	my ($s, $e) = post('/v1/billing/meter_events', event_body(identifier => $id, customer => 'cus_dup', value => 5));
	is(ub_mock_get($m, 'totals')->{'cus_dup|api_calls'}, $t0 + 5, "dup ($form): stored once");
	if ($form eq '200')
	{
		is($s, 200, 'dup (200): answered 200');
		is($e->{identifier}, $id, 'dup (200): with the stored event');
	}
	else
	{
		is($s, 400, "dup ($form): answered 400");
		is($e->{error}{code},
			{ code => 'duplicate_meter_event', exists => 'resource_already_exists', param => undef }->{$form},
			"dup ($form): code");
		is($e->{error}{param}, 'identifier', "dup ($form): param identifier");
	}
}
is(violations(), $before + 2, 'duplicates are not violations');

# processed, then 500 (saved under the key and replayed), then the same identifier again
ub_mock_post($m, 'config', { dup_answer => 'param' });
ub_mock_post($m, 'faults', { kind => '500_after' });
my $body = event_body(identifier => 'amb-1', customer => 'cus_amb', value => 7);
($st) = post('/v1/billing/meter_events', $body, 'Idempotency-Key' => 'amb-1');
is($st, 500, 'processed-then-500 answers 500');
is(ub_mock_get($m, 'totals')->{'cus_amb|api_calls'}, 7, 'but the event is stored');
($st) = post('/v1/billing/meter_events', $body, 'Idempotency-Key' => 'amb-1');
is($st, 500, 'the same key replays the 500');
($st, $d) = post('/v1/billing/meter_events', event_body(identifier => 'amb-1', customer => 'cus_amb', value => 9),
	'Idempotency-Key' => 'amb-1');
is($d->{error}{type}, 'idempotency_error', 'the same key with other parameters: idempotency_error');
($st) = post('/v1/billing/meter_events', $body, 'Idempotency-Key' => 'amb-1-k1');
is($st, 400, 'a new key reaches the duplicate identifier');
is(ub_mock_get($m, 'totals')->{'cus_amb|api_calls'}, 7, 'still stored once');

# processed, then lost
ub_mock_post($m, 'faults', { kind => 'drop_after' });
my $r = $http->post("$m->{url}/v1/billing/meter_events", { content => event_body(identifier => 'lost-1',
	customer => 'cus_lost', value => 4), headers => { Authorization => "Bearer $UB_KEY",
	'Content-Type' => 'application/x-www-form-urlencoded' } });
is($r->{status}, 599, 'processed-then-lost: no answer');
is(ub_mock_get($m, 'totals')->{'cus_lost|api_calls'}, 4, 'processed-then-lost: stored');

# in flight per customer and event name
ub_mock_post($m, 'faults', { kind => 'slow', count => 2, seconds => 1 });
my @kids;
for my $i (1 .. 2)
{
	my $pid = fork();
	if ($pid == 0)
	{
		post('/v1/billing/meter_events', event_body(customer => 'cus_conc'));
		POSIX::_exit(0);
	}
	push @kids, $pid;
}
waitpid($_, 0) for @kids;
is(ub_mock_get($m, 'stats')->{max_inflight_per_key}, 2, 'two requests in flight for one customer and meter are counted');

# adjustments: the spec's shape (no id), validation, already cancelled
post('/v1/billing/meter_events', event_body(identifier => 'can-1', customer => 'cus_can', value => 6));
post('/v1/billing/meter_events', event_body(identifier => 'can-2', customer => 'cus_can', value => 1));
$before = violations();
for my $b ([ 'missing type', 'event_name=api_calls&cancel%5Bidentifier%5D=can-1' ],
	[ 'type not cancel', 'event_name=api_calls&type=void&cancel%5Bidentifier%5D=can-1' ],
	[ 'unknown parameter', 'event_name=api_calls&type=cancel&cancel%5Bidentifier%5D=can-1&value=3' ],
	[ 'unknown cancel key', 'event_name=api_calls&type=cancel&cancel%5Bid%5D=can-1' ],
	[ 'missing event_name', 'type=cancel&cancel%5Bidentifier%5D=can-1' ])
{
	my ($s) = post('/v1/billing/meter_event_adjustments', $b->[1]);
	is($s, 400, "cancel refused: $b->[0]");
}
is(violations(), $before + 5, 'cancel refusals counted as violations');
($st, $d) = post('/v1/billing/meter_event_adjustments',
	'event_name=api_calls&type=cancel&cancel%5Bidentifier%5D=can-1&expand[]=cancel');
is($st, 200, 'a valid cancel (with expand[]) is accepted');
is_deeply([ sort keys %$d ], [qw(cancel event_name livemode object status type)],
	'the answer has exactly the fields of billing.meter_event_adjustment (no id)');
is(ub_mock_get($m, 'totals')->{'cus_can|api_calls'}, 1, 'the cancelled value left the totals');
($st, $d) = post('/v1/billing/meter_event_adjustments', 'event_name=api_calls&type=cancel&cancel%5Bidentifier%5D=can-1');
is($st, 400, 'cancelling twice: 400');
like($d->{error}{message}, qr/already been cancel/, 'saying already cancelled');
ub_mock_post($m, 'adjustment_faults', { kind => '500_after' });
($st) = post('/v1/billing/meter_event_adjustments', 'event_name=api_calls&type=cancel&cancel%5Bidentifier%5D=can-2');
is($st, 500, 'cancel processed-then-500 answers 500');
is(ub_mock_get($m, 'totals')->{'cus_can|api_calls'}, 0, 'but the cancel happened');
is(violations(), $before + 5, 'no further violation');

# event summaries: the spec's parameters and shape; sums what is held, cancels excluded
ub_mock_post($m, 'meters', { id => 'mtr_test_api', event_name => 'api_calls', formula => 'sum' });
my $t0 = int(time() / 3600) * 3600 - 3600;
post('/v1/billing/meter_events', event_body(identifier => "sum-$_", customer => 'cus_sum', value => $_,
	timestamp => $t0 + 60 * $_)) for 1 .. 4;
post('/v1/billing/meter_event_adjustments', 'event_name=api_calls&type=cancel&cancel%5Bidentifier%5D=sum-4');

sub summaries
{
	my ($query, $id) = @_;
	my $r = $http->get("$m->{url}/v1/billing/meters/" . ($id // 'mtr_test_api') . "/event_summaries?$query",
		{ headers => { Authorization => "Bearer $UB_KEY", 'Stripe-Version' => '2026-07-29.dahlia' } });
	return ($r->{status}, eval { decode_json($r->{content}) });
}
my $end = $t0 + 3600;
($st, $d) = summaries("customer=cus_sum&start_time=$t0&end_time=$end");
is($st, 200, 'event summaries: answered');
is_deeply([ sort keys %$d ], [qw(data has_more object url)], 'a list object');
is($d->{url}, '/v1/billing/meters/mtr_test_api/event_summaries', 'with the url the spec\'s pattern has');
is_deeply([ sort keys %{ $d->{data}[0] } ], [qw(aggregated_value end_time id livemode meter object start_time)],
	'items have exactly the fields of billing.meter_event_summary');
is($d->{data}[0]{aggregated_value}, 6, 'the sum of what Stripe holds (1 + 2 + 3; 4 was cancelled)');
($st, $d) = summaries("customer=cus_sum&start_time=$t0&end_time=" . ($t0 + 7200) . "&value_grouping_window=hour&expand[]=data");
is(scalar(@{ $d->{data} }), 2, 'hourly windows: one summary per hour');
is($d->{data}[1]{aggregated_value}, 6, 'the older hour holds 6');
($st) = summaries("customer=cus_sum&start_time=$t0&end_time=$end", 'mtr_unknown');
is($st, 404, 'unknown meter: 404');
$before = violations();
for my $b ([ 'missing customer', "start_time=$t0&end_time=$end" ],
	[ 'start_time not minute-aligned', 'customer=cus_sum&start_time=' . ($t0 + 1) . "&end_time=$end" ],
	[ 'unknown parameter', "customer=cus_sum&start_time=$t0&end_time=$end&meter=x" ],
	[ 'grouping window not an enum value', "customer=cus_sum&start_time=$t0&end_time=$end&value_grouping_window=week" ],
	[ 'hour grouping off the hour', 'customer=cus_sum&start_time=' . ($t0 + 60) . "&end_time=$end&value_grouping_window=hour" ],
	[ 'limit above 100', "customer=cus_sum&start_time=$t0&end_time=$end&limit=101" ])
{
	my ($s) = summaries($b->[1]);
	is($s, 400, "summaries refused: $b->[0]");
}
is(violations(), $before + 6, 'summary refusals counted as violations');

done_testing();
