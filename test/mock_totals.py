#!/usr/bin/env python3
"""test/mock_totals.py: compare what the mock Stripe received with what the database holds.

usage: mock_totals.py TOTALS_URL EXPECTED_TSV [--print]

EXPECTED_TSV has lines "stripe_customer_id<TAB>event_name<TAB>total_all_periods<TAB>total_current_period".
Reads GET TOTALS_URL (the mock's /_mock/totals), flattens it into (customer, event_name) -> value
and exits 0 when every expected pair matches either total, 1 when some do not (yet), 2 when the
answer could not be read, 3 when it was not understood.  --print shows the received totals as a table.

The flattening accepts the shapes a mock is likely to use:
  {"cus_1": {"api_calls": 5}}                          customer -> event -> number
  {"cus_1": {"api_calls": {"<period>": 5, ...}}}       ... -> per-period numbers (summed)
  {"cus_1|api_calls": 5}                               "customer|event" -> number (test/mock_stripe.py)
  {"totals": <any of these>}                           wrapped
  [{"customer": "cus_1", "event_name": "api_calls", "value": 5}, ...]   records
"""
import json
import sys
import urllib.request
from decimal import Decimal, InvalidOperation

CUSTOMER_KEYS = ("stripe_customer_id", "customer", "customer_id")
EVENT_KEYS = ("event_name", "event", "meter")
VALUE_KEYS = ("value", "total", "sum", "aggregated_value")


def num(v):
    """Decimal of a number or numeric string, else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return Decimal(str(v))
    if isinstance(v, str):
        try:
            return Decimal(v)
        except InvalidOperation:
            return None
    return None


def sum_leaves(v):
    """Sum of a number or of the numbers in a (nested) dict; None when there are none."""
    n = num(v)
    if n is not None:
        return n
    if isinstance(v, dict):
        parts = [sum_leaves(x) for x in v.values()]
        parts = [p for p in parts if p is not None]
        return sum(parts, Decimal(0)) if parts else None
    return None


def flatten(data):
    """(customer, event) -> Decimal, or None when the shape is not understood."""
    if isinstance(data, dict):
        for wrap in ("totals", "data", "meter_events"):
            if wrap in data and isinstance(data[wrap], (dict, list)):
                return flatten(data[wrap])
    out = {}
    if isinstance(data, list):
        for rec in data:
            if not isinstance(rec, dict):
                return None
            c = next((rec[k] for k in CUSTOMER_KEYS if k in rec), None)
            if c is None and isinstance(rec.get("payload"), dict):
                c = rec["payload"].get("stripe_customer_id")
            e = next((rec[k] for k in EVENT_KEYS if k in rec), None)
            v = next((num(rec[k]) for k in VALUE_KEYS if k in rec), None)
            if v is None and isinstance(rec.get("payload"), dict):
                v = num(rec["payload"].get("value"))
            if c is None or e is None or v is None:
                return None
            out[(c, e)] = out.get((c, e), Decimal(0)) + v
        return out
    if isinstance(data, dict) and data and all(isinstance(k, str) and "|" in k for k in data):
        for k, v in data.items():
            c, e = k.split("|", 1)
            s = sum_leaves(v)
            if s is None:
                return None
            out[(c, e)] = out.get((c, e), Decimal(0)) + s
        return out
    if isinstance(data, dict):
        for c, per_event in data.items():
            if not isinstance(per_event, dict):
                return None
            for e, v in per_event.items():
                s = sum_leaves(v)
                if s is None:
                    return None
                out[(c, e)] = s
        return out
    return None


def main():
    url, expected_file = sys.argv[1], sys.argv[2]
    show = "--print" in sys.argv[3:]
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.loads(r.read().decode())
    except Exception as exc:  # noqa: BLE001 - any failure means "not readable yet"
        print(f"could not read {url}: {exc}", file=sys.stderr)
        return 2
    got = flatten(data)
    if got is None:
        if show:
            print("mock totals (raw, shape not recognised):")
            print(json.dumps(data, indent=2, sort_keys=True))
        return 3
    expected = {}
    with open(expected_file) as f:
        for line in f:
            if line.strip():
                c, e, all_p, cur_p = line.rstrip("\n").split("\t")
                expected[(c, e)] = (Decimal(all_p), Decimal(cur_p))
    ok = True
    rows = []
    for key in sorted(set(expected) | set(got)):
        g = got.get(key, Decimal(0))
        exp = expected.get(key)
        if exp is None:
            verdict = "unexpected"
            ok = False
        elif g == exp[0]:
            verdict = "= database (all periods)"
        elif g == exp[1]:
            verdict = "= database (current period)"
        else:
            verdict = "differs"
            ok = False
        rows.append((key[0], key[1], g, exp[1] if exp else "-", exp[0] if exp else "-", verdict))
    if show:
        print(f"{'stripe customer':<16} {'event_name':<12} {'in stripe':>10} {'db: current period':>19} "
              f"{'db: all periods':>16}  check")
        for c, e, g, cur, allp, v in rows:
            print(f"{c:<16} {e:<12} {g.normalize():>10f} {str(cur):>19} {str(allp):>16}  {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
