#!/usr/bin/env python3
"""
mock_stripe.py - a loopback stand-in for Stripe's Billing meter event endpoints, for the
usage_billing TAP tests, benchmark and demo.  Python 3 standard library only.

  python3 test/mock_stripe.py [--port 0] [--port-file F] [--key sk_test_mock]
                              [--lifetime 900] [--rate-limit 0] [--dup-answer FORM]

It is meant to be as strict as Stripe and as treacherous.

Strict.  Every request is checked against the request schemas of Stripe's published
OpenAPI description (spec3.json, API version 2026-07-29.dahlia), transcribed into SPEC
below, and against the rules the schema cannot express (documented in the API reference
and in doc/stripe.md of this repository):

  POST /v1/billing/meter_events             form: event_name (string <= 100, required),
      payload (object of strings, required; must hold stripe_customer_id and value;
      any other key is accepted, as Stripe does), identifier (string <= 100),
      timestamp (integer, Unix seconds, past 35 days .. 5 minutes ahead), expand[]
      (array of strings).  value: a whole number as a decimal string; payload values
      <= 100 characters; any other top-level parameter is refused (additionalProperties
      false).  A stripe_customer_id that is blank, carries blanks or is longer than 100
      characters is refused (Stripe would reject it; this mock refuses it at once).
  POST /v1/billing/meter_event_adjustments  form: event_name (string <= 100, required),
      type (enum cancel, required), cancel[identifier] (string <= 100), expand[].
  Both: Authorization Bearer <key> (or HTTP basic with the key as user), Content-Type
      application/x-www-form-urlencoded, Idempotency-Key <= 255 characters.  Brackets may
      come literally or percent-encoded.

Every refusal for a malformed request counts as a spec violation (GET /_mock/stats:
"violations", and the last messages in "violation_log"): a correct client sends none.

Answers come in Stripe's shapes: a billing.meter_event object (created, event_name,
identifier, livemode, object, payload, timestamp) and a billing.meter_event_adjustment
object (cancel, event_name, livemode, object, status, type: it has no id); errors as
{"error": {"type", "code"?, "message", "param"?}} with a Request-Id header.

Treacherous.  A duplicate identifier is stored once and answered in one of the forms v1
may use (doc/stripe.md, "Answers"; --dup-answer or POST /_mock/config {"dup_answer"}):
  200             the stored event again, HTTP 200
  code            400 invalid_request_error, code duplicate_meter_event, param identifier
  exists          400 invalid_request_error, code resource_already_exists, param identifier
  param           400 invalid_request_error, no code, only param identifier
  random          one of the four, per request
An Idempotency-Key replays the first answer (500s included, as Stripe does), a different
body under the same key is an idempotency_error, a concurrent request with a key in
progress gets 409.  Unlike Stripe, which reports unknown customers asynchronously, a
customer id starting with "cus_bad" is refused at once (400, not a violation), so that
failed-row reporting can be tested.

Control endpoints (tests only):
  GET  /_mock/totals   {"<customer>|<event_name>": sum of accepted, not cancelled values}
  GET  /_mock/last     {"<customer>|<event_name>": value of the latest event by timestamp}
  GET  /_mock/events   accepted events, in arrival order
  GET  /_mock/stats    requests, accepted, duplicates, dup_answers (per form), replays,
                       statuses, max_window (most requests in 1 s), max_inflight,
                       max_inflight_per_key (most requests in flight for one customer and
                       event name, cancels included), violations, violation_log,
                       stripe_versions (header value -> count), max_ahead (largest
                       timestamp - arrival time, seconds), faults_served, faults_queued,
                       summary_requests, accounts_seen (Stripe-Account value -> count)
  POST /_mock/faults   {"kind": K, "count": N, "retry_after": S, "seconds": S} queued
                       for the next N meter event requests; K is one of
                       500 | 429 | 429_retry_after | hang (sleep, drop, nothing recorded) |
                       slow (record, sleep, answer) | drop_after (record, drop: processed,
                       then lost) | 500_after (record, answer 500: processed, then 500) |
                       close | 400_should_retry_false | huge_500 (1 MB message) |
                       garbage_500 (broken JSON) | garbage_200 (record, answer non-JSON)
  POST /_mock/config   {"rate_limit": N (429 beyond N requests a second; 0 = off),
                        "dup_answer": FORM, "cancel_dup_answer": "400" | "200"}
  POST /_mock/clear_faults   drop every queued fault (events and cancels)
  POST /_mock/reset    forget everything

Meter event summaries (reading back what Stripe holds):
  GET  /v1/billing/meters/{id}/event_summaries   query: customer (required), start_time and
                       end_time (required integers, aligned to minutes; to hours or UTC days
                       with value_grouping_window hour or day), limit (1..100), starting_after,
                       ending_before, expand[].  Answers a list of billing.meter_event_summary
                       (aggregated_value over the not cancelled events of the customer and the
                       meter's event name with start_time <= timestamp < end_time), newest
                       window first.  Unknown meter id: 404 resource_missing.
  POST /_mock/meters   {"id": "mtr_...", "event_name": E, "formula": "sum" | "count" | "last"}
                       registers a meter for the summaries
  POST /_mock/lose     {"customer": C, "event_name": E, "count": N, "account": A} forgets the
                       newest N accepted events of a customer and event name, behind the
                       client's back (Stripe "lost" them: totals, summaries and identifiers)
  POST /_mock/duplicate  {"customer": C, "event_name": E, "count": N, "account": A} stores a
                       copy of each of the newest N events under a new identifier (Stripe
                       counted them twice); the copies can be cancelled like any event

Connect (Stripe-Account).  A request with the header Stripe-Account: acct_... acts in that
connected account: events, identifiers, Idempotency-Keys, cancels and summaries are kept per
account (totals and events name the account as "acct_...:<customer>|<event_name>").  A value
that is not "acct_" and letters or digits is a spec violation.  A customer registered with
POST /_mock/customers {"id": "cus_...", "account": "acct_..." | null} exists in that account
only: a meter event or summary naming it in another account is refused (400
resource_missing, as Stripe answers for a customer it does not know; not a violation).
Unregistered customers exist everywhere.

Meter event adjustments (cancels):
  POST /v1/billing/meter_event_adjustments   cancels one accepted event received less
                       than 24 h ago (by the mock's clock): its value leaves the totals.
                       Unknown identifier, other event name or older than 24 h: 400.
                       Already cancelled: 400 "...has already been canceled" (no code), or
                       with cancel_dup_answer "200" the adjustment object again.
  GET  /_mock/adjustments          {"requests", "cancelled", "cancelled_value", "refused",
                                    "already", "replays", "identifiers": [...]}
  POST /_mock/adjustment_faults    {"kind": 500 | 500_after | 429 | slow | drop_after |
                                    close, "count": N, "seconds": S} for the next N cancels
  POST /_mock/age      {"seconds": S} makes every accepted event look S seconds older

v2 (meter event sessions and the meter event stream, with --events-port-file): see the
v2 section at the end of this file.

It stops by itself after --lifetime seconds so that a test never leaves it behind.
"""
import argparse
import base64
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

