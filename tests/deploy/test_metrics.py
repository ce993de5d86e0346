"""Every metric named in the alert rules and the Grafana dashboard is one roomcast exports.

The exported names come from the real binary: `roomcast demo` (embedded mock Kafka, demo
producer) on ephemeral ports, driven so that every labelled family has a child (the Prometheus
client omits a labelled family until its first sample):
  - a plain GET /ws                   -> roomcast_handshake_failures_total
  - a WebSocket: subscribe, a bad frame, close
                                      -> roomcast_subscriptions_total,
                                         roomcast_client_frames_rejected_total,
                                         roomcast_connections_closed_total
  - a non-JSON record produced to the mock broker (a minimal Kafka Produce v3 request)
                                      -> roomcast_records_malformed_total
then /metrics is scraped. Histograms count as their _bucket/_sum/_count series only.

    ROOMCAST_BIN=target/debug/roomcast python3 tests/deploy/test_metrics.py
Standard library plus PyYAML only.
"""

import base64
import hashlib
import hmac
import json
import os
import queue
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")
CHART_ALERTS = os.path.join(ROOT, "helm", "roomcast", "files", "alerts.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "dashboards", "roomcast.json")
CHART_DASHBOARD = os.path.join(ROOT, "helm", "roomcast", "files", "roomcast.json")
SECRET = "metrics-test-secret-0123456789abcdef"

# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "bool", "offset", "inf", "nan", "Inf", "NaN", "start", "end"}


# --------------------------------------------------------------------------- PromQL

def metric_names(expr):
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "1", e)  # Grafana variables
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        if word in KEYWORDS or re.match(r"\s*\(", e[m.end():]):
            continue  # a keyword, or a function / aggregation
        names.add(word)
    return names


def alert_exprs(path):
    with open(path) as f:
        rules = yaml.safe_load(f)
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs(path):
    with open(path) as f:
        dash = json.load(f)
    out = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*", q)
        if m:
            out.append((f"variable {v['name']}", m.group(1)))
        elif not re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", q):
            out.append((f"variable {v['name']}", q))
    return out


# --------------------------------------------------------------------------- the binary

def hs256_token(secret, claims):
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def ws_frame(opcode, payload):
    """A masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def websocket_session(public, token):
    """Opens /ws, subscribes, sends a bad frame, closes; returns the text frames received."""
    host, port = split_addr(public)
    s = socket.create_connection((host, port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: {public}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise AssertionError("connection closed during the handshake")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head.decode(errors="replace")
    s.sendall(ws_frame(0x1, json.dumps({"type": "subscribe", "id": 1, "rooms": ["feature:users"]}).encode()))
    s.sendall(ws_frame(0x1, b"this is not a frame roomcast knows"))
    time.sleep(0.3)
    s.sendall(ws_frame(0x8, struct.pack(">H", 1000) + b"bye"))
    s.settimeout(3)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    except socket.timeout:
        pass
    s.close()
    return rest


def listening_ports(pid):
    """TCP ports the process listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and cols[9] in inodes:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            pass
    return ports


CRC32C_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    CRC32C_TABLE.append(_c)


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = CRC32C_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def varint(n):
    z = (n << 1) ^ (n >> 63)  # zigzag
    out = b""
    while True:
        if z < 0x80:
            return out + bytes([z])
        out += bytes([(z & 0x7F) | 0x80])
        z >>= 7


