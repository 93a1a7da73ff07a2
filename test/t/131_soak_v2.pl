# 131_soak_v2.pl - the bounded soak of 130_soak.pl over Stripe's v2 meter event stream
# (usage_billing.stripe_api = 'v2'): the same mixed faults now hit requests of many events,
# the worker is killed and the server stopped immediately while requests are in flight, and
# Stripe must end with exactly what the test recorded.  Replay a run with UB_SOAK_SEED.
use strict;
use warnings;
# loaded here, at compile time, so that their INIT blocks run (130_soak.pl is loaded at run time)
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our $UB_SOAK_API = 'v2';
do './test/t/130_soak.pl' or die "130_soak.pl: $@ $!";