# --- request schemas, transcribed from spec3.json (paths ... requestBody ... schema) ---
EXPAND = {"type": "array", "items": {"type": "string", "maxLength": 5000}}
SPEC = {
    "/v1/billing/meter_events": {
        "type": "object", "additionalProperties": False,
        "required": ["event_name", "payload"],
        "properties": {
            "event_name": {"type": "string", "maxLength": 100},
            "expand": EXPAND,
            "identifier": {"type": "string", "maxLength": 100},
            "payload": {"type": "object", "additionalProperties": {"type": "string"}},
            "timestamp": {"type": "integer", "format": "unix-time"},
        },
    },
    "/v1/billing/meter_event_adjustments": {
        "type": "object", "additionalProperties": False,
        "required": ["event_name", "type"],
        "properties": {
            "cancel": {"type": "object", "additionalProperties": False,
                       "properties": {"identifier": {"type": "string", "maxLength": 100}}},
            "event_name": {"type": "string", "maxLength": 100},
            "expand": EXPAND,
            "type": {"type": "string", "enum": ["cancel"]},
        },
    },
}
# query parameters of GET /v1/billing/meters/{id}/event_summaries (spec3.json "parameters")
SUMMARY_QUERY = {
    "type": "object", "additionalProperties": False,
    "required": ["customer", "end_time", "start_time"],
    "properties": {
        "customer": {"type": "string", "maxLength": 5000},
        "end_time": {"type": "integer", "format": "unix-time"},
        "ending_before": {"type": "string", "maxLength": 5000},
        "expand": EXPAND,
        "limit": {"type": "integer"},
        "start_time": {"type": "integer", "format": "unix-time"},
        "starting_after": {"type": "string", "maxLength": 5000},
        "value_grouping_window": {"type": "string", "enum": ["day", "hour"]},
    },
}
SUMMARIES = re.compile(r"^/v1/billing/meters/([^/?]+)/event_summaries(?:\?(.*))?$")
DUP_FORMS = ("200", "code", "exists", "param")
WHOLE = re.compile(r"^[0-9]+$")
INTEGER = re.compile(r"^-?[0-9]+$")


class RAW(bytes):
    """An answer body sent as is (malformed JSON, binary)."""


class Refusal(Exception):
    """A request Stripe would refuse: (message, param, code)."""

    def __init__(self, message, param=None, code="parameter_invalid"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


lock = threading.Lock()
state = {}


def reset():
    """Forgets every event, key, fault and counter (settings from the command line stay)."""
    keep = {k: state[k] for k in ("rate_limit", "dup_answer", "cancel_dup_answer") if k in state}
    state.clear()
    state.update(
        events=[], identifiers={}, by_ident={}, idem={}, idem_busy=set(), faults=deque(),
        totals={}, last={}, arrivals=deque(), max_window=0, inflight=0,
        max_inflight=0, key_inflight={}, max_inflight_per_key=0, requests=0, accepted=0,
        duplicates=0, dup_answers={}, replays=0, statuses={}, rate_limit=0, rate_second=0,
        rate_count=0, faults_served=0, violations=0, violation_log=deque(maxlen=20),
        stripe_versions={}, max_ahead=None, dup_answer="param", cancel_dup_answer="400",
        meters={}, summary_requests=0, customers={}, accounts_seen={})
    state.update(keep)
    reset_adjustments()
    reset_v2()


def parse_form(raw):
    """
    Parses a form body into nested dicts and lists the way Stripe (Rack) does:
    a[b]=1 is {"a": {"b": "1"}}, a[]=x and a[0]=x are lists; the last scalar wins.
    """
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw))
    except (ValueError, UnicodeDecodeError):
        raise Refusal("Invalid form body.", None, "parameter_invalid")
    out = {}
    for k, v in pairs:
        m = re.fullmatch(r"([^\[\]]+)((?:\[[^\[\]]*\])*)", k)
        if not m:
            raise Refusal("Invalid parameter name: %s" % k, k, "parameter_unknown")
        name, rest = m.group(1), re.findall(r"\[([^\[\]]*)\]", m.group(2))
        if not rest:
            if isinstance(out.get(name), (dict, list)):
                raise Refusal("Invalid %s: a scalar and a hash were both given" % name, name)
            out[name] = v
            continue
        if len(rest) > 1:
            raise Refusal("Received unknown parameter: %s" % k, k, "parameter_unknown")
        sub = rest[0]
        if sub == "" or sub.isdigit():
            cur = out.setdefault(name, [])
            if not isinstance(cur, list):
                raise Refusal("Invalid array: %s" % name, name)
            cur.append(v)
        else:
            cur = out.setdefault(name, {})
            if not isinstance(cur, dict):
                raise Refusal("Invalid hash: %s" % name, name)
            cur[sub] = v
    return out


def check_schema(value, schema, path):
    """Validates a parsed form value against a transcribed schema; raises Refusal."""
    t = schema.get("type")
    if t == "object":
        if not isinstance(value, dict):
            raise Refusal("Invalid object: %s" % path, path)
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                raise Refusal("Missing required param: %s." % req, req, "parameter_missing")
        for k, v in value.items():
            sub = "%s[%s]" % (path, k) if path else k
            if k in props:
                check_schema(v, props[k], sub)
            elif schema.get("additionalProperties") is False:
                raise Refusal("Received unknown parameter: %s" % sub, sub, "parameter_unknown")
            elif isinstance(schema.get("additionalProperties"), dict):
                check_schema(v, schema["additionalProperties"], sub)
    elif t == "array":
        if not isinstance(value, list):
            raise Refusal("Invalid array: %s" % path, path)
        for i, v in enumerate(value):
            check_schema(v, schema["items"], "%s[%d]" % (path, i))
    elif t == "string":
        if not isinstance(value, str):
            raise Refusal("Invalid string: %s" % path, path)
        if len(value) > schema.get("maxLength", 1 << 30):
            raise Refusal("Invalid string: %s must be at most %d characters" % (path, schema["maxLength"]),
                          path)
        if "enum" in schema and value not in schema["enum"]:
            raise Refusal("Invalid %s: must be one of %s" % (path, ", ".join(schema["enum"])), path)
    elif t == "integer":
        if not isinstance(value, str) or not INTEGER.match(value):
            raise Refusal("Invalid integer: %s" % value if isinstance(value, str) else "Invalid integer: %s" % path,
                          path)


def error_body(kind, message, code=None, param=None):
    err = {"type": kind, "message": message}
    if code:
        err["code"] = code
    if param:
        err["param"] = param
    return {"error": err}


def bump_key(key, delta):
    """In-flight requests per (customer, event name); called under the lock."""
    n = state["key_inflight"].get(key, 0) + delta
    if n:
        state["key_inflight"][key] = n
    else:
        state["key_inflight"].pop(key, None)
    state["max_inflight_per_key"] = max(state["max_inflight_per_key"], n)


ACCOUNT = re.compile(r"^acct_[A-Za-z0-9]+$")


def akey(account, ident):
    """Identifiers (and Idempotency-Keys) are unique per account."""
    return ident if not account else "%s/%s" % (account, ident)


def tkey(account, cus, name):
    """The key of totals and last: "<customer>|<event>", prefixed "acct_...:" in a connected account."""
    return "%s%s|%s" % ("%s:" % account if account else "", cus, name)


def recount(account, cus, name):
    """Recomputes the totals and last value of one key from the events it holds (called under the lock)."""
    key = tkey(account, cus, name)
    evs = [e for e in state["events"] if e.get("account") == account and e["customer"] == cus
           and e["event_name"] == name and not e.get("cancelled")]
    state["totals"][key] = sum(e["value"] for e in evs)
    state["last"].pop(key, None)
    for e in evs:
        prev = state["last"].get(key)
        if prev is None or e["timestamp"] >= prev[0]:
            state["last"][key] = (e["timestamp"], e["value"])


