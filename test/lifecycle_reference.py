#!/usr/bin/env python3
"""An independent reference model of pricing with plan changes (contract 9.4).

It shares no code with the extension: periods, plan history, segments, proration and
tiers are computed here with Python's exact arithmetic (fractions, then decimal for the
rounding to cents, half away from zero), from the contract's text.

    lifecycle_reference.py SEED N OUTDIR

writes OUTDIR/setup.sql (the catalog, N customers with random anchors, random plan
changes -- immediate, period_end, auto -- and random events over two billing periods) and
OUTDIR/expected.txt: for each customer and period, the invoice lines the model prices,
one per line as  customer|period_start epoch|line|meter|segment_start epoch|amount,
in preview_invoice's order (per segment the base line, then usage lines by meter), then the
total line (meter and segment empty).
"""
import calendar
import datetime as dt
import os
import random
import sys
from decimal import Decimal, ROUND_HALF_UP
from fractions import Fraction

UTC = dt.timezone.utc
METERS = ['rm_peak', 'rm_units']          # max, sum (sorted: preview order)
AGG = {'rm_peak': 'max', 'rm_units': 'sum'}

# plan -> base price and limits per meter: ('overage', included, price, unit) or
# ('graduated'|'volume', [(up_to, unit_price, flat_fee), ...]) or ('free', included)
PLANS = {
    'rm_free': (Decimal('0'), {'rm_units': ('free', Decimal(1000))}),
    'rm_basic': (Decimal('19.99'), {'rm_units': ('overage', Decimal(500), Decimal('0.013'), Decimal(1))}),
    'rm_pro': (Decimal('49'), {'rm_units': ('overage', Decimal(2000), Decimal('0.50'), Decimal(100)),
                               'rm_peak': ('overage', Decimal(10), Decimal('1.5'), Decimal(1))}),
    'rm_tiered': (Decimal('99'), {'rm_units': ('graduated', [(Decimal(1000), Decimal(0), Decimal(0)),
                                                             (Decimal(5000), Decimal('0.02'), Decimal(0)),
                                                             (None, Decimal('0.011'), Decimal('2.5'))])}),
    'rm_volume': (Decimal('79.5'), {'rm_units': ('volume', [(Decimal(3000), Decimal('0.004'), Decimal(1)),
                                                            (None, Decimal('0.003'), Decimal(7))]),
                                    'rm_peak': ('overage', Decimal(5), Decimal(2), Decimal(1))}),
}


def catalog_sql():
    out = ["SELECT usage_billing.create_meter('rm_peak', 'max');",
           "SELECT usage_billing.create_meter('rm_units', 'sum');"]
    for plan, (base, limits) in PLANS.items():
        out.append(f"SELECT usage_billing.create_plan('{plan}', {base});")
        for meter, lim in limits.items():
            if lim[0] == 'free':
                out.append(f"SELECT usage_billing.set_plan_limit('{plan}', '{meter}', included => {lim[1]});")
            elif lim[0] == 'overage':
                out.append(f"SELECT usage_billing.set_plan_limit('{plan}', '{meter}', included => {lim[1]},"
                           f" overage_price => {lim[2]}, overage_unit => {lim[3]});")
            else:
                tiers = ', '.join('{"up_to": %s, "unit_price": %s, "flat_fee": %s}'
                                  % ('null' if u is None else u, p, f) for u, p, f in lim[1])
                out.append(f"SELECT usage_billing.set_plan_limit('{plan}', '{meter}', tiers => '[{tiers}]',"
                           f" tier_mode => '{lim[0]}');")
    return out


def add_months(anchor, k):
    """anchor + k months, the day clamped to the month's last, the time of day kept."""
    months = anchor.year * 12 + (anchor.month - 1) + k
    year, month = divmod(months, 12)
    month += 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_of(anchor, t):
    """The billing period [start, end) containing t."""
    k = (t.year - anchor.year) * 12 + (t.month - anchor.month) - 1
    while add_months(anchor, k + 1) <= t:
        k += 1
    while add_months(anchor, k) > t:
        k -= 1
    return add_months(anchor, k), add_months(anchor, k + 1)


def plan_at(history, t):
    plan = history[0][1]
    for start, p in history:
        if start is None or start <= t:
            plan = p
    return plan


def change_plan(history, anchor, plan, effective, at):
    """The contract's change_plan, on a history [(effective_from or None for -inf, plan)]."""
    cur = plan_at(history, at)
    if effective == 'auto':
        effective = 'immediate' if PLANS[plan][0] >= PLANS[cur][0] else 'period_end'
    start = at if effective == 'immediate' else period_of(anchor, at)[1]
    history = [(s, p) for s, p in history if s is None or s < start]
    if plan_at(history, start) != plan:
        history.append((start, plan))
    return history


def round_cents(x):
    """An exact amount (a Fraction, not negative) to cents, half away from zero."""
    cents = (Fraction(x) * 100 + Fraction(1, 2)).__floor__()
    return Decimal(cents).scaleb(-2).quantize(Decimal('0.01'))


