"""Checks the manifests rendered from helm/roomcast.

Run by check.sh after `helm template`:
    python3 tests/deploy/test_chart.py RENDER_DIR
RENDER_DIR holds defaults.yaml, all.yaml and publickey.yaml (the chart rendered with no values,
with tests/deploy/values-all.yaml and with tests/deploy/values-publickey.yaml). ROOMCAST_BIN,
when set, is used to validate every rendered config.toml with `roomcast check-config`.
Standard library plus PyYAML only.
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import unittest

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RENDER_DIR = os.environ.get("RENDER_DIR", "")

RECOMMENDED_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]
ADMIN_PORT = 9090
PUBLIC_PORT = 8080
# roomcast's worst-case stop after SIGTERM beyond the drain window: 3 s for sessions to end,
# up to 5 s for the final commit, 1 + 1 s for the listeners, 2 s for the runtime.
STOP_OVERHEAD_SECONDS = 12


def load(name):
    with open(os.path.join(RENDER_DIR, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def values(name):
    with open(os.path.join(ROOT, "helm", "roomcast", name)) as f:
        return yaml.safe_load(f)


def test_values(name):
    with open(os.path.join(ROOT, "tests", "deploy", name)) as f:
        return yaml.safe_load(f)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs):
    dep = one(docs, "Deployment")
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def port_number(c, name_or_number):
    if isinstance(name_or_number, int):
        return name_or_number
    for p in c["ports"]:
        if p["name"] == name_or_number:
            return p["containerPort"]
    raise AssertionError(f"no container port named {name_or_number}")


class Rendered(unittest.TestCase):
    """Assertions that hold for every rendering."""

    RENDERS = ["defaults.yaml", "all.yaml", "publickey.yaml"]

    def each(self):
        for name in self.RENDERS:
            with self.subTest(render=name):
                yield name, load(name)

    def test_probes_on_admin_port(self):
        for _, docs in self.each():
            c = container(docs)
            live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
            self.assertEqual(live["path"], "/healthz")
            self.assertEqual(ready["path"], "/readyz")
            self.assertEqual(port_number(c, live["port"]), ADMIN_PORT)
            self.assertEqual(port_number(c, ready["port"]), ADMIN_PORT)
            self.assertEqual(port_number(c, "http"), PUBLIC_PORT)

    def test_security_context(self):
        for _, docs in self.each():
            pod = one(docs, "Deployment")["spec"]["template"]["spec"]
            psc, csc = pod["securityContext"], container(docs)["securityContext"]
            self.assertIs(psc["runAsNonRoot"], True)
            self.assertIsInstance(psc["runAsUser"], int)
            self.assertGreater(psc["runAsUser"], 0)
            self.assertEqual(psc["seccompProfile"]["type"], "RuntimeDefault")
            self.assertIs(csc["runAsNonRoot"], True)
            self.assertGreater(csc["runAsUser"], 0)
            self.assertIs(csc["readOnlyRootFilesystem"], True)
            self.assertIs(csc["allowPrivilegeEscalation"], False)
            self.assertEqual(csc["capabilities"]["drop"], ["ALL"])
            self.assertFalse(csc["capabilities"].get("add"))
            self.assertEqual(csc["seccompProfile"]["type"], "RuntimeDefault")
            self.assertIs(pod["automountServiceAccountToken"], False)
            # Service links would turn a Service named *-kafka into ROOMCAST_KAFKA_* variables,
            # which roomcast hands to librdkafka as (unknown) properties.
            self.assertIs(pod["enableServiceLinks"], False)

    def test_termination_grace_covers_prestop_and_drain(self):
        for _, docs in self.each():
            pod = one(docs, "Deployment")["spec"]["template"]["spec"]
            c = container(docs)
            cmd = c["lifecycle"]["preStop"]["exec"]["command"]
            self.assertEqual(cmd[0], "/bin/sleep")
            pre_stop = int(cmd[1])
            self.assertGreater(pre_stop, 0)
            drain = float(config_toml(docs)["server"]["drain_seconds"])
            grace = pod["terminationGracePeriodSeconds"]
            self.assertGreater(grace, pre_stop + drain, "grace must exceed preStop + drain")
            self.assertGreater(grace, pre_stop + math.ceil(drain) + STOP_OVERHEAD_SECONDS)

    def test_replica_name_from_pod_name(self):
        for _, docs in self.each():
            env = {e["name"]: e for e in container(docs)["env"]}
            ref = env["ROOMCAST_SERVER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
            self.assertEqual(ref, "metadata.name")

    def test_recommended_labels_on_every_object(self):
        for _, docs in self.each():
            for d in docs:
                labels = d["metadata"].get("labels", {})
                for key in RECOMMENDED_LABELS:
                    self.assertIn(key, labels, f"{d['kind']}/{d['metadata']['name']} lacks {key}")
                self.assertEqual(labels["app.kubernetes.io/managed-by"], "Helm")
            pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
            for key in RECOMMENDED_LABELS:
                self.assertIn(key, pod_labels)

    def test_images_pinned(self):
        for _, docs in self.each():
            for d in docs:
                spec = d.get("spec", {}).get("template", {}).get("spec", {})
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    image = c["image"]
                    if "@sha256:" in image:
                        continue
                    name, _, tag = image.rpartition(":")
                    self.assertTrue(name and "/" not in tag, f"untagged image {image}")
                    self.assertNotEqual(tag, "latest", f"image {image} uses latest")

    def test_default_tag_is_app_version(self):
        chart = values("Chart.yaml")
        image = container(load("defaults.yaml"))["image"]
        self.assertEqual(image, f"{values('values.yaml')['image']['repository']}:{chart['appVersion']}")

    def test_checksum_annotation_matches_configmap(self):
        for _, docs in self.each():
            ann = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
            self.assertRegex(ann.get("checksum/config", ""), r"^[0-9a-f]{64}$")

    def test_admin_port_only_on_admin_service(self):
        for _, docs in self.each():
            services = by_kind(docs, "Service")
            self.assertEqual(len(services), 2)
            c = container(docs)
            for s in services:
                targets = {port_number(c, p["targetPort"]) for p in s["spec"]["ports"]}
                if s["metadata"]["name"].endswith("-admin"):
                    self.assertEqual(targets, {ADMIN_PORT})
                    self.assertEqual(s["spec"]["type"], "ClusterIP")
                else:
                    self.assertEqual(targets, {PUBLIC_PORT})
                    self.assertEqual(s["spec"]["ports"][0]["name"], "http")
                    self.assertEqual(s["spec"]["ports"][0]["port"], 80)

    def test_topology_spread_selects_own_pods(self):
        for _, docs in self.each():
            dep = one(docs, "Deployment")
            spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
            self.assertTrue(spread)
            for t in spread:
                self.assertEqual(t["labelSelector"]["matchLabels"], dep["spec"]["selector"]["matchLabels"])

    def test_resources_set(self):
        for _, docs in self.each():
            r = container(docs)["resources"]
            self.assertIn("memory", r["requests"])
            self.assertIn("cpu", r["requests"])
            self.assertIn("memory", r["limits"])

    def test_config_toml_is_accepted_by_roomcast(self):
        binary = os.environ.get("ROOMCAST_BIN")
        if not binary:
            self.skipTest("ROOMCAST_BIN not set")
        for name, docs in self.each():
            text = one_configmap(docs)["data"]["config.toml"]
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "config.toml")
                with open(path, "w") as f:
                    f.write(text)
                env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
                env["ROOMCAST_JWT_SECRET"] = "check-config-secret-0123456789"
                if "public_key_file" in text:
                    key = os.path.join(tmp, "public.pem")
                    make_public_key(key)
                    env["ROOMCAST_JWT_PUBLIC_KEY_FILE"] = key
                run = subprocess.run([binary, "check-config", "--config", path], env=env,
                                     capture_output=True, text=True, timeout=30)
                self.assertEqual(run.returncode, 0, f"{name}: {run.stderr}")
                self.assertIn("configuration is valid", run.stderr)


class Defaults(unittest.TestCase):
    def setUp(self):
        self.docs = load("defaults.yaml")

    def test_optional_objects_off(self):
        kinds = {d["kind"] for d in self.docs}
        for kind in ["Ingress", "ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "NetworkPolicy"]:
            self.assertNotIn(kind, kinds)
        self.assertEqual(one(self.docs, "Deployment")["spec"]["replicas"], 2)

    def test_generated_hs_secret_is_mounted(self):
        secret = one(self.docs, "Secret")
        env = {e["name"]: e for e in container(self.docs)["env"]}
        ref = env["ROOMCAST_JWT_SECRET"]["valueFrom"]["secretKeyRef"]
        self.assertEqual(ref["name"], secret["metadata"]["name"])
        self.assertIn(ref["key"], secret["data"])
        self.assertIn("checksum/secret", one(self.docs, "Deployment")["spec"]["template"]["metadata"]["annotations"])

    def test_default_routes(self):
        self.assertNotIn("route", config_toml(self.docs))

    def test_default_resume_settings_are_roomcasts(self):
        self.assertEqual(config_toml(self.docs)["resume"], {
            "buffer_bytes": 67108864,
            "buffer_max_age_seconds": 300,
            "max_age_seconds": 3600,
            "kafka_concurrency": 4,
            "max_replay_records": 100000,
            "positions_interval_seconds": 5.0,
        })


class AllFeatures(unittest.TestCase):
    def setUp(self):
        self.docs = load("all.yaml")
        self.values = test_values("values-all.yaml")

    def test_every_optional_object_rendered(self):
        kinds = {d["kind"] for d in self.docs}
        for kind in ["Ingress", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceAccount"]:
            self.assertIn(kind, kinds)

    def test_ingress_routes_only_public_service(self):
        ing = one(self.docs, "Ingress")
        services = {s["metadata"]["name"]: s for s in by_kind(self.docs, "Service")}
        c = container(self.docs)
        backends = [p["backend"]["service"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
        self.assertTrue(backends)
        for b in backends:
            svc = services[b["name"]]
            port = b["port"].get("name") or b["port"].get("number")
            matching = [p for p in svc["spec"]["ports"] if port in (p["name"], p["port"])]
            self.assertEqual(len(matching), 1)
            self.assertEqual(port_number(c, matching[0]["targetPort"]), PUBLIC_PORT)
        ann = ing["metadata"]["annotations"]
        self.assertEqual(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"], "3600")
        self.assertEqual(ann["nginx.ingress.kubernetes.io/proxy-send-timeout"], "3600")
        self.assertEqual(ing["spec"]["tls"][0]["secretName"], "rt-example-com-tls")

    def test_service_monitor_scrapes_admin(self):
        sm = one(self.docs, "ServiceMonitor")
        self.assertEqual(sm["spec"]["endpoints"][0]["port"], "admin")
        self.assertEqual(sm["spec"]["endpoints"][0]["path"], "/metrics")
        self.assertEqual(sm["metadata"]["labels"]["release"], "kube-prometheus-stack")
        admin = [s for s in by_kind(self.docs, "Service") if s["metadata"]["name"].endswith("-admin")][0]
        for k, v in sm["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(admin["metadata"]["labels"][k], v)

    def test_prometheus_rule_equals_alerts_file(self):
        rule = one(self.docs, "PrometheusRule")
        with open(os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")) as f:
            self.assertEqual(rule["spec"], yaml.safe_load(f))

    def test_hpa_cpu_and_connections(self):
        hpa = one(self.docs, "HorizontalPodAutoscaler")
        self.assertNotIn("replicas", one(self.docs, "Deployment")["spec"])
        metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
        self.assertEqual(metrics["Resource"]["resource"]["name"], "cpu")
        self.assertEqual(metrics["Pods"]["pods"]["metric"]["name"], "roomcast_connections")
        self.assertEqual(hpa["spec"]["scaleTargetRef"]["name"], one(self.docs, "Deployment")["metadata"]["name"])

    def test_pdb_and_network_policy(self):
        pdb = one(self.docs, "PodDisruptionBudget")
        self.assertEqual(pdb["spec"]["minAvailable"], 2)
        self.assertNotIn("maxUnavailable", pdb["spec"])
        np = one(self.docs, "NetworkPolicy")
        ports = {r["ports"][0]["port"]: r for r in np["spec"]["ingress"]}
        self.assertEqual(set(ports), {"http", "admin"})
        self.assertEqual(ports["admin"]["from"][0]["namespaceSelector"]["matchLabels"],
                         {"kubernetes.io/metadata.name": "monitoring"})

    def test_grafana_dashboard_configmap(self):
        cms = [d for d in by_kind(self.docs, "ConfigMap") if "roomcast.json" in d["data"]]
        self.assertEqual(len(cms), 1)
        self.assertEqual(cms[0]["metadata"]["labels"]["grafana_dashboard"], "1")
        with open(os.path.join(ROOT, "deploy", "grafana", "dashboards", "roomcast.json")) as f:
            self.assertEqual(json.loads(cms[0]["data"]["roomcast.json"]), json.load(f))

    def test_secrets_from_existing_secrets(self):
        self.assertEqual(by_kind(self.docs, "Secret"), [], "no chart-made Secret with existing ones")
        env = {e["name"]: e for e in container(self.docs)["env"]}
        jwt = env["ROOMCAST_JWT_SECRET"]["valueFrom"]["secretKeyRef"]
        self.assertEqual((jwt["name"], jwt["key"]), ("roomcast-jwt", "secret"))
        sasl = env["ROOMCAST_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        self.assertEqual((sasl["name"], sasl["key"]), ("roomcast-kafka", "password"))

    def test_config_from_values(self):
        cfg = config_toml(self.docs)
        self.assertEqual(cfg["kafka"]["security.protocol"], "SASL_SSL")
        self.assertEqual(cfg["kafka"]["ssl.ca.location"], "/etc/roomcast/kafka-ca/ca.pem")
        self.assertNotIn("sasl.password", cfg["kafka"])
        self.assertEqual(cfg["auth"]["algorithm"], "HS512")
        self.assertEqual(cfg["auth"]["perms"]["tasks:read"], ["task:*"])
        self.assertEqual([r["topic"] for r in cfg["route"]], ["entity-updates", "task-updates"])
        self.assertIs(cfg["route"][1]["expose_rooms"], True)
        self.assertEqual(cfg["server"]["allowed_origins"], self.values["config"]["server"]["allowedOrigins"])
        resume = self.values["config"]["resume"]
        self.assertEqual(cfg["resume"], {
            "buffer_bytes": resume["bufferBytes"],
            "buffer_max_age_seconds": resume["bufferMaxAgeSeconds"],
            "max_age_seconds": resume["maxAgeSeconds"],
            "kafka_concurrency": resume["kafkaConcurrency"],
            "max_replay_records": resume["maxReplayRecords"],
            "positions_interval_seconds": resume["positionsIntervalSeconds"],
        })
        self.assertEqual(cfg["presence"], {
            "enabled": True,
            "topic": "rt-presence",
            "create_topic": True,
            "expiry_seconds": 12.0,
            "status_room": "org:{tenant}",
            "rooms": ["task:*", "org:*"],
        })
        self.assertEqual(cfg["kafka"]["ssl.certificate.location"], "/etc/roomcast/kafka-client/client.crt")
        self.assertEqual(cfg["kafka"]["ssl.key.location"], "/etc/roomcast/kafka-client/client.key")
        mounts = {m["name"]: m["mountPath"] for m in container(self.docs)["volumeMounts"]}
        self.assertEqual(mounts["kafka-ca"], "/etc/roomcast/kafka-ca")
        self.assertEqual(mounts["kafka-client"], "/etc/roomcast/kafka-client")
        vols = {v["name"]: v for v in one(self.docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(vols["kafka-client"]["secret"]["secretName"], "roomcast-kafka-client")
        self.assertEqual({i["path"] for i in vols["kafka-client"]["secret"]["items"]}, {"client.crt", "client.key"})

    def test_explicit_grace_period_kept(self):
        pod = one(self.docs, "Deployment")["spec"]["template"]["spec"]
        self.assertEqual(pod["terminationGracePeriodSeconds"], 60)


class PublicKey(unittest.TestCase):
    def test_public_key_mounted(self):
        docs = load("publickey.yaml")
        c = container(docs)
        env = {e["name"] for e in c["env"]}
        self.assertNotIn("ROOMCAST_JWT_SECRET", env)
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        self.assertEqual(mounts["jwt-public-key"], "/etc/roomcast/jwt")
        cfg = config_toml(docs)
        self.assertEqual(cfg["auth"]["algorithm"], "RS256")
        self.assertEqual(cfg["auth"]["public_key_file"], "/etc/roomcast/jwt/public.pem")
        secret = one(docs, "Secret")
        self.assertIn("public.pem", secret["data"])
        vol = [v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
               if v["name"] == "jwt-public-key"][0]
        self.assertEqual(vol["secret"]["secretName"], secret["metadata"]["name"])
        self.assertEqual(vol["secret"]["items"], [{"key": "public.pem", "path": "public.pem"}])


class Schema(unittest.TestCase):
    def test_closed_objects_everywhere(self):
        with open(os.path.join(ROOT, "helm", "roomcast", "values.schema.json")) as f:
            schema = json.load(f)

        def walk(node, path):
            """Schema nodes only: properties' values, items, map values, combinators."""
            if node.get("type") == "object" or "properties" in node:
                self.assertIn("additionalProperties", node, f"{path} is an open object")
                if "properties" in node:
                    self.assertIs(node["additionalProperties"], False, f"{path} must be closed")
                else:
                    # A map (labels, annotations, librdkafka properties): typed values.
                    self.assertIsInstance(node["additionalProperties"], dict, path)
            for name, sub in node.get("properties", {}).items():
                walk(sub, f"{path}.{name}")
            if isinstance(node.get("items"), dict):
                walk(node["items"], f"{path}[]")
            if isinstance(node.get("additionalProperties"), dict):
                walk(node["additionalProperties"], f"{path}.*")
            for key in ("anyOf", "oneOf", "allOf"):
                for i, sub in enumerate(node.get(key, [])):
                    walk(sub, f"{path}.{key}[{i}]")

        walk(schema, "$")

    def test_schema_covers_values(self):
        with open(os.path.join(ROOT, "helm", "roomcast", "values.schema.json")) as f:
            schema = json.load(f)

        def walk(value, node, path):
            if isinstance(value, dict) and "properties" in node:
                for k, v in value.items():
                    self.assertIn(k, node["properties"], f"{path}.{k} not in the schema")
                    walk(v, node["properties"][k], f"{path}.{k}")

        walk(values("values.yaml"), schema, "values")
        walk(test_values("values-all.yaml"), schema, "values-all")