def kafka_produce(port, topic, partition, value):
    """Produce v3 of one record (record batch v2). Returns the partition's error code."""
    now = int(time.time() * 1000)
    body = b"\x00" + varint(0) + varint(0) + varint(-1) + varint(len(value)) + value + varint(0)
    record = varint(len(body)) + body
    after_crc = (struct.pack(">hiqqqhi", 0, 0, now, now, -1, -1, -1) + struct.pack(">i", 1) + record)
    batch_tail = struct.pack(">ib", -1, 2) + struct.pack(">I", crc32c(after_crc)) + after_crc
    batch = struct.pack(">qi", 0, len(batch_tail)) + batch_tail
    t = topic.encode()
    request = (struct.pack(">hhi", 0, 3, 7) + struct.pack(">h", 4) + b"test"  # header
               + struct.pack(">hhi", -1, 1, 5000)  # transactional id, acks, timeout
               + struct.pack(">i", 1) + struct.pack(">h", len(t)) + t
               + struct.pack(">i", 1) + struct.pack(">i", partition) + struct.pack(">i", len(batch)) + batch)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", recv_exactly(s, 4))[0]
        resp = recv_exactly(s, size)
    # correlation id, [topic: name, [partition, error_code, ...]]
    _corr, _n = struct.unpack(">ii", resp[:8])
    tlen = struct.unpack(">h", resp[8:10])[0]
    pos = 10 + tlen + 4
    _part, error = struct.unpack(">ih", resp[pos:pos + 6])
    return error