def lose_or_duplicate(path, arg):
    """POST /_mock/lose and /_mock/duplicate (called under the lock); returns the identifiers touched."""
    account, cus, name = arg.get("account") or None, arg.get("customer"), arg.get("event_name")
    count = int(arg.get("count", 1))
    evs = [e for e in state["events"] if e.get("account") == account and e["customer"] == cus
           and e["event_name"] == name and not e.get("cancelled")][-count:] if count > 0 else []
    touched = []
    for e in evs:
        if path == "/_mock/lose":
            state["events"].remove(e)
            state["by_ident"].pop(akey(account, e["identifier"]), None)
            state["identifiers"].pop(akey(account, e["identifier"]), None)
            touched.append(e["identifier"])
        else:
            copy = dict(e, identifier="mock-dup-" + uuid.uuid4().hex, created=int(time.time()),
                        payload=dict(e["payload"]))
            state["events"].append(copy)
            state["by_ident"][akey(account, copy["identifier"])] = copy
            state["identifiers"][akey(account, copy["identifier"])] = time.time()
            touched.append(copy["identifier"])
    recount(account, cus, name)
    return touched


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-stripe"

    def setup(self):
        """No Nagle: headers and body leave at once (else 40 ms delayed-ACK stalls)."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        """Quiet: the tests read /_mock/stats instead."""

    def leave(self):
        """
        Ends this request's in-flight count, once, before the first byte of its answer
        leaves: the client may send the next request for the same customer as soon as it
        reads the answer, and must not be counted twice for it.
        """
        key, self.flight = getattr(self, "flight", None), None
        if key is not None:
            with lock:
                state["inflight"] -= 1
                for k in key if isinstance(key, list) else [key]:
                    if k:
                        bump_key(k, -1)

    def answer(self, status, body, headers=None):
        """Sends a JSON answer (or RAW bytes) with a Request-Id, keeping the connection open."""
        self.leave()
        data = bytes(body) if isinstance(body, RAW) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", "req_" + uuid.uuid4().hex[:14])
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        with lock:
            state["statuses"][str(status)] = state["statuses"].get(str(status), 0) + 1

    def drop(self):
        """Closes the connection without an answer."""
        self.leave()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def do_GET(self):
        if self.path.startswith("/_mock/v2") or getattr(self.server, "role", "api") == "events":
            return v2_get(self)
        m = SUMMARIES.match(self.path)
        if m:
            return self.event_summaries(m.group(1), m.group(2) or "")
        with lock:
            if self.path == "/_mock/totals":
                body = state["totals"]
            elif self.path == "/_mock/last":
                body = {k: v[1] for k, v in state["last"].items()}
            elif self.path == "/_mock/events":
                body = state["events"]
            elif self.path == "/_mock/adjustments":
                body = adjustment_stats()
            elif self.path == "/_mock/stats":
                body = {k: state[k] for k in (
                    "requests", "accepted", "duplicates", "dup_answers", "replays", "statuses",
                    "max_window", "max_inflight", "max_inflight_per_key", "faults_served",
                    "violations", "stripe_versions", "max_ahead", "summary_requests", "accounts_seen")}
                body["violation_log"] = list(state["violation_log"])
                body["faults_queued"] = sum(f["count"] for f in state["faults"])
            else:
                body = None
        if body is None:
            self.answer(404, error_body("invalid_request_error",
                                        "Unrecognized request URL (GET: %s)." % self.path))
        else:
            self.answer(200, body)

    def authorized(self):
        """Bearer <key>, or HTTP basic with the key as user name (Stripe accepts both)."""
        auth = self.headers.get("Authorization", "")
        if auth == "Bearer " + self.server.key:
            return True
        if auth.startswith("Basic "):
            try:
                user = base64.b64decode(auth[6:]).decode().split(":", 1)[0]
            except (ValueError, UnicodeDecodeError):
                return False
            return user == self.server.key
        return False

    def refuse_auth(self):
        # like Stripe, quote the key masked but for its last four characters
        auth = self.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else auth
        shown = given[:8] + "*" * max(len(given) - 12, 0) + given[-4:]
        return self.answer(401, error_body("invalid_request_error", "Invalid API Key provided: %s" % shown))

    def violation(self, path, r):
        """Counts and answers a request Stripe would refuse."""
        with lock:
            state["violations"] += 1
            state["violation_log"].append("%s: %s" % (path, r.message))
        return 400, error_body("invalid_request_error", r.message, r.code, r.param), {}

    def read_account(self):
        """The Stripe-Account header (Connect) into self.acct; answers a malformed one as a violation."""
        self.acct = self.headers.get("Stripe-Account")
        if self.acct is None:
            return True
        with lock:
            state["accounts_seen"][self.acct] = state["accounts_seen"].get(self.acct, 0) + 1
        if not ACCOUNT.match(self.acct):
            status, body, _ = self.violation(self.path, Refusal(
                "Invalid Stripe-Account header: '%s' is not an account id." % self.acct, None, "account_invalid"))
            self.answer(status, body)
            return False
        return True

    def customer_refused(self, cus):
        """A registered customer named in another account than its own: Stripe does not know it there."""
        with lock:
            if cus not in state["customers"] or state["customers"][cus] == self.acct:
                return None
        return error_body("invalid_request_error", "No such customer: '%s'" % cus, "resource_missing",
                          "customer" if self.command == "GET" else "payload[stripe_customer_id]")

    def do_POST(self):
        raw = self.read_body()
        if self.path.startswith("/v2/") or getattr(self.server, "role", "api") == "events":
            return v2_post(self, raw)
        if self.path.startswith("/_mock/"):
            return self.control(raw)
        with lock:
            v = self.headers.get("Stripe-Version", "(none)")
            state["stripe_versions"][v] = state["stripe_versions"].get(v, 0) + 1
        if self.path not in SPEC:
            return self.answer(404, error_body("invalid_request_error",
                                               "Unrecognized request URL (POST: %s)." % self.path))
        if not self.read_account():
            return
        # the (customer, event name) this request is about, for the in-flight count
        try:
            form = parse_form(raw)
        except Refusal:
            form = {}
        key = None
        if self.path == "/v1/billing/meter_events":
            p = form.get("payload")
            if isinstance(p, dict) and isinstance(form.get("event_name"), str):
                key = tkey(self.acct, p.get("stripe_customer_id"), form["event_name"])
        else:
            c = form.get("cancel")
            with lock:
                ev = state["by_ident"].get(akey(self.acct, c.get("identifier"))) if isinstance(c, dict) else None
                if ev is not None:
                    key = tkey(self.acct, ev["customer"], ev["event_name"])
        with lock:
            state["inflight"] += 1
            state["max_inflight"] = max(state["max_inflight"], state["inflight"])
            if key:
                bump_key(key, 1)
        self.flight = key or ""
        try:
            if self.path == "/v1/billing/meter_event_adjustments":
                self.meter_event_adjustment(raw)
            else:
                self.meter_event_request(raw)
        finally:
            self.leave()

    def control(self, raw):
        try:
            arg = json.loads(raw or b"{}")
        except ValueError:
            return self.answer(400, {"error": "bad json"})
        if self.path in ("/_mock/age", "/_mock/adjustment_faults"):
            return self.adjustment_control(arg)
        if self.path.startswith("/_mock/v2/"):
            return v2_control(self, arg)
        self.touched = None
        with lock:
            refused = self.apply_control(arg)
        if refused:
            return self.answer(refused[0], {"error": refused[1]})
        self.answer(200, {"ok": True} if self.touched is None else {"ok": True, "identifiers": self.touched})

    def apply_control(self, arg):
        """Applies one control request (called under the lock); returns (status, message) when refused."""
        if self.path == "/_mock/faults":
            arg.setdefault("count", 1)
            arg["kind"] = str(arg.get("kind"))
            state["faults"].append(arg)
        elif self.path == "/_mock/config":
            if "dup_answer" in arg and arg["dup_answer"] not in DUP_FORMS + ("random",):
                return 400, "dup_answer: one of %s, random" % ", ".join(DUP_FORMS)
            if "rate_limit" in arg:
                state["rate_limit"] = int(arg["rate_limit"])
            if "dup_answer" in arg:
                state["dup_answer"] = arg["dup_answer"]
            if "cancel_dup_answer" in arg:
                state["cancel_dup_answer"] = str(arg["cancel_dup_answer"])
        elif self.path == "/_mock/meters":
            if arg.get("formula", "sum") not in ("sum", "count", "last") or not arg.get("id") \
                    or not arg.get("event_name"):
                return 400, "meters: id, event_name, formula sum|count|last"
            state["meters"][arg["id"]] = {"event_name": arg["event_name"], "formula": arg.get("formula", "sum")}
        elif self.path == "/_mock/customers":
            if not arg.get("id") or (arg.get("account") is not None and not ACCOUNT.match(str(arg["account"]))):
                return 400, "customers: id, account acct_... or null"
            state["customers"][arg["id"]] = arg.get("account")
        elif self.path in ("/_mock/lose", "/_mock/duplicate"):
            if not arg.get("customer") or not arg.get("event_name"):
                return 400, "lose/duplicate: customer, event_name, count, account"
            self.touched = lose_or_duplicate(self.path, arg)
        elif self.path == "/_mock/clear_faults":
            state["faults"].clear()
            state["adj"]["faults"].clear()
        elif self.path == "/_mock/reset":
            reset()
        else:
            return 404, "unknown control"
        return None

    def meter_event_request(self, raw):
        """POST /v1/billing/meter_events: counters, faults, auth, idempotency, then process()."""
        with lock:
            now = time.time()
            state["requests"] += 1
            arr = state["arrivals"]
            arr.append(now)
            while arr and arr[0] <= now - 1.0:
                arr.popleft()
            state["max_window"] = max(state["max_window"], len(arr))
            fault = None
            if state["faults"]:
                fault = state["faults"][0]
                fault["count"] -= 1
                if fault["count"] <= 0:
                    state["faults"].popleft()
                state["faults_served"] += 1
            limited = False
            if state["rate_limit"] > 0:
                sec = int(now)
                if sec != state["rate_second"]:
                    state["rate_second"], state["rate_count"] = sec, 0
                state["rate_count"] += 1
                limited = state["rate_count"] > state["rate_limit"]
        kind = fault["kind"] if fault else None
        if kind == "close":
            return self.drop()
        if kind == "hang":
            time.sleep(float(fault.get("seconds", 30)))
            return self.drop()
        too_many = error_body("invalid_request_error", "Too many requests hit the API too quickly.", "rate_limit")
        if limited or kind == "429":
            return self.answer(429, too_many)
        if kind == "429_retry_after":
            return self.answer(429, too_many, {"Retry-After": str(fault.get("retry_after", 1))})
        if not self.authorized():
            return self.refuse_auth()
        saved = self.idempotency(raw, "replays")
        if saved is True:
            return
        if saved is not None:
            if kind == "drop_after":
                return self.drop()
            return self.answer(saved[1], saved[2], {"Idempotent-Replayed": "true"})
        ikey = self.headers.get("Idempotency-Key")
        ikey = akey(self.acct, ikey) if ikey else None
        try:
            status, body, headers, lost = self.process(raw, kind)
        finally:
            if ikey:
                with lock:
                    state["idem_busy"].discard(ikey)
        if ikey and status != 429:
            with lock:
                state["idem"][ikey] = (raw, status, body)
        if lost:
            return self.drop()
        if kind == "garbage_200" and status == 200:
            body = RAW(b'<html>not json</html>' + bytes(range(256)))
        if kind == "slow":
            time.sleep(float(fault.get("seconds", 30)))
        self.answer(status, body, headers)

    def idempotency(self, raw, counter):
        """
        Idempotency-Key handling shared by both endpoints: None (go on, key now busy),
        True (answered here) or the saved (body, status, answer) to replay.
        """
        ikey = self.headers.get("Idempotency-Key")
        if ikey is None:
            return None
        if len(ikey) > 255 or ikey == "":
            r = Refusal("Idempotency-Key must have between 1 and 255 characters.", None, "idempotency_key_invalid")
            status, body, _ = self.violation(self.path, r)
            self.answer(status, body)
            return True
        ikey = akey(self.acct, ikey)
        with lock:
            busy = ikey in state["idem_busy"]
            saved = None if busy else state["idem"].get(ikey)
            if not busy and saved is None:
                state["idem_busy"].add(ikey)
        if busy:
            self.answer(409, error_body("idempotency_error",
                                        "There is currently another in-progress request using this Idempotent Key."))
            return True
        if saved is not None:
            if saved[0] != raw:
                self.answer(400, error_body("idempotency_error",
                                            "Keys for idempotent requests can only be used with the same parameters they were first used with."))
                return True
            with lock:
                if counter == "replays":
                    state["replays"] += 1
                else:
                    state["adj"]["replays"] += 1
        return saved

    def process(self, raw, kind):
        """Validates and records one event; returns (status, body, headers, lost)."""
        if kind == "500":
            return 500, error_body("api_error", "An unknown error occurred."), {}, False
        if kind == "huge_500":
            return 500, error_body("api_error", "x" * (1 << 20)), {}, False
        if kind == "garbage_500":
            return 500, RAW(b'{"error": {"type": "api_error", "message": "unterminated \\'), {}, False
        if kind == "400_should_retry_false":
            return 400, error_body("invalid_request_error", "Refused by the mock."), \
                {"Stripe-Should-Retry": "false"}, False
        try:
            ev = self.validate_event(raw)
        except Refusal as r:
            return self.violation(self.path, r) + (False,)
        cus, name, value, ts, ident = ev["customer"], ev["event_name"], ev["value"], ev["timestamp"], ev["identifier"]
        arrival = time.time()
        if cus.startswith("cus_bad"):
            return 400, error_body("invalid_request_error", "No such customer: '%s'" % cus, "resource_missing",
                                   "payload[stripe_customer_id]"), {}, False
        wrong = self.customer_refused(cus)
        if wrong:
            return 400, wrong, {}, False
        ident = ident or ("mock-" + uuid.uuid4().hex)
        with lock:
            if state["max_ahead"] is None or ts - arrival > state["max_ahead"]:
                state["max_ahead"] = round(ts - arrival, 3)
            old = state["by_ident"].get(akey(self.acct, ident))
            if old is not None:
                state["duplicates"] += 1
                form = state["dup_answer"]
                if form == "random":
                    form = random.choice(DUP_FORMS)
                state["dup_answers"][form] = state["dup_answers"].get(form, 0) + 1
            else:
                state["identifiers"][akey(self.acct, ident)] = arrival     # received at (for cancels)
                key = tkey(self.acct, cus, name)
                state["accepted"] += 1
                state["totals"][key] = state["totals"].get(key, 0) + int(value)
                prev = state["last"].get(key)
                if prev is None or ts >= prev[0]:
                    state["last"][key] = (ts, int(value))
                rec = {"identifier": ident, "customer": cus, "event_name": name,
                       "value": int(value), "timestamp": ts, "payload": ev["payload"],
                       "created": int(arrival), "account": self.acct}
                state["events"].append(rec)
                state["by_ident"][akey(self.acct, ident)] = rec
        if old is not None:
            msg = "An event with identifier '%s' already exists." % ident
            if form == "200":
                return 200, self.event_object(old), {}, kind == "drop_after"
            if form == "code":
                return 400, error_body("invalid_request_error", msg, "duplicate_meter_event", "identifier"), {}, \
                    kind == "drop_after"
            if form == "exists":
                return 400, error_body("invalid_request_error", msg, "resource_already_exists", "identifier"), {}, \
                    kind == "drop_after"
            return 400, error_body("invalid_request_error", msg, None, "identifier"), {}, kind == "drop_after"
        body = self.event_object(rec)
        if kind == "500_after":
            return 500, error_body("api_error", "An unknown error occurred."), {}, False
        return 200, body, {}, kind == "drop_after"

    @staticmethod
    def event_object(rec):
        """A billing.meter_event exactly as the spec's schema has it (values come back as strings)."""
        return {"object": "billing.meter_event", "created": rec["created"], "event_name": rec["event_name"],
                "identifier": rec["identifier"], "livemode": False, "payload": dict(rec["payload"]),
                "timestamp": rec["timestamp"]}

    def check_common(self):
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("application/x-www-form-urlencoded"):
            raise Refusal("Content-Type must be application/x-www-form-urlencoded.", None, "parameter_invalid")

    def validate_event(self, raw):
        """The schema, then the rules it cannot express; returns the event's fields or raises Refusal."""
        self.check_common()
        form = parse_form(raw)
        check_schema(form, SPEC["/v1/billing/meter_events"], "")
        payload = form["payload"]
        if not form["event_name"]:
            raise Refusal("Missing required param: event_name.", "event_name", "parameter_missing")
        for k, v in payload.items():
            if len(v) > 100:
                raise Refusal("payload[%s] must be at most 100 characters." % k, "payload[%s]" % k)
        cus = payload.get("stripe_customer_id")
        if cus is None:
            raise Refusal("Missing required param: payload[stripe_customer_id].", "payload[stripe_customer_id]",
                          "parameter_missing")
        if cus.strip() == "" or cus != cus.strip() or re.search(r"\s", cus):
            raise Refusal("Invalid payload[stripe_customer_id]: '%s' is not a customer id." % cus,
                          "payload[stripe_customer_id]")
        value = payload.get("value")
        if value is None:
            raise Refusal("Missing required param: payload[value].", "payload[value]", "parameter_missing")
        if not WHOLE.match(value):
            raise Refusal("payload[value] must be a whole number.", "payload[value]")
        ident = form.get("identifier")
        if ident is not None and ident == "":
            raise Refusal("identifier must have between 1 and 100 characters.", "identifier")
        now = time.time()
        ts = form.get("timestamp")
        if ts is not None:
            ts = int(ts)
            if ts < now - 35 * 86400 or ts > now + 300:
                raise Refusal("Timestamp must be within the past 35 days and no more than 5 minutes in the future.",
                              "timestamp", "timestamp_outside_window")
        else:
            ts = int(now)
        return {"event_name": form["event_name"], "customer": cus, "value": value, "timestamp": ts,
                "identifier": ident, "payload": payload}

    # --- meter event summaries ---

    def event_summaries(self, meter_id, query):
        """GET /v1/billing/meters/{id}/event_summaries: validated like the spec's parameters."""
        with lock:
            state["summary_requests"] += 1
            v = self.headers.get("Stripe-Version", "(none)")
            state["stripe_versions"][v] = state["stripe_versions"].get(v, 0) + 1
        if not self.authorized():
            return self.refuse_auth()
        path = "/v1/billing/meters/%s/event_summaries" % meter_id
        if not self.read_account():
            return
        try:
            q = parse_form(query.encode())
            check_schema(q, SUMMARY_QUERY, "")
            start, end = int(q["start_time"]), int(q["end_time"])
            window = q.get("value_grouping_window")
            unit = {"hour": 3600, "day": 86400}.get(window, 60)
            for name, t in (("start_time", start), ("end_time", end)):
                if t % unit:
                    raise Refusal("%s must be aligned with %s boundaries." % (name, window or "minute"), name)
            if end <= start:
                raise Refusal("end_time must be after start_time.", "end_time")
            limit = int(q.get("limit", 10))
            if not 1 <= limit <= 100:
                raise Refusal("limit must be between 1 and 100.", "limit")
        except Refusal as r:
            status, body, _ = self.violation(path, r)
            return self.answer(status, body)
        with lock:
            meter = state["meters"].get(meter_id)
        if meter is None:
            return self.answer(404, error_body("invalid_request_error", "No such billing meter: '%s'" % meter_id,
                                               "resource_missing", "id"))
        wrong = self.customer_refused(q["customer"])
        if wrong:
            return self.answer(400, wrong)
        with lock:
            windows = [(start, end)] if window is None else \
                [(t, t + unit) for t in range(start, end, unit)]
            data = []
            for ws, we in reversed(windows):
                evs = sorted((e for e in state["events"]
                              if e["customer"] == q["customer"] and e["event_name"] == meter["event_name"]
                              and e.get("account") == self.acct
                              and not e.get("cancelled") and ws <= e["timestamp"] < we),
                             key=lambda e: e["timestamp"])
                if meter["formula"] == "count":
                    value = len(evs)
                elif meter["formula"] == "last":
                    value = evs[-1]["value"] if evs else 0
                else:
                    value = sum(e["value"] for e in evs)
                data.append({"object": "billing.meter_event_summary", "aggregated_value": float(value),
                             "end_time": we, "id": "mtrusg_%s_%s_%d" % (meter_id, q["customer"], ws),
                             "livemode": False, "meter": meter_id, "start_time": ws})
        ids = [d["id"] for d in data]
        if q.get("starting_after") in ids:
            data = data[ids.index(q["starting_after"]) + 1:]
        elif q.get("ending_before") in ids:
            data = data[:ids.index(q["ending_before"])][-limit:]
        self.answer(200, {"object": "list", "data": data[:limit], "has_more": len(data) > limit, "url": path})

    # --- meter event adjustments (cancels); used by test/t/045_export_corrections.pl ---

    def adjustment_control(self, arg):
        """POST /_mock/age and /_mock/adjustment_faults."""
        with lock:
            if self.path == "/_mock/age":
                secs = float(arg.get("seconds", 0))
                for ident in state["identifiers"]:
                    state["identifiers"][ident] -= secs
            else:
                arg.setdefault("count", 1)
                arg["kind"] = str(arg.get("kind"))
                state["adj"]["faults"].append(arg)
        self.answer(200, {"ok": True})

    def meter_event_adjustment(self, raw):
        """POST /v1/billing/meter_event_adjustments: auth, faults, Idempotency-Key replay, then adjust()."""
        with lock:
            adj = state["adj"]
            adj["requests"] += 1
            fault = None
            if adj["faults"]:
                fault = adj["faults"][0]
                fault["count"] -= 1
                if fault["count"] <= 0:
                    adj["faults"].popleft()
        kind = fault["kind"] if fault else None
        if kind == "close":
            return self.drop()
        if kind == "429":
            return self.answer(429, error_body("invalid_request_error", "Too many requests hit the API too quickly.",
                                               "rate_limit"))
        if not self.authorized():
            return self.refuse_auth()
        saved = self.idempotency(raw, "adj_replays")
        if saved is True:
            return
        if saved is not None:
            if kind == "drop_after":
                return self.drop()
            return self.answer(saved[1], saved[2], {"Idempotent-Replayed": "true"})
        ikey = self.headers.get("Idempotency-Key")
        ikey = akey(self.acct, ikey) if ikey else None
        try:
            status, body = self.adjust(raw, kind)
            with lock:
                if status == 400:
                    state["adj"]["refused"] += 1
                if ikey:
                    state["idem"][ikey] = (raw, status, body)
        finally:
            if ikey:
                with lock:
                    state["idem_busy"].discard(ikey)
        if kind == "drop_after":
            return self.drop()
        if kind == "slow":
            time.sleep(float(fault.get("seconds", 30)))
        self.answer(status, body)

    def adjust(self, raw, kind):
        """Validates and applies one cancel like Stripe; returns (status, body)."""
        def bad(msg, param=None, code=None):
            return 400, error_body("invalid_request_error", msg, code, param)

        if kind == "500":
            return 500, error_body("api_error", "An unknown error occurred.")
        try:
            self.check_common()
            form = parse_form(raw)
            check_schema(form, SPEC["/v1/billing/meter_event_adjustments"], "")
            ident = (form.get("cancel") or {}).get("identifier")
            if not ident:
                raise Refusal("Missing required param: cancel[identifier].", "cancel[identifier]", "parameter_missing")
        except Refusal as r:
            status, body, _ = self.violation(self.path, r)
            return status, body
        name = form["event_name"]
        with lock:
            received = state["identifiers"].get(akey(self.acct, ident))
            ev = state["by_ident"].get(akey(self.acct, ident))
            if received is None or ev is None:
                return bad("No meter event with identifier '%s'." % ident, "cancel[identifier]", "resource_missing")
            if ev["event_name"] != name:
                return bad("The meter event '%s' does not belong to event_name '%s'." % (ident, name), "event_name")
            if ev.get("cancelled"):
                state["adj"]["already"] += 1
                if state["cancel_dup_answer"] == "200":
                    return 200, self.adjustment_object(ident, name)
                return bad("The meter event with identifier '%s' has already been canceled." % ident,
                           "cancel[identifier]")
            if received < time.time() - 86400:
                return bad("Meter events can only be canceled within 24 hours of being received.",
                           "cancel[identifier]")
            ev["cancelled"] = True
            key = tkey(self.acct, ev["customer"], ev["event_name"])
            state["totals"][key] = state["totals"].get(key, 0) - ev["value"]
            adj = state["adj"]
            adj["cancelled"].append(ident)
            adj["cancelled_value"] += ev["value"]
        if kind == "500_after":
            return 500, error_body("api_error", "An unknown error occurred.")
        return 200, self.adjustment_object(ident, name)

    @staticmethod
    def adjustment_object(ident, name):
        """A billing.meter_event_adjustment exactly as the spec's schema has it (no id)."""
        return {"object": "billing.meter_event_adjustment", "cancel": {"identifier": ident},
                "event_name": name, "livemode": False, "status": "pending", "type": "cancel"}


