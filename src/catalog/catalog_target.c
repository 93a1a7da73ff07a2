/*-------------------------------------------------------------------------
 * catalog_target.c
 *	  Deep copies of cached catalog rows, and the usage target built from
 *	  them.
 *
 * catalog_cache.c keeps customer rows and plan meters in hash tables that
 * live until the next invalidation; what a caller gets is always a copy in
 * its own memory context, so that a reset of the cache never leaves it
 * pointing at freed memory.  Those copies are made here, and so is the
 * "target" of a call (see catalog_cache.c): the customer row combined with
 * the plan meter, the customer's override of the meter applied.  catalog.c
 * builds targets the same way from what it read with SPI.  Here too: the
 * lookup of a target that must exist, for the calls that refuse otherwise.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/builtins.h"
#include "utils/numeric.h"

#include "catalog_cache.h"
#include "num.h"

static char *copy_str(const char *s);
static Numeric copy_num(Numeric n);
static void copy_meter_limit(const UbMeter *sm, const UbLimit *sl, UbMeter *m, UbLimit *l);
static Numeric default_soft_threshold(void);

/* A string, or NULL, copied into CurrentMemoryContext. */
static char *
copy_str(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

/* A numeric, or NULL, copied into CurrentMemoryContext. */
static Numeric
copy_num(Numeric n)
{
	return n ? DatumGetNumericCopy(NumericGetDatum(n)) : NULL;
}

/* Deep-copies a meter and a limit of it into CurrentMemoryContext. */
static void
copy_meter_limit(const UbMeter *sm, const UbLimit *sl, UbMeter *m, UbLimit *l)
{
	m->meter = copy_str(sm->meter);
	m->aggregation = sm->aggregation;
	m->value_property = copy_str(sm->value_property);
	m->stripe_event_name = copy_str(sm->stripe_event_name);
	m->decimals = sm->decimals;
	m->max_amount = copy_num(sm->max_amount);

	l->meter = m->meter;
	l->exists = sl->exists;
	l->aggregation = sl->aggregation;
	l->included = copy_num(sl->included);
	l->hard_cap = sl->hard_cap;
	l->overage_price = copy_num(sl->overage_price);
	l->overage_unit = copy_num(sl->overage_unit);
	l->soft_threshold = copy_num(sl->soft_threshold);
	l->tiers = NULL;
	if (sl->tiers != NULL)
	{
		const UbTiers *st = sl->tiers;
		UbTiers    *t = palloc0(offsetof(UbTiers, tiers) + st->ntiers * sizeof(UbTier));

		t->volume = st->volume;
		t->ntiers = st->ntiers;
		for (int i = 0; i < st->ntiers; i++)
		{
			t->tiers[i].up_to = copy_num(st->tiers[i].up_to);
			t->tiers[i].unit_price = copy_num(st->tiers[i].unit_price);
			t->tiers[i].flat_fee = copy_num(st->tiers[i].flat_fee);
		}
		l->tiers = t;
	}
}

/* Deep-copies a plan meter into CurrentMemoryContext. */
void
ub_copy_plan_meter(const UbPlanMeter *src, UbPlanMeter *dst)
{
	memset(dst, 0, sizeof(UbPlanMeter));
	dst->plan_part.plan = copy_str(src->plan_part.plan);
	dst->plan_part.period = src->plan_part.period;
	dst->plan_part.base_price = copy_num(src->plan_part.base_price);
	dst->plan_part.currency = copy_str(src->plan_part.currency);
	dst->meter_found = src->meter_found;
	if (src->meter_found)
		copy_meter_limit(&src->meter, &src->limit, &dst->meter, &dst->limit);
	else
		dst->meter.meter = copy_str(src->meter.meter);
}

/* Deep-copies an override into CurrentMemoryContext. */
void
ub_copy_override(const UbOverride *src, UbOverride *dst)
{
	*dst = *src;
	dst->meter = pstrdup(src->meter);
	dst->included = copy_num(src->included);
}

/* Deep-copies a customer row with its overrides into CurrentMemoryContext. */
void
ub_copy_customer_row(const UbCustomerRow *src, UbCustomerRow *row)
{
	row->customer_id = pstrdup(src->customer_id);
	row->plan = pstrdup(src->plan);
	row->billing_anchor = src->billing_anchor;
	row->status = pstrdup(src->status);
	row->stripe_customer_id = copy_str(src->stripe_customer_id);
	row->noverrides = src->noverrides;
	row->overrides = NULL;
	if (src->noverrides > 0)
		row->overrides = palloc(src->noverrides * sizeof(UbOverride));
	for (int i = 0; i < src->noverrides; i++)
		ub_copy_override(&src->overrides[i], &row->overrides[i]);
	row->nplans = 0;
	row->plan_from = NULL;
	row->plan_names = NULL;
	for (int i = 0; i < src->nplans; i++)
		ub_row_add_plan(row, src->plan_from[i], src->plan_names[i]);
}

/* The default soft threshold of a limit row, for an override without one. */
static Numeric
default_soft_threshold(void)
{
	return DatumGetNumeric(DirectFunctionCall3(numeric_in,
											   CStringGetDatum("0.8"),
											   ObjectIdGetDatum(InvalidOid),
											   Int32GetDatum(-1)));
}

/*
 * Combines a customer row and a plan meter into the target, in
 * CurrentMemoryContext: the plan meter's plan is the customer's plan (the one
 * in force at the call, which the caller chose); the customer's override replaces included, and
 * hard_cap unless it leaves it NULL; an override of a meter the plan does not
 * limit makes a limit row of the table's defaults.
 */
void
ub_build_target(const UbCustomerRow *row, const UbPlanMeter *pm,
				UbCustomer *customer, UbMeter *m, bool *meter_found, UbLimit *limit)
{
	customer->customer_id = pstrdup(row->customer_id);
	customer->plan = pstrdup(pm->plan_part.plan);
	customer->billing_anchor = row->billing_anchor;
	customer->period = pm->plan_part.period;
	customer->status = pstrdup(row->status);
	customer->stripe_customer_id = copy_str(row->stripe_customer_id);
	customer->base_price = copy_num(pm->plan_part.base_price);
	customer->currency = copy_str(pm->plan_part.currency);

	*meter_found = pm->meter_found;
	memset(limit, 0, sizeof(UbLimit));
	if (!pm->meter_found)
		return;
	copy_meter_limit(&pm->meter, &pm->limit, m, limit);

	for (int i = 0; i < row->noverrides; i++)
	{
		const UbOverride *o = &row->overrides[i];

		if (strcmp(o->meter, m->meter) != 0)
			continue;
		if (!limit->exists)
		{
			limit->exists = true;
			limit->hard_cap = false;
			limit->overage_price = NULL;
			limit->overage_unit = ub_num_int(1);
			limit->soft_threshold = default_soft_threshold();
			limit->tiers = NULL;
		}
		limit->included = copy_num(o->included);
		if (!o->hard_cap_null)
			limit->hard_cap = o->hard_cap;
		break;
	}
}