def recv_exactly(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def parse_exposition(text):
    """Sample names and TYPE of each family."""
    samples, types = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            samples.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return samples, types


class Demo:
    """`roomcast demo` on ephemeral ports, JSON logs read from stderr."""

    def __init__(self, binary):
        env = dict(os.environ, ROOMCAST_LOG_FORMAT="json", ROOMCAST_LOG="info", ROOMCAST_JWT_SECRET=SECRET)
        self.proc = subprocess.Popen([binary, "demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        self.lines = queue.Queue()
        self.log = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.time() + 60
        self.public = self.admin = None
        while time.time() < deadline and not self.admin:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("message") == "listening":
                self.public, self.admin = event["public"], event["admin"]
        if not self.admin:
            self.stop()
            raise AssertionError("roomcast demo did not log its listening addresses:\n" + "".join(self.log[-20:]))
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if http_get(f"http://{self.admin}/metrics", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("/metrics never answered")

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)
        if self.proc.stderr and not self.reader.is_alive():
            try:
                self.proc.stderr.close()
            except OSError:
                pass


EXPORTED = None
TYPES = None
NOTES = []


def exported_names():
    global EXPORTED, TYPES
    if EXPORTED is not None:
        return EXPORTED, TYPES
    binary = os.environ.get("ROOMCAST_BIN") or os.path.join(ROOT, "target", "debug", "roomcast")
    if not os.access(binary, os.X_OK):
        raise unittest.SkipTest(f"no roomcast binary at {binary} (build it or set ROOMCAST_BIN)")
    demo = Demo(binary)
    try:
        status, _ = http_get(f"http://{demo.public}/ws")
        assert status == 400, f"plain GET /ws answered {status}"
        token = hs256_token(SECRET, {"sub": "42", "exp": int(time.time()) + 600, "rooms": ["feature:**"]})
        websocket_session(demo.public, token)
        produced = False
        candidates = listening_ports(demo.proc.pid) - {split_addr(demo.public)[1], split_addr(demo.admin)[1]}
        for port in sorted(candidates):
            try:
                if kafka_produce(port, "entity-updates", 0, b"not json at all") == 0:
                    produced = True
                    break
            except (OSError, struct.error, ConnectionError):
                continue
        if not produced:
            NOTES.append("could not produce a malformed record to the mock cluster")
        wanted = {"roomcast_handshake_failures_total", "roomcast_subscriptions_total",
                  "roomcast_client_frames_rejected_total", "roomcast_connections_closed_total",
                  "roomcast_records_malformed_total", "roomcast_records_consumed_total",
                  "roomcast_record_latency_seconds_bucket", "roomcast_kafka_consumer_lag"}
        deadline = time.time() + 20
        while True:
            _, text = http_get(f"http://{demo.admin}/metrics")
            samples, types = parse_exposition(text)
            if wanted <= samples or time.time() > deadline:
                break
            time.sleep(0.5)
    finally:
        demo.stop()
    EXPORTED, TYPES = samples, types
    return samples, types


class MetricNames(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.exported, cls.types = exported_names()

    def check(self, where, exprs):
        self.assertTrue(exprs, f"no expressions found in {where}")
        for what, expr in exprs:
            with self.subTest(where=where, what=what):
                names = metric_names(expr)
                self.assertTrue(names, f"{what}: no metric in {expr!r}")
                unknown = sorted(n for n in names if n not in self.exported)
                hints = []
                for n in unknown:
                    if self.types.get(n) == "histogram":
                        hints.append(f"{n} is a histogram: use {n}_bucket, _sum or _count")
                self.assertEqual(unknown, [], f"{what}: not exported by roomcast: {unknown} {hints}")

    def test_every_labelled_family_was_exercised(self):
        families = {"roomcast_handshake_failures_total", "roomcast_subscriptions_total",
                    "roomcast_client_frames_rejected_total", "roomcast_connections_closed_total",
                    "roomcast_records_malformed_total"}
        missing = sorted(families - self.exported)
        self.assertEqual(missing, [], f"families the exercise did not bring out: {missing} {NOTES}")

    def test_histogram_series(self):
        self.assertEqual(self.types.get("roomcast_record_latency_seconds"), "histogram")
        for suffix in ("_bucket", "_sum", "_count"):
            self.assertIn("roomcast_record_latency_seconds" + suffix, self.exported)
        self.assertNotIn("roomcast_record_latency_seconds", self.exported)

    def test_process_metrics(self):
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
            self.assertIn(name, self.exported)

    def test_alert_rules(self):
        self.check("alerts.yml", alert_exprs(ALERTS))

    def test_dashboard(self):
        self.check("roomcast.json", dashboard_exprs(DASHBOARD))


class Parser(unittest.TestCase):
    """The PromQL name extraction itself."""

    def test_extraction(self):
        self.assertEqual(metric_names('sum by (topic) (rate(roomcast_records_consumed_total{job=~"$job"}[5m]))'),
                         {"roomcast_records_consumed_total"})
        self.assertEqual(metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[$__rate_interval])))"),
                         {"x_bucket"})
        self.assertEqual(metric_names("(a > 0) unless on (job, instance) (sum by (job) (increase(b[15m])) > 1e3)"),
                         {"a", "b"})
        self.assertEqual(metric_names('rate(c{reason!="draining"}[5m]) * 60 > 10 and d offset 5m'), {"c", "d"})


class Copies(unittest.TestCase):
    """The chart embeds copies (it cannot read files outside its directory)."""

    def test_chart_alerts_identical(self):
        with open(ALERTS, "rb") as a, open(CHART_ALERTS, "rb") as b:
            self.assertEqual(a.read(), b.read(), "cp deploy/prometheus/alerts.yml helm/roomcast/files/alerts.yml")

    def test_chart_dashboard_identical(self):
        with open(DASHBOARD, "rb") as a, open(CHART_DASHBOARD, "rb") as b:
            self.assertEqual(a.read(), b.read(),
                             "cp deploy/grafana/dashboards/roomcast.json helm/roomcast/files/roomcast.json")


class Dashboard(unittest.TestCase):
    def test_structure(self):
        with open(DASHBOARD) as f:
            dash = json.load(f)
        self.assertEqual(dash["uid"], "roomcast")
        ids = [p["id"] for p in dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "duplicate panel ids")
        for p in dash["panels"]:
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            if p["type"] != "row":
                self.assertEqual(p["datasource"]["uid"], "${datasource}", p["title"])
                self.assertTrue(p["targets"], p["title"])
        titles = " ".join(p["title"].lower() for p in dash["panels"])
        for topic in ("connections", "deliveries", "records", "malformed", "lag", "latency",
                      "slow-consumer", "handshake", "rooms", "memory", "cpu"):
            self.assertIn(topic, titles)
        exprs = " ".join(e for _, e in dashboard_exprs(DASHBOARD))
        self.assertIn("histogram_quantile(0.5,", exprs)
        self.assertIn("histogram_quantile(0.99,", exprs)


if __name__ == "__main__":
    unittest.main(verbosity=2)