def reset_adjustments():
    """Forgets every cancel, cancel fault and counter (part of reset())."""
    state["adj"] = dict(requests=0, cancelled=[], cancelled_value=0, refused=0, already=0, replays=0,
                        faults=deque())


def adjustment_stats():
    """GET /_mock/adjustments (called under the lock)."""
    adj = state["adj"]
    return {"requests": adj["requests"], "cancelled": len(adj["cancelled"]),
            "cancelled_value": adj["cancelled_value"], "refused": adj["refused"],
            "already": adj["already"], "replays": adj["replays"], "identifiers": list(adj["cancelled"]),
            "faults_queued": sum(f["count"] for f in adj["faults"])}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        """Dropped connections are expected here; stay quiet."""


def main():
    ap = argparse.ArgumentParser(description="Mock Stripe meter events endpoint (loopback only).")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--key", default="sk_test_mock")
    ap.add_argument("--lifetime", type=float, default=900)
    ap.add_argument("--rate-limit", type=int, default=0)
    ap.add_argument("--dup-answer", default="param", choices=DUP_FORMS + ("random",))
    ap.add_argument("--events-port-file", help="also listen for the v2 meter event stream (the events host)")
    a = ap.parse_args()
    reset()
    state["rate_limit"] = a.rate_limit
    state["dup_answer"] = a.dup_answer
    srv = Server(("127.0.0.1", a.port), Handler)
    srv.key = a.key
    if a.events_port_file:
        # before the port file: a client that sees the port file finds the events port too
        v2_start_events_server(a.key, a.events_port_file)
    port = srv.server_address[1]
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.rename(tmp, a.port_file)
    print("mock stripe listening on 127.0.0.1:%d" % port, flush=True)
    timer = threading.Timer(a.lifetime, lambda: os._exit(0))
    timer.daemon = True
    timer.start()
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


