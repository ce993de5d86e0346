"""Structural checks of docker-compose.yml, deploy/Dockerfile, .dockerignore and the demo
producer, for machines where `docker compose config` and `docker build` cannot run.

    python3 tests/deploy/test_compose.py
Standard library plus PyYAML only.
"""

import fnmatch
import json
import os
import re
import shlex
import subprocess
import tempfile
import unittest

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def compose():
    return yaml.safe_load(read("docker-compose.yml"))


def volumes(service):
    out = {}
    for v in service.get("volumes", []):
        host, target = v.split(":")[:2]
        out[target] = host
    return out


FLOATING = {"", "latest", "stable", "slim", "edge", "main", "master", "nightly"}


def pinned(image):
    """Tagged with a version or a release codename, never a moving tag like latest."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in FLOATING


class Compose(unittest.TestCase):
    def setUp(self):
        self.c = compose()
        self.s = self.c["services"]

    def test_services_present(self):
        self.assertLessEqual({"kafka", "kafka-init", "roomcast", "producer", "prometheus", "grafana"}, set(self.s))

    def test_images_pinned(self):
        for name, svc in self.s.items():
            if "image" in svc:
                self.assertTrue(pinned(svc["image"]), f"{name}: image {svc['image']} is not pinned")
            else:
                self.assertIn("build", svc, name)
        self.assertTrue(self.s["kafka"]["image"].startswith("apache/kafka:"))
        self.assertTrue(self.s["prometheus"]["image"].startswith("prom/prometheus:"))
        self.assertTrue(self.s["grafana"]["image"].startswith("grafana/grafana:"))

    def test_kafka_kraft(self):
        env = self.s["kafka"]["environment"]
        self.assertEqual(set(env["KAFKA_PROCESS_ROLES"].split(",")), {"broker", "controller"})
        self.assertIn("CONTROLLER://", env["KAFKA_LISTENERS"])
        self.assertIn("PLAINTEXT://kafka:9092", env["KAFKA_ADVERTISED_LISTENERS"])
        self.assertNotIn("KAFKA_ZOOKEEPER_CONNECT", env)
        self.assertIn("healthcheck", self.s["kafka"])

    def test_topics_created_once(self):
        init = self.s["kafka-init"]
        self.assertEqual(init["depends_on"]["kafka"]["condition"], "service_healthy")
        script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
        for topic in ("entity-updates", "task-updates"):
            self.assertIn(topic, script)
        self.assertIn("--partitions 3", script)
        self.assertIn("--if-not-exists", script)

    def test_roomcast_built_from_dockerfile(self):
        rc = self.s["roomcast"]
        self.assertEqual(rc["build"]["context"], ".")
        self.assertEqual(rc["build"]["dockerfile"], "deploy/Dockerfile")
        self.assertTrue(os.path.isfile(os.path.join(ROOT, rc["build"]["context"], rc["build"]["dockerfile"])))
        self.assertTrue(pinned(rc["image"]))
        env = rc["environment"]
        self.assertEqual(env["ROOMCAST_KAFKA_BROKERS"], "kafka:9092")
        self.assertTrue(env["ROOMCAST_JWT_SECRET"])
        self.assertEqual(rc["depends_on"]["kafka-init"]["condition"], "service_completed_successfully")
        ports = {p.split(":")[-1] for p in rc["ports"]}
        self.assertEqual(ports, {"8080", "9090"})
        grace = int(rc["stop_grace_period"].rstrip("s"))
        self.assertGreater(grace, float(env.get("ROOMCAST_DRAIN_SECONDS", 5)) + 12)
        test = rc["healthcheck"]["test"]
        self.assertIn("/readyz", " ".join(test))

    def test_healthcheck_script_speaks_http(self):
        """The bash /dev/tcp probe works against a tiny local HTTP server."""
        import http.server
        import threading

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/readyz" else 404)
                self.end_headers()
                self.wfile.write(b"ready\n")

            def log_message(self, *a):
                pass

        srv = http.server.HTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            script = self.s["roomcast"]["healthcheck"]["test"][-1].replace("9090", str(srv.server_port))
            self.assertEqual(subprocess.run(["bash", "-c", script], timeout=10).returncode, 0)
            bad = script.replace("/readyz", "/nope")
            self.assertNotEqual(subprocess.run(["bash", "-c", bad], timeout=10).returncode, 0)
        finally:
            srv.shutdown()

    def test_prometheus_loads_rules_and_scrapes_roomcast(self):
        prom = self.s["prometheus"]
        mounts = volumes(prom)
        self.assertEqual(mounts["/etc/prometheus/prometheus.yml"], "./deploy/prometheus/prometheus.yml")
        self.assertEqual(mounts["/etc/prometheus/alerts.yml"], "./deploy/prometheus/alerts.yml")
        self.assertIn("--config.file=/etc/prometheus/prometheus.yml", prom["command"])
        cfg = yaml.safe_load(read("deploy", "prometheus", "prometheus.yml"))
        self.assertIn("alerts.yml", cfg["rule_files"])
        targets = [t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
        self.assertIn("roomcast:9090", targets)

    def test_grafana_provisioning(self):
        g = self.s["grafana"]
        mounts = volumes(g)
        self.assertEqual(mounts["/etc/grafana/provisioning"], "./deploy/grafana/provisioning")
        dash_dir = [t for t, h in mounts.items() if h == "./deploy/grafana/dashboards"]
        self.assertEqual(len(dash_dir), 1)
        provider = yaml.safe_load(read("deploy", "grafana", "provisioning", "dashboards", "roomcast.yml"))
        self.assertEqual(provider["providers"][0]["options"]["path"], dash_dir[0])
        ds = yaml.safe_load(read("deploy", "grafana", "provisioning", "datasources", "prometheus.yml"))
        self.assertEqual(ds["datasources"][0]["type"], "prometheus")
        self.assertEqual(ds["datasources"][0]["url"], "http://prometheus:9090")
        json.loads(read("deploy", "grafana", "dashboards", "roomcast.json"))

    def test_mounted_paths_exist(self):
        for name, svc in self.s.items():
            for target, host in volumes(svc).items():
                if host.startswith("."):
                    self.assertTrue(os.path.exists(os.path.join(ROOT, host)), f"{name}: {host} missing")

    def test_ports_unique(self):
        seen = {}
        for name, svc in self.s.items():
            for p in svc.get("ports", []):
                host = str(p).split(":")[0]
                self.assertNotIn(host, seen, f"host port {host} used by {seen.get(host)} and {name}")
                seen[host] = name

    def test_compose_interpolation(self):
        """Every $ in the file is either $$ (literal) or a ${VAR:-default} with a default."""
        text = read("docker-compose.yml")
        for m in re.finditer(r"\$(\$|\{[^}]*\}|\w+)", text):
            tok = m.group(1)
            if tok == "$":
                continue
            self.assertTrue(tok.startswith("{") and ":-" in tok, f"unescaped or default-less ${tok}")


class DemoProducer(unittest.TestCase):
    def test_records_of_both_formats(self):
        with tempfile.TemporaryDirectory() as tmp:
            fake = os.path.join(tmp, "producer")
            with open(fake, "w") as f:
                f.write('#!/bin/bash\nwhile [ $# -gt 0 ]; do [ "$1" = --topic ] && t=$2; shift; done\n'
                        f'head -n 3 > "{tmp}/$t.out"\n')
            os.chmod(fake, 0o755)
            env = dict(os.environ, PRODUCER=fake, INTERVAL="0.01", BOOTSTRAP="unused:9092")
            subprocess.run(["bash", os.path.join(ROOT, "deploy", "demo-producer.sh")], env=env,
                           timeout=30, capture_output=True)
            with open(os.path.join(tmp, "entity-updates.out")) as f:
                entities = [json.loads(line) for line in f]
            with open(os.path.join(tmp, "task-updates.out")) as f:
                tasks = [json.loads(line) for line in f]
        self.assertEqual(len(entities), 3)
        self.assertEqual(len(tasks), 3)
        for e in entities:
            self.assertEqual((e["feature"], e["entity"]), ("users", "user"))
            self.assertIn(e["action"], ("created", "updated", "deleted"))
            self.assertTrue(e["data"]["id"])
            self.assertIn(e["meta"]["priority"], ("low", "normal", "high"))
        for t in tasks:
            self.assertEqual(t["type"], "progress")
            self.assertTrue(t["taskId"] and t["userId"])
            self.assertIsInstance(t["progress"], int)


def dockerfile_instructions():
    text = read("deploy", "Dockerfile")
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerignore_patterns():
    return [l.strip() for l in read(".dockerignore").splitlines() if l.strip() and not l.startswith("#")]


def ignored(path, patterns):
    path = path.rstrip("/")
    for p in patterns:
        p = p.rstrip("/")
        if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.replace("**/", "")) or path.startswith(p + "/"):
            return True
    return False


class Dockerfile(unittest.TestCase):
    def setUp(self):
        self.ins = dockerfile_instructions()
        self.args = {}
        for w, rest in self.ins:
            if w == "ARG" and "=" in rest:
                k, v = rest.split("=", 1)
                self.args.setdefault(k, v)

    def expand(self, s):
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m.group(1), m.group(0)), s)

    def test_base_images_pinned(self):
        froms = [self.expand(r.split()[0]) for w, r in self.ins if w == "FROM"]
        self.assertGreaterEqual(len(froms), 2)
        for image in froms:
            self.assertTrue(pinned(image), image)
        self.assertEqual(froms[-1], "debian:bookworm-slim")
        # The binary links the builder's glibc and OpenSSL: same Debian release in both.
        for image in froms[:-1]:
            self.assertTrue(image.endswith("-bookworm"), image)

    def test_runtime_stage(self):
        last = max(i for i, (w, _) in enumerate(self.ins) if w == "FROM")
        final = self.ins[last:]
        users = [r for w, r in final if w == "USER"]
        self.assertEqual(len(users), 1)
        self.assertRegex(users[0], r"^\d+(:\d+)?$", "USER must be numeric for runAsNonRoot")
        self.assertNotEqual(users[0].split(":")[0], "0")
        exposed = {p for w, r in final if w == "EXPOSE" for p in r.split()}
        self.assertEqual(exposed, {"8080", "9090"})
        self.assertIn(("ENTRYPOINT", '["roomcast"]'), final)
        self.assertIn(("CMD", '["serve"]'), final)
        runs = " ".join(r for w, r in final if w == "RUN")
        for pkg in ("ca-certificates", "libssl3", "zlib1g"):
            self.assertIn(pkg, runs)
        self.assertFalse([r for w, r in final if w == "ENV" and "ROOMCAST_" in r],
                         "an image-level ROOMCAST_* default would override a mounted config file")

    def test_cached_dependency_layer_then_sources(self):
        seq = [(w, r) for w, r in self.ins if w in ("COPY", "RUN")]
        builds = [i for i, (w, r) in enumerate(seq) if w == "RUN" and "cargo build --release --locked -p roomcast" in r]
        self.assertEqual(len(builds), 2, "one build of the dependencies, one of the crate")
        src = [i for i, (w, r) in enumerate(seq) if w == "COPY" and r.split()[0] == "src/"]
        self.assertTrue(builds[0] < src[0] < builds[1])
        self.assertIn("cargo clean", seq[builds[0]][1], "the stub crate must not survive into the real build")

    def test_copied_sources_exist_and_are_not_ignored(self):
        patterns = dockerignore_patterns()
        for w, r in self.ins:
            if w != "COPY" or r.startswith("--from"):
                continue
            parts = shlex.split(r)
            for src in parts[:-1]:
                if src == ".":
                    continue
                self.assertTrue(os.path.exists(os.path.join(ROOT, src)), src)
                self.assertFalse(ignored(src, patterns), f"{src} is excluded by .dockerignore")
        self.assertTrue(os.path.isfile(os.path.join(ROOT, "static", "index.html")))

    def test_dockerignore(self):
        patterns = dockerignore_patterns()
        for path in ("target", ".git", "node_modules", "tests/browser/node_modules", "load/target"):
            self.assertTrue(ignored(path, patterns), path)
        for path in ("Cargo.toml", "Cargo.lock", "src", "static/index.html"):
            self.assertFalse(ignored(path, patterns), path)

    def test_planner_skeleton_resolves(self):
        """Runs the planner stage's skeleton script on a copy of the context; cargo must resolve
        the workspace (manifests, lock file, every explicit target) from the skeleton alone."""
        planner = [r for w, r in self.ins if w == "RUN" and "/skeleton" in r]
        self.assertEqual(len(planner), 1)
        with tempfile.TemporaryDirectory() as tmp:
            ctx = os.path.join(tmp, "ctx")
            patterns = dockerignore_patterns()
            for dirpath, dirnames, filenames in os.walk(ROOT):
                rel = os.path.relpath(dirpath, ROOT)
                rel = "" if rel == "." else rel
                dirnames[:] = [d for d in dirnames if not ignored(os.path.join(rel, d), patterns)]
                for fn in filenames:
                    if fn == "Cargo.toml" or fn == "Cargo.lock" or fn.endswith(".rs") or rel.startswith(".cargo"):
                        relf = os.path.join(rel, fn)
                        if ignored(relf, patterns):
                            continue
                        os.makedirs(os.path.join(ctx, rel), exist_ok=True)
                        with open(os.path.join(ROOT, relf), "rb") as a, open(os.path.join(ctx, relf), "wb") as b:
                            b.write(a.read())
            skeleton = os.path.join(tmp, "skeleton")
            script = planner[0].replace("/skeleton", skeleton)
            subprocess.run(["sh", "-c", script], cwd=ctx, check=True)
            stubs = [os.path.join(d, f) for d, _, fs in os.walk(skeleton) for f in fs if f.endswith(".rs")]
            self.assertTrue(stubs)
            for stub in stubs:
                with open(stub) as f:
                    self.assertEqual(f.read(), "fn main() {}\n")
            run = subprocess.run(["cargo", "metadata", "--locked", "--format-version", "1"], cwd=skeleton,
                                 capture_output=True, text=True, timeout=300,
                                 env=dict(os.environ, CARGO_TARGET_DIR=os.path.join(tmp, "target")))
            self.assertEqual(run.returncode, 0, run.stderr)
            meta = json.loads(run.stdout)
            self.assertIn("roomcast", {p["name"] for p in meta["packages"] if p["source"] is None})


if __name__ == "__main__":
    unittest.main(verbosity=2)
