# Makefile for usage_billing (PGXS)

EXTENSION    = usage_billing
EXTVERSION   = $(shell sed -n "s/^default_version = '\(.*\)'/\1/p" $(EXTENSION).control)
MODULE_big   = usage_billing
OBJS = \
	src/usage_billing.o \
	src/periods.o \
	src/catalog.o \
	src/catalog_cache.o \
	src/catalog_target.o \
	src/catalog_preload.o \
	src/citus.o \
	src/plan_history.o \
	src/pricing.o \
	src/record.o \
	src/record_prepare.o \
	src/escrow.o \
	src/escrow_store.o \
	src/relations.o \
	src/reservations.o \
	src/batch.o \
	src/batch_sql.o \
	src/alerts.o \
	src/corrections.o \
	src/duration.o \
	src/insight.o \
	src/report.o \
	src/limits.o \
	src/summary.o \
	src/invoice.o \
	src/period_pricing.o \
	src/finalize.o \
	src/shmem.o \
	src/export_worker.o \
	src/stripe_client.o \
	src/export_outbox.o \
	src/export_secrets.o \
	src/redact.o \
	src/export_cancel.o \
	src/export_cancel_http.o

DATA = $(wildcard sql/$(EXTENSION)--*.sql)

PG_CPPFLAGS = -I$(srcdir)/src
# warnings are errors in the test runner and CI only (test/run_tests.sh: make COPT=-Werror)
PG_CFLAGS   = -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare -Wno-missing-field-initializers
SHLIB_LINK  = -lcurl -lcjson

# pg_regress: a throwaway instance with the library preloaded
REGRESS      = $(patsubst sql/%.sql,%,$(filter-out sql/$(EXTENSION)--%,$(wildcard sql/*.sql)))
REGRESS_OPTS = --temp-instance=tmp_check_regress --temp-config=$(srcdir)/test/regress.conf

# isolation specs live in test/isolation/{specs,expected}
ISOLATION      = $(patsubst test/isolation/specs/%.spec,%,$(wildcard test/isolation/specs/*.spec))
ISOLATION_OPTS = --temp-instance=tmp_check_iso --temp-config=$(srcdir)/test/regress.conf \
	--inputdir=$(srcdir)/test/isolation --outputdir=test/isolation/output_iso

TAP_TESTS   = 1
PROVE_TESTS = test/t/*.pl

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every object is rebuilt when a header changes: structs are shared between files
$(OBJS): $(wildcard $(srcdir)/src/*.h)

# Benchmark (numbers, not a test): throwaway cluster, pgbench ours vs naive baselines, see
# doc/benchmarks.md.  Needs the extension installed (make install).  BENCH_SECONDS=10 per run
# by default.
.PHONY: bench
bench:
	PG_CONFIG=$(PG_CONFIG) bash $(srcdir)/test/bench/run.sh