# =====================================================================================
# v2: meter event sessions and the meter event stream
# =====================================================================================
#
#   POST /v2/billing/meter_event_session      (API host; the secret key, as for v1)
#       body: none or {} (application/json).  Answers a v2.billing.meter_event_session:
#       {"id", "object", "authentication_token", "created", "expires_at", "livemode"},
#       times as RFC 3339 strings; the token is valid 15 minutes (session_seconds).
#   POST /v2/billing/meter_event_stream       (the events host: only with
#       --events-port-file, on its own port; the API port answers it 404, as
#       api.stripe.com does)
#       Authorization: Bearer <authentication_token>, Content-Type application/json,
#       body {"events": [event, ...]}, at most 100 events; each event
#       {"event_name" (string <= 100, required), "payload" (object of strings, required),
#        "identifier" (string 1..100), "timestamp" (RFC 3339 date-time string)}; no other
#       keys, at any level but inside payload.  Answer: 200 {}.
#
# What Stripe refuses at once answers 400 {"error": {"type": "invalid_request_error",
# "code": "invalid_fields", "message", "param": "events[i].field"}}, counts as a spec
# violation, and stores nothing of the request: a body that is not JSON or not an object,
# unknown keys, a missing event_name or payload, wrong types, over-long strings, more than
# 100 events.  Stricter than Stripe on purpose: an event without identifier is refused
# the same way (Stripe would make one up, and a resend could then never be deduplicated).
# A token that is unknown, or the secret key itself, answers 401 (type
# invalid_request_error, a violation); a token past expires_at answers 401 {"error":
# {"type": "temporary_session_expired", "code": "billing_meter_event_session_expired"}}
# (not a violation: sessions expire; the client opens a new one and resends).
#
# Stripe validates the events themselves asynchronously ("processed asynchronously,
# including validation"): the answer is 200 {} and a bad event is dropped later and
# reported (v1.billing.meter.error_report_triggered).  So does the mock: an event whose
# value is not a whole number, whose timestamp lies outside the past 35 days .. 5 minutes
# ahead, whose payload lacks stripe_customer_id or value, holds a value over 100
# characters or a customer id with blanks, is dropped and counted as a violation; a
# customer "cus_bad..." is dropped as an unknown customer (an error report, not a
# violation).  GET /_mock/v2 lists them.
#
# Connect: v2 names a connected account with the Stripe-Context header (acct_...), not
# Stripe-Account (refused here as a violation, as is a malformed Stripe-Context).  Events
# that came with a Stripe-Context are kept in that account exactly as v1's Connect events
# are: identifiers unique per account, totals keyed "acct_...:<customer>|<event_name>",
# and a registered customer (POST /_mock/customers) named in another account than its
# own is dropped asynchronously as an unknown customer (an error report, not a violation).
# stats.accounts_seen counts Stripe-Context values too.  The session carries no account.
#
# Duplicates: Stripe keeps identifiers unique over a rolling 24 hours and the stream
# answers asynchronously, so a duplicate identifier is stored once, counted
# ("duplicates", as for v1) and the request still answers 200 {}.
#
# Faults: the meter event requests of v1 and v2 share the queue of POST /_mock/faults
# (count = requests, whatever their number of events): 500, 429, 429_retry_after, hang,
# slow, drop_after (stored, then lost), 500_after (stored, then 500), close, garbage_500,
# garbage_200, 400_should_retry_false, and for the stream only 400_first_event (400
# invalid_fields naming events[0].payload, nothing stored); rate_limit counts stream
# requests too.
#
# Control: POST /_mock/v2/expire (every token expires now), POST /_mock/v2/config
# {"session_seconds": S}, GET /_mock/v2 {"sessions", "requests", "events" (in accepted
# requests), "max_events" (largest request), "expired_401", "bad_token_401",
# "error_reports": [...], "token_lengths"}.  The totals, events, stats, summaries and
# cancels of v1 cover the events that came through the stream too.