class Readme(unittest.TestCase):
    def test_every_value_documented(self):
        with open(os.path.join(ROOT, "helm", "roomcast", "README.md")) as f:
            text = f.read()
        keys = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
        self.assertTrue(keys)

        def documented(path):
            return any(path == k or path.startswith(k + ".") or (k.endswith(".*") and path.startswith(k[:-1]))
                       for k in keys)

        def leaves(value, path):
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    yield from leaves(v, f"{path}.{k}" if path else k)
            else:
                yield path

        missing = [p for p in leaves(values("values.yaml"), "") if not documented(p)]
        self.assertEqual(missing, [], "values missing from the README's table")


def one_configmap(docs):
    cms = [d for d in by_kind(docs, "ConfigMap") if "config.toml" in d.get("data", {})]
    assert len(cms) == 1
    return cms[0]


def config_toml(docs):
    return parse_toml(one_configmap(docs)["data"]["config.toml"])


def parse_toml(text):
    try:
        import tomllib  # Python 3.11+
        return tomllib.loads(text)
    except ImportError:  # pragma: no cover - older Pythons
        import toml  # type: ignore
        return toml.loads(text)


def make_public_key(path):
    """An RSA public key for check-config (openssl is on every machine that has ssl headers)."""
    with tempfile.TemporaryDirectory() as tmp:
        private = os.path.join(tmp, "private.pem")
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                        "-out", private], check=True, capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", private, "-pubout", "-out", path], check=True,
                       capture_output=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        RENDER_DIR = sys.argv.pop(1)
    if not RENDER_DIR:
        sys.exit("usage: test_chart.py RENDER_DIR")
    unittest.main(verbosity=2)
