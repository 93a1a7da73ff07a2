#!/usr/bin/env python3
"""
mock_stripe.py - a loopback stand-in for Stripe's meter event endpoint, for the
usage_billing TAP tests, benchmark and demo.  Python 3 standard library only.

  python3 test/mock_stripe.py [--port 0] [--port-file F] [--key sk_test_mock]
                              [--lifetime 900] [--rate-limit 0]

POST /v1/billing/meter_events is validated as STRIPE.md describes: Bearer key,
form-urlencoded body with event_name, payload[stripe_customer_id], payload[value]
(a whole number as a decimal string), optional identifier (<= 100 chars) and
timestamp (Unix seconds, past 35 days .. 5 minutes ahead); any other top-level
parameter is refused.  Identifiers are deduplicated (a duplicate answers 200 and
is not counted); an Idempotency-Key replays the first answer (500s included, as
Stripe does), a different body under the same key is an idempotency_error, and
a concurrent request with a key in progress gets 409.  Unlike Stripe, which
reports unknown customers asynchronously, a customer id starting with "cus_bad"
is refused at once (400), so that failed-row reporting can be tested.

Control endpoints (tests only):
  GET  /_mock/totals   {"<customer>|<event_name>": sum of accepted values}
  GET  /_mock/last     {"<customer>|<event_name>": value of the latest event by timestamp}
  GET  /_mock/events   accepted events, in arrival order
  GET  /_mock/stats    counters: requests, accepted, duplicates, replays, statuses,
                       max requests in any 1 s window, max concurrent requests
  POST /_mock/faults   {"kind": K, "count": N, "retry_after": S, "seconds": S} queued
                       for the next N requests; K is one of
                       500 | 429 | 429_retry_after | hang (sleep, drop, nothing recorded) |
                       slow (record, sleep, answer) | drop_after (record, drop) | close |
                       400_should_retry_false | huge_500 (1 MB message) |
                       garbage_500 (broken JSON) | garbage_200 (record, answer non-JSON)
  POST /_mock/config   {"rate_limit": N}  (429 beyond N requests per second; 0 = off)
  POST /_mock/reset    forget everything

Meter event adjustments (cancels), see the block at the end of Handler:
  POST /v1/billing/meter_event_adjustments   event_name, type=cancel, cancel[identifier];
                       cancels one accepted event received less than 24 h ago (by the mock's
                       clock): its value leaves the totals.  Unknown identifier, other event
                       name, older than 24 h or already cancelled: 400 invalid_request_error.
                       Idempotency-Key replays the first answer, as for meter events.
  GET  /_mock/adjustments          {"requests", "cancelled", "cancelled_value", "refused",
                                    "replays", "identifiers": [cancelled identifiers]}
  POST /_mock/adjustment_faults    {"kind": 500 | 429 | slow | drop_after | close, "count": N,
                                    "seconds": S} for the next N cancel requests
  POST /_mock/age      {"seconds": S} makes every accepted event look S seconds older

It stops by itself after --lifetime seconds so that a test never leaves it behind.
"""
import argparse
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

ALLOWED = {"event_name", "identifier", "timestamp"}
WHOLE = re.compile(r"^[0-9]+$")

class RAW(bytes):
    """An answer body sent as is (malformed JSON, binary)."""


lock = threading.Lock()
state = {}