V2_MAX_EVENTS = 100
V2_EVENT_KEYS = {"event_name", "identifier", "payload", "timestamp"}
RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def reset_v2():
    """Forgets every session and v2 counter (part of reset())."""
    keep = state.get("v2", {}).get("session_seconds", 900)
    state["v2"] = dict(tokens={}, sessions=0, requests=0, events=0, max_events=0, expired_401=0,
                       bad_token_401=0, error_reports=deque(maxlen=200), session_seconds=keep)


def rfc3339(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def parse_rfc3339(s):
    """Unix seconds of an RFC 3339 date-time, or None."""
    m = RFC3339.match(s) if isinstance(s, str) else None
    if not m:
        return None
    import calendar
    try:
        t = calendar.timegm((int(m.group(1)), int(m.group(2)), int(m.group(3)),
                             int(m.group(4)), int(m.group(5)), int(m.group(6)), 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    if not (1 <= int(m.group(2)) <= 12 and 1 <= int(m.group(3)) <= 31 and int(m.group(4)) < 24
            and int(m.group(5)) < 60 and int(m.group(6)) < 61):
        return None
    if m.group(8) != "Z":
        sign = 1 if m.group(8)[0] == "+" else -1
        t -= sign * (int(m.group(8)[1:3]) * 3600 + int(m.group(8)[4:6]) * 60)
    return t


def v2_invalid(param, message):
    return Refusal(message, param, "invalid_fields")


def v2_check_body(raw):
    """The stream's request schema; returns the events or raises Refusal."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise v2_invalid(None, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        raise v2_invalid(None, "The request body must be a JSON object.")
    for k in body:
        if k != "events":
            raise v2_invalid(k, "Unknown field: %s." % k)
    events = body.get("events")
    if not isinstance(events, list):
        raise v2_invalid("events", "events is required and must be an array.")
    if len(events) > V2_MAX_EVENTS:
        raise v2_invalid("events", "events supports up to %d events per request, got %d."
                         % (V2_MAX_EVENTS, len(events)))
    for i, ev in enumerate(events):
        at = "events[%d]" % i
        if not isinstance(ev, dict):
            raise v2_invalid(at, "%s must be an object." % at)
        for k in ev:
            if k not in V2_EVENT_KEYS:
                raise v2_invalid("%s.%s" % (at, k), "Unknown field: %s.%s." % (at, k))
        for k in ("event_name", "payload"):
            if k not in ev:
                raise v2_invalid("%s.%s" % (at, k), "Missing required field: %s.%s." % (at, k))
        if not isinstance(ev["event_name"], str) or not 1 <= len(ev["event_name"]) <= 100:
            raise v2_invalid(at + ".event_name", "%s.event_name must be a string of 1 to 100 characters." % at)
        if not isinstance(ev["payload"], dict) or not all(isinstance(v, str) for v in ev["payload"].values()):
            raise v2_invalid(at + ".payload", "%s.payload must be an object of strings." % at)
        ident = ev.get("identifier")
        if ident is None:
            raise v2_invalid(at + ".identifier", "%s.identifier is missing (this mock requires one: "
                             "without it a resend cannot be deduplicated)." % at)
        if not isinstance(ident, str) or not 1 <= len(ident) <= 100:
            raise v2_invalid(at + ".identifier", "%s.identifier must be a string of 1 to 100 characters." % at)
        if "timestamp" in ev and parse_rfc3339(ev["timestamp"]) is None:
            raise v2_invalid(at + ".timestamp", "%s.timestamp must be an RFC 3339 date-time string." % at)
    return events


def v2_async_problem(ev, now):
    """What Stripe's asynchronous validation would drop the event for: (message, violation) or None."""
    p = ev["payload"]
    for k, v in p.items():
        if len(v) > 100:
            return "payload.%s longer than 100 characters" % k, True
    cus, value = p.get("stripe_customer_id"), p.get("value")
    if cus is None or value is None:
        return "payload without stripe_customer_id or value", True
    if cus.strip() == "" or re.search(r"\s", cus):
        return "stripe_customer_id '%s' is not a customer id" % cus, True
    if not WHOLE.match(value):
        return "value '%s' is not a whole number" % value, True
    ts = parse_rfc3339(ev["timestamp"]) if "timestamp" in ev else int(now)
    if ts < now - 35 * 86400 or ts > now + 300:
        return "timestamp outside the past 35 days .. 5 minutes ahead", True
    if cus.startswith("cus_bad"):
        return "No such customer: '%s'" % cus, False
    return None


def v2_get(h):
    if h.path == "/_mock/v2" and getattr(h.server, "role", "api") == "api":
        with lock:
            v2 = state["v2"]
            body = {k: v2[k] for k in ("sessions", "requests", "events", "max_events", "expired_401",
                                       "bad_token_401", "session_seconds")}
            body["error_reports"] = list(v2["error_reports"])
            body["tokens"] = len(v2["tokens"])
        return h.answer(200, body)
    return h.answer(404, error_body("invalid_request_error", "Unrecognized request URL (GET: %s)." % h.path))


def v2_control(h, arg):
    with lock:
        if h.path == "/_mock/v2/expire":
            for t in state["v2"]["tokens"]:
                state["v2"]["tokens"][t] = 0
        elif h.path == "/_mock/v2/config":
            if "session_seconds" in arg:
                state["v2"]["session_seconds"] = float(arg["session_seconds"])
        else:
            return h.answer(404, {"error": "unknown control"})
    h.answer(200, {"ok": True})


def v2_post(h, raw):
    role = getattr(h.server, "role", "api")
    with lock:
        v = h.headers.get("Stripe-Version", "(none)")
        state["stripe_versions"][v] = state["stripe_versions"].get(v, 0) + 1
    if role == "api" and h.path == "/v2/billing/meter_event_session":
        return v2_session(h, raw)
    if role == "events" and h.path == "/v2/billing/meter_event_stream":
        return v2_stream(h, raw)
    return h.answer(404, error_body("invalid_request_error", "Unrecognized request URL (POST: %s)." % h.path))


def v2_session(h, raw):
    """POST /v2/billing/meter_event_session: the secret key opens a 15-minute session."""
    if not h.authorized():
        return h.refuse_auth()
    try:
        if raw.strip():
            if not h.headers.get("Content-Type", "").startswith("application/json"):
                raise v2_invalid(None, "Content-Type must be application/json.")
            try:
                body = json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise v2_invalid(None, "The request body is not valid JSON.")
            if body != {}:
                raise v2_invalid(None, "meter_event_session takes no parameters.")
    except Refusal as r:
        status, body, _ = h.violation(h.path, r)
        return h.answer(status, body)
    now = time.time()
    token = "ek_test_" + uuid.uuid4().hex + uuid.uuid4().hex
    with lock:
        v2 = state["v2"]
        expires = now + v2["session_seconds"]
        v2["tokens"][token] = expires
        v2["sessions"] += 1
    h.answer(200, {"id": "mes_test_" + uuid.uuid4().hex[:24], "object": "v2.billing.meter_event_session",
                   "authentication_token": token, "created": rfc3339(now), "expires_at": rfc3339(expires),
                   "livemode": False})


def v2_stream(h, raw):
    """POST /v2/billing/meter_event_stream: session token, up to 100 events, answer {}."""
    now = time.time()
    with lock:
        v2 = state["v2"]
        v2["requests"] += 1
        state["requests"] += 1
        arr = state["arrivals"]
        arr.append(now)
        while arr and arr[0] <= now - 1.0:
            arr.popleft()
        state["max_window"] = max(state["max_window"], len(arr))
        fault = None
        if state["faults"]:
            fault = state["faults"][0]
            fault["count"] -= 1
            if fault["count"] <= 0:
                state["faults"].popleft()
            state["faults_served"] += 1
        limited = False
        if state["rate_limit"] > 0:
            sec = int(now)
            if sec != state["rate_second"]:
                state["rate_second"], state["rate_count"] = sec, 0
            state["rate_count"] += 1
            limited = state["rate_count"] > state["rate_limit"]
    # in flight, overall and per (account, customer, event name) of every event in the request
    acct = v2_context(h)
    keys = []
    try:
        for ev in json.loads(raw.decode("utf-8")).get("events", []):
            keys.append(tkey(acct, ev["payload"]["stripe_customer_id"], ev["event_name"]))
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        pass
    with lock:
        state["inflight"] += 1
        state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        for k in keys:
            bump_key(k, 1)
    h.flight = keys or ""
    try:
        v2_stream_answer(h, raw, fault, limited)
    finally:
        h.leave()


def v2_context(h):
    """The connected account of a v2 request: its Stripe-Context header (a valid one), else None."""
    ctx = h.headers.get("Stripe-Context")
    return ctx if ctx is not None and ACCOUNT.match(ctx) else None


def v2_stream_answer(h, raw, fault, limited):
    kind = fault["kind"] if fault else None
    if kind == "close":
        return h.drop()
    if kind == "hang":
        time.sleep(float(fault.get("seconds", 30)))
        return h.drop()
    too_many = error_body("rate_limit", "Too many requests hit the API too quickly.", "rate_limit")
    if limited or kind == "429":
        return h.answer(429, too_many)
    if kind == "429_retry_after":
        return h.answer(429, too_many, {"Retry-After": str(fault.get("retry_after", 1))})
    auth = h.headers.get("Authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else None
    with lock:
        v2 = state["v2"]
        expires = v2["tokens"].get(token) if token else None
        if expires is not None and expires <= time.time():
            v2["expired_401"] += 1
        elif expires is None:
            v2["bad_token_401"] += 1
    if expires is None:
        h.violation(h.path, Refusal("Authorization is not a meter event session token.", None, None))
        return h.answer(401, error_body("invalid_request_error",
                                        "The provided authentication token is not valid for this endpoint."))
    if expires <= time.time():
        return h.answer(401, error_body("temporary_session_expired", "The meter event session has expired.",
                                        "billing_meter_event_session_expired"))
    if kind == "500":
        return h.answer(500, error_body("api_error", "An unknown error occurred."))
    if kind == "garbage_500":
        return h.answer(500, RAW(b'{"error": {"type": "api_error", "message": "unterminated \\'))
    if kind == "400_should_retry_false":
        return h.answer(400, error_body("invalid_request_error", "Refused by the mock."),
                        {"Stripe-Should-Retry": "false"})
    if kind == "400_first_event":
        return h.answer(400, error_body("invalid_request_error", "events[0].payload is refused by the mock.",
                                        "invalid_fields", "events[0].payload"))
    ctx = h.headers.get("Stripe-Context")
    acct = v2_context(h)
    if ctx is not None:
        with lock:
            state["accounts_seen"][ctx] = state["accounts_seen"].get(ctx, 0) + 1
    try:
        if h.headers.get("Stripe-Account") is not None:
            raise Refusal("v2 requests name a connected account with Stripe-Context, not Stripe-Account.",
                          None, "account_invalid")
        if ctx is not None and acct is None:
            raise Refusal("Invalid Stripe-Context header: '%s' is not an account id." % ctx, None,
                          "account_invalid")
        if not h.headers.get("Content-Type", "").startswith("application/json"):
            raise v2_invalid(None, "Content-Type must be application/json.")
        events = v2_check_body(raw)
    except Refusal as r:
        status, body, _ = h.violation(h.path, r)
        return h.answer(status, body)
    now = time.time()
    with lock:
        v2 = state["v2"]
        v2["events"] += len(events)
        v2["max_events"] = max(v2["max_events"], len(events))
        for ev in events:
            problem = v2_async_problem(ev, now)
            cus = ev["payload"].get("stripe_customer_id")
            if problem is None and cus in state["customers"] and state["customers"][cus] != acct:
                problem = ("No such customer: '%s' (in %s)" % (cus, acct or "the platform"), False)
            if problem is not None:
                v2["error_reports"].append("%s: %s" % (ev["identifier"], problem[0]))
                if problem[1]:
                    state["violations"] += 1
                    state["violation_log"].append("%s (asynchronous): %s" % (h.path, problem[0]))
                continue
            ident = ev["identifier"]
            ts = parse_rfc3339(ev["timestamp"]) if "timestamp" in ev else int(now)
            if state["max_ahead"] is None or ts - now > state["max_ahead"]:
                state["max_ahead"] = round(ts - now, 3)
            if akey(acct, ident) in state["by_ident"]:
                state["duplicates"] += 1
                continue
            cus, name, value = ev["payload"]["stripe_customer_id"], ev["event_name"], int(ev["payload"]["value"])
            state["identifiers"][akey(acct, ident)] = now
            key = tkey(acct, cus, name)
            state["accepted"] += 1
            state["totals"][key] = state["totals"].get(key, 0) + value
            prev = state["last"].get(key)
            if prev is None or ts >= prev[0]:
                state["last"][key] = (ts, value)
            rec = {"identifier": ident, "customer": cus, "event_name": name, "value": value, "timestamp": ts,
                   "payload": ev["payload"], "created": int(now), "account": acct}
            state["events"].append(rec)
            state["by_ident"][akey(acct, ident)] = rec
    if kind == "drop_after":
        return h.drop()
    if kind == "500_after":
        return h.answer(500, error_body("api_error", "An unknown error occurred."))
    if kind == "garbage_200":
        return h.answer(200, RAW(b'<html>not json</html>'))
    if kind == "slow":
        time.sleep(float(fault.get("seconds", 30)))
    h.answer(200, {})


def v2_start_events_server(key, port_file):
    """The events host (meter-events.stripe.com): its own port, the stream only."""
    srv = Server(("127.0.0.1", 0), Handler)
    srv.key = key
    srv.role = "events"
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % srv.server_address[1])
    os.rename(tmp, port_file)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()


if __name__ == "__main__":
    main()