def usage_cost(lim, total):
    """Exact cost (a Fraction) of a segment's total under one limit; None when not billed."""
    total = Fraction(total)
    kind = lim[0]
    if kind == 'free':
        return None
    if kind == 'overage':
        over = max(total - Fraction(lim[1]), Fraction(0))
        return Fraction(lim[2]) * over / Fraction(lim[3])
    cost = Fraction(0)
    if kind == 'graduated':
        lower = Fraction(0)
        for up_to, price, fee in lim[1]:
            if total <= lower:
                break
            upper = total if up_to is None else min(total, Fraction(up_to))
            cost += (upper - lower) * Fraction(price) + Fraction(fee)
            if up_to is None:
                break
            lower = Fraction(up_to)
        return cost
    for up_to, price, fee in lim[1]:             # volume
        if up_to is None or total <= Fraction(up_to):
            return total * Fraction(price) + Fraction(fee)
    raise AssertionError('no open tier')


def epoch(t):
    return int(t.timestamp())


def price_period(customer, history, anchor, ps, pe, events):
    """The lines of one period: per segment base and billed usage lines, then total."""
    cuts = [ps] + sorted({s for s, _ in history if s is not None and ps < s < pe}) + [pe]
    lines = []
    total = Decimal(0)
    period_len = Fraction(int((pe - ps).total_seconds() * 1_000_000))
    for s, e in zip(cuts, cuts[1:]):
        plan = plan_at(history, s)
        base, limits = PLANS[plan]
        amount = round_cents(Fraction(base) * Fraction(int((e - s).total_seconds() * 1_000_000)) / period_len)
        lines.append((customer, epoch(ps), 'base', '', epoch(s), amount))
        total += amount
        for meter in METERS:
            lim = limits.get(meter)
            if lim is None or lim[0] == 'free':
                continue
            amounts = [a for m, a, t in events if m == meter and s <= t < e]
            seg_total = (max(amounts) if amounts else 0) if AGG[meter] == 'max' else sum(amounts)
            amount = round_cents(usage_cost(lim, seg_total))
            lines.append((customer, epoch(ps), 'usage', meter, epoch(s), amount))
            total += amount
    lines.append((customer, epoch(ps), 'total', '', '', total.quantize(Decimal('0.01'))))
    return lines


def random_time(rng, start, end):
    span = int((end - start).total_seconds())
    return start + dt.timedelta(seconds=rng.randrange(span))


def main():
    seed, n, outdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rng = random.Random(seed)
    sql = catalog_sql()
    expected = []
    plans = list(PLANS)
    for i in range(n):
        customer = f'rm_{seed}_{i}'
        day = rng.choice([1, 2, 15, 28, 29, 30, 31])
        month = rng.randrange(1, 13)
        year = 2019
        day = min(day, calendar.monthrange(year, month)[1])
        anchor = dt.datetime(year, month, day, rng.randrange(24), rng.randrange(60), tzinfo=UTC)
        first = rng.choice(plans)
        sql.append(f"SELECT usage_billing.upsert_customer('{customer}', '{first}', '{anchor.isoformat()}');")
        history = [(None, first)]
        # the first priced period contains an instant of Jan or Feb 2020 (all end by May 2020)
        p0 = period_of(anchor, dt.datetime(2020, 1, 1, tzinfo=UTC) + dt.timedelta(days=rng.randrange(0, 60)))
        p1 = (p0[1], period_of(anchor, p0[1])[1])
        # changes in time order, some exactly at boundaries
        times = sorted(random_time(rng, p0[0], p1[1]) for _ in range(rng.randrange(0, 5)))
        if rng.random() < 0.3:
            times = sorted(times + [p0[1]])
        for at in times:
            plan = rng.choice(plans)
            effective = rng.choice(['immediate', 'immediate', 'period_end', 'auto'])
            sql.append(f"SELECT usage_billing.change_plan('{customer}', '{plan}', '{effective}', '{at.isoformat()}');")
            history = change_plan(history, anchor, plan, effective, at)
        events = []
        for j in range(rng.randrange(0, 12)):
            meter = rng.choice(METERS)
            amount = rng.randrange(1, 40) if meter == 'rm_peak' else rng.choice(
                [rng.randrange(1, 300), rng.randrange(100, 4000), rng.randrange(1000, 9000)])
            t = random_time(rng, p0[0], p1[1])
            events.append((meter, amount, t))
            sql.append(f"SELECT 1 FROM usage_billing.increment_usage('{customer}', '{meter}', {amount},"
                       f" '{customer}-{j}', '{t.isoformat()}');")
        for ps, pe in (p0, p1):
            expected.extend(price_period(customer, history, anchor, ps, pe, events))
            expected.append(('period', customer, epoch(ps)))
    with open(os.path.join(outdir, 'setup.sql'), 'w') as f:
        f.write('\n'.join(sql) + '\n')
    with open(os.path.join(outdir, 'expected.txt'), 'w') as f:
        for row in expected:
            if row[0] == 'period':
                f.write(f'#{row[1]}|{row[2]}\n')
            else:
                f.write('|'.join(str(x) for x in row) + '\n')


if __name__ == '__main__':
    main()