def reset():
    """Forgets every event, key, fault and counter."""
    state.clear()
    state.update(
        events=[], identifiers={}, idem={}, idem_busy=set(), faults=deque(),
        totals={}, last={}, arrivals=deque(), max_window=0, inflight=0,
        max_inflight=0, requests=0, accepted=0, duplicates=0, replays=0,
        statuses={}, rate_limit=0, rate_second=0, rate_count=0, faults_served=0)
    reset_adjustments()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-stripe"

    def setup(self):
        """No Nagle: headers and body leave at once (else 40 ms delayed-ACK stalls)."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        """Quiet: the tests read /_mock/stats instead."""

    def answer(self, status, body, headers=None):
        """Sends a JSON answer (or RAW bytes) with a Request-Id, keeping the connection open."""
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
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def do_GET(self):
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
                    "requests", "accepted", "duplicates", "replays", "statuses",
                    "max_window", "max_inflight", "faults_served")}
                body["faults_queued"] = sum(f["count"] for f in state["faults"])
            else:
                body = None
        if body is None:
            self.answer(404, {"error": {"type": "invalid_request_error", "message": "Unrecognized request URL."}})
        else:
            self.answer(200, body)

    def do_POST(self):
        raw = self.read_body()
        if self.path.startswith("/_mock/"):
            return self.control(raw)
        if self.path == "/v1/billing/meter_event_adjustments":
            return self.meter_event_adjustment(raw)
        if self.path != "/v1/billing/meter_events":
            return self.answer(404, {"error": {"type": "invalid_request_error",
                                               "message": "Unrecognized request URL (POST: %s)." % self.path}})
        with lock:
            now = time.time()
            state["requests"] += 1
            arr = state["arrivals"]
            arr.append(now)
            while arr and arr[0] <= now - 1.0:
                arr.popleft()
            state["max_window"] = max(state["max_window"], len(arr))
            state["inflight"] += 1
            state["max_inflight"] = max(state["max_inflight"], state["inflight"])
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
        try:
            self.meter_event(raw, fault, limited)
        finally:
            with lock:
                state["inflight"] -= 1

    def control(self, raw):
        try:
            arg = json.loads(raw or b"{}")
        except ValueError:
            return self.answer(400, {"error": "bad json"})
        if self.path in ("/_mock/age", "/_mock/adjustment_faults"):
            return self.adjustment_control(arg)
        with lock:
            if self.path == "/_mock/faults":
                arg.setdefault("count", 1)
                state["faults"].append(arg)
            elif self.path == "/_mock/config":
                state["rate_limit"] = int(arg.get("rate_limit", 0))
            elif self.path == "/_mock/reset":
                reset()
            else:
                return self.answer(404, {"error": "unknown control"})
        self.answer(200, {"ok": True})

    def meter_event(self, raw, fault, limited):
        kind = fault["kind"] if fault else None
        if kind == "close":
            return self.drop()
        if kind == "hang":
            time.sleep(float(fault.get("seconds", 30)))
            return self.drop()
        if limited or kind == "429":
            return self.answer(429, {"error": {"type": "invalid_request_error", "code": "rate_limit",
                                               "message": "Too many requests hit the API too quickly."}})
        if kind == "429_retry_after":
            return self.answer(429, {"error": {"type": "invalid_request_error", "code": "rate_limit",
                                               "message": "Too many requests hit the API too quickly."}},
                               {"Retry-After": str(fault.get("retry_after", 1))})

        auth = self.headers.get("Authorization", "")
        if auth != "Bearer " + self.server.key:
            # like Stripe, quote the key masked but for its last four characters
            given = auth[7:] if auth.startswith("Bearer ") else auth
            shown = given[:8] + "*" * max(len(given) - 12, 0) + given[-4:]
            return self.answer(401, {"error": {"type": "invalid_request_error",
                                               "message": "Invalid API Key provided: %s" % shown}})
        ikey = self.headers.get("Idempotency-Key")
        if ikey is not None and len(ikey) > 255:
            return self.answer(400, {"error": {"type": "invalid_request_error",
                                               "message": "Idempotency-Key is too long."}})
        if ikey:
            with lock:
                if ikey in state["idem_busy"]:
                    busy = True
                else:
                    busy = False
                    saved = state["idem"].get(ikey)
                    if saved is None:
                        state["idem_busy"].add(ikey)
            if busy:
                return self.answer(409, {"error": {"type": "idempotency_error",
                                                   "message": "There is currently another in-progress request using this Idempotent Key."}})
            if saved is not None:
                if saved[0] != raw:
                    return self.answer(400, {"error": {"type": "idempotency_error",
                                                       "message": "Keys for idempotent requests can only be used with the same parameters they were first used with."}})
                with lock:
                    state["replays"] += 1
                if kind == "drop_after":
                    return self.drop()
                return self.answer(saved[1], saved[2], {"Idempotent-Replayed": "true"})
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

    def process(self, raw, kind):
        """Validates and records one event; returns (status, body, headers, lost)."""
        def bad(msg, param=None, code="parameter_invalid"):
            err = {"type": "invalid_request_error", "code": code, "message": msg}
            if param:
                err["param"] = param
            return 400, {"error": err}, {}, False

        if kind == "500":
            return 500, {"error": {"type": "api_error", "message": "An unknown error occurred."}}, {}, False
        if kind == "huge_500":
            return 500, {"error": {"type": "api_error", "message": "x" * (1 << 20)}}, {}, False
        if kind == "garbage_500":
            return 500, RAW(b'{"error": {"type": "api_error", "message": "unterminated \\'), {}, False
        if kind == "400_should_retry_false":
            return 400, {"error": {"type": "invalid_request_error", "message": "Refused by the mock."}}, \
                {"Stripe-Should-Retry": "false"}, False
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("application/x-www-form-urlencoded"):
            return bad("Content-Type must be application/x-www-form-urlencoded.")
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (ValueError, UnicodeDecodeError):
            return bad("Invalid form body.")
        params, payload = {}, {}
        for k, v in pairs:
            m = re.fullmatch(r"payload\[([^\]]+)\]", k)
            if m:
                payload[m.group(1)] = v
            elif k in ALLOWED:
                if k in params:
                    return bad("Duplicate parameter: %s" % k, k)
                params[k] = v
            else:
                return bad("Received unknown parameter: %s" % k, k, "parameter_unknown")
        name = params.get("event_name")
        if not name:
            return bad("Missing required param: event_name.", "event_name", "parameter_missing")
        if len(name) > 100:
            return bad("event_name is too long.", "event_name")
        cus = payload.get("stripe_customer_id")
        if not cus:
            return bad("Missing required param: payload[stripe_customer_id].", "payload[stripe_customer_id]", "parameter_missing")
        value = payload.get("value")
        if value is None:
            return bad("Missing required param: payload[value].", "payload[value]", "parameter_missing")
        if not WHOLE.match(value):
            return bad("payload[value] must be a whole number.", "payload[value]")
        ident = params.get("identifier")
        if ident is not None and (len(ident) == 0 or len(ident) > 100):
            return bad("identifier must have between 1 and 100 characters.", "identifier")
        now = int(time.time())
        ts = params.get("timestamp")
        if ts is not None:
            if not re.fullmatch(r"[0-9]+", ts):
                return bad("Invalid integer: %s" % ts, "timestamp")
            ts = int(ts)
            if ts < now - 35 * 86400 or ts > now + 300:
                return bad("Timestamp must be within the past 35 days and no more than 5 minutes in the future.",
                           "timestamp", "timestamp_outside_window")
        else:
            ts = now
        if cus.startswith("cus_bad"):
            return bad("No such customer: '%s'" % cus, "payload[stripe_customer_id]", "resource_missing")
        ident = ident or ("mock-" + uuid.uuid4().hex)
        body = {"object": "billing.meter_event", "created": now, "event_name": name,
                "identifier": ident, "livemode": False,
                "payload": {"stripe_customer_id": cus, "value": value}, "timestamp": ts}
        with lock:
            if ident in state["identifiers"]:
                state["duplicates"] += 1
            else:
                state["identifiers"][ident] = time.time()   # received at (for cancels)
                state["accepted"] += 1
                key = "%s|%s" % (cus, name)
                state["totals"][key] = state["totals"].get(key, 0) + int(value)
                prev = state["last"].get(key)
                if prev is None or ts >= prev[0]:
                    state["last"][key] = (ts, int(value))
                state["events"].append({"identifier": ident, "customer": cus, "event_name": name,
                                        "value": int(value), "timestamp": ts})
        return 200, body, {}, kind == "drop_after"


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
        kind = str(fault["kind"]) if fault else None
        if kind == "close":
            return self.drop()
        if kind == "429":
            return self.answer(429, {"error": {"type": "invalid_request_error", "code": "rate_limit",
                                               "message": "Too many requests hit the API too quickly."}})
        if self.headers.get("Authorization", "") != "Bearer " + self.server.key:
            return self.answer(401, {"error": {"type": "invalid_request_error",
                                               "message": "Invalid API Key provided."}})
        ikey = self.headers.get("Idempotency-Key")
        if ikey:
            with lock:
                busy = ikey in state["idem_busy"]
                saved = None if busy else state["idem"].get(ikey)
                if not busy and saved is None:
                    state["idem_busy"].add(ikey)
            if busy:
                return self.answer(409, {"error": {"type": "idempotency_error",
                                                   "message": "There is currently another in-progress request using this Idempotent Key."}})
            if saved is not None:
                if saved[0] != raw:
                    return self.answer(400, {"error": {"type": "idempotency_error",
                                                       "message": "Keys for idempotent requests can only be used with the same parameters they were first used with."}})
                with lock:
                    state["adj"]["replays"] += 1
                return self.answer(saved[1], saved[2], {"Idempotent-Replayed": "true"})
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
        def bad(msg, param=None, code="parameter_invalid"):
            err = {"type": "invalid_request_error", "code": code, "message": msg}
            if param:
                err["param"] = param
            return 400, {"error": err}

        if kind == "500":
            return 500, {"error": {"type": "api_error", "message": "An unknown error occurred."}}
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (ValueError, UnicodeDecodeError):
            return bad("Invalid form body.")
        params = {}
        for k, v in pairs:
            if k not in ("event_name", "type", "cancel[identifier]") or k in params:
                return bad("Received unknown parameter: %s" % k, k, "parameter_unknown")
            params[k] = v
        if not params.get("event_name"):
            return bad("Missing required param: event_name.", "event_name", "parameter_missing")
        if params.get("type") != "cancel":
            return bad("Invalid type: must be cancel.", "type")
        ident = params.get("cancel[identifier]")
        if not ident:
            return bad("Missing required param: cancel[identifier].", "cancel[identifier]", "parameter_missing")
        with lock:
            received = state["identifiers"].get(ident)
            ev = next((e for e in state["events"] if e["identifier"] == ident), None)
            if received is None or ev is None:
                return bad("No meter event with identifier '%s'." % ident, "cancel[identifier]", "resource_missing")
            if ev["event_name"] != params["event_name"]:
                return bad("The meter event '%s' does not belong to event_name '%s'." % (ident, params["event_name"]),
                           "event_name")
            if ev.get("cancelled"):
                return bad("The meter event '%s' has already been cancelled." % ident, "cancel[identifier]")
            if received < time.time() - 86400:
                return bad("Meter events can only be cancelled within 24 hours of being received.",
                           "cancel[identifier]")
            ev["cancelled"] = True
            key = "%s|%s" % (ev["customer"], ev["event_name"])
            state["totals"][key] = state["totals"].get(key, 0) - ev["value"]
            adj = state["adj"]
            adj["cancelled"].append(ident)
            adj["cancelled_value"] += ev["value"]
        return 200, {"id": "mtr_adj_" + uuid.uuid4().hex[:14], "object": "billing.meter_event_adjustment",
                     "cancel": {"identifier": ident}, "event_name": params["event_name"],
                     "livemode": False, "status": "pending", "type": "cancel"}


def reset_adjustments():
    """Forgets every cancel, cancel fault and counter (part of reset())."""
    state["adj"] = dict(requests=0, cancelled=[], cancelled_value=0, refused=0, replays=0, faults=deque())


def adjustment_stats():
    """GET /_mock/adjustments (called under the lock)."""
    adj = state["adj"]
    return {"requests": adj["requests"], "cancelled": len(adj["cancelled"]),
            "cancelled_value": adj["cancelled_value"], "refused": adj["refused"],
            "replays": adj["replays"], "identifiers": list(adj["cancelled"]),
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
    a = ap.parse_args()
    reset()
    state["rate_limit"] = a.rate_limit
    srv = Server(("127.0.0.1", a.port), Handler)
    srv.key = a.key
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


if __name__ == "__main__":
    main()
