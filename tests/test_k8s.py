"""deploy/k8s/ is product: every manifest validates against the Kubernetes 1.30 schemas, and
the rtc container's probes and preStop hook run, as written, against a live rtc host.

There is no cluster here. What a cluster would check is checked with the same rules:
``kubernetes-validate`` (strict: an unknown field fails, as ``kubectl apply`` rejects it),
the Pod Security Admission "restricted" profile, selectors against labels, the
settings through ``rtc check-config``, and the probe and hook command lines against
``rtc serve`` started by ``tests/rtcproc.py``.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import orjson
import psutil
import pytest
import yaml

from tests.client import Client
from tests.rtcproc import Host, hosts, start_redis, wait_for

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
MANIFESTS = sorted(K8S.rglob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _find(path: str, kind: str, name: str) -> dict[str, Any]:
    for doc in _documents(K8S / path):
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in {path}")


def _all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(str(p.relative_to(K8S)), doc) for p in MANIFESTS for doc in _documents(p)]


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"])
        for _, doc in _all_documents()
        if doc["kind"] in ("StatefulSet", "Job", "Deployment")
    ]


STATEFULSET = _find("rtc-statefulset.yaml", "StatefulSet", "rtc")
CONTAINER = STATEFULSET["spec"]["template"]["spec"]["containers"][0]
POD_LABELS = STATEFULSET["spec"]["template"]["metadata"]["labels"]


# --- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, doc",
    _all_documents(),
    ids=[f"{source}:{doc['kind']}/{doc['metadata']['name']}" for source, doc in _all_documents()],
)
def test_manifest_validates_against_kubernetes_1_30(source: str, doc: dict[str, Any]) -> None:
    validated = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    print(f"{source}: {doc['kind']}/{doc['metadata']['name']} valid against Kubernetes {validated}")


def test_every_shipped_manifest_is_checked() -> None:
    assert {p.name for p in MANIFESTS} >= {
        "namespace.yaml",
        "rtc-config.yaml",
        "rtc-statefulset.yaml",
        "rtc-services.yaml",
        "rtc-hpa.yaml",
        "rtc-pdb.yaml",
        "prometheus-adapter.yaml",
        "networkpolicy.yaml",
        "redis-cluster.yaml",
        "redis-cluster-init.yaml",
        "rtc-canary.yaml",
        "rtc-blue.yaml",
        "rtc-green.yaml",
        "service.yaml",
    }


def test_validation_refuses_an_unknown_or_a_missing_field() -> None:
    """The check above has teeth: a typo'd field and a missing required one both fail."""
    typo = copy.deepcopy(STATEFULSET)
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = CONTAINER["livenessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    missing = copy.deepcopy(STATEFULSET)
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'name' is a required property"):
        kubernetes_validate.validate(missing, KUBERNETES_VERSION, strict=True)
    no_selector = copy.deepcopy(STATEFULSET)
    del no_selector["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'selector' is a required property"):
        kubernetes_validate.validate(no_selector, KUBERNETES_VERSION, strict=True)


# --- what the schemas cannot see ----------------------------------------------------------------


def test_namespace_enforces_the_restricted_pod_security_profile() -> None:
    labels = _find("namespace.yaml", "Namespace", "rtc")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert not [doc for _, doc in _all_documents() if doc["kind"] == "PodSecurityPolicy"]


@pytest.mark.parametrize("name, template", _pod_templates(), ids=[n for n, _ in _pod_templates()])
def test_pod_meets_the_restricted_profile(name: str, template: dict[str, Any]) -> None:
    """Pod Security Admission "restricted" (v1.30), as the API server would enforce it."""
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    allowed_volumes = {"configMap", "emptyDir", "projected", "secret", "downwardAPI", "persistentVolumeClaim"}
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= allowed_volumes, volume
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert "privileged" not in context and "hostPort" not in str(container.get("ports"))
        assert "resources" not in container or "limits" in container["resources"]
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)


def test_rtc_pod_contract() -> None:
    """SPEC section 10: node id from the pod name, /health for readiness, /livez for liveness,
    a draining preStop that fits in the grace period."""
    env = {e["name"]: e for e in CONTAINER["env"]}
    assert env["RTC_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert CONTAINER["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert CONTAINER["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert "sleep" not in " ".join(command)
    drain_timeout = float(re.search(r"--timeout (\d+)", command[-1]).group(1))  # type: ignore[union-attr]
    config = _find("rtc-config.yaml", "ConfigMap", "rtc-env")["data"]
    grace = STATEFULSET["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert drain_timeout + float(config["RTC_SHUTDOWN_TIMEOUT"]) < grace
    ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    assert ports == {"http": int(config["RTC_PORT"]), "metrics": int(config["RTC_METRICS_PORT"])}
    annotations = STATEFULSET["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == config["RTC_METRICS_PORT"]
    mounts = {m["mountPath"] for m in CONTAINER["volumeMounts"]}
    assert Path(env["RTC_RUNTIME_DIR"]["value"]).parent.as_posix() in mounts  # a subdirectory: private
    assert Path(env["RTC_JWT_SECRET_FILE"]["value"]).parent.as_posix() in mounts


def test_rtc_settings_pass_check_config(tmp_path: Path) -> None:
    """The ConfigMap and the container's env, as the pod gets them, satisfy `rtc check-config`."""
    config = _find("rtc-config.yaml", "ConfigMap", "rtc-env")["data"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTC_")}
    env.update(config)
    secret = tmp_path / "jwt-secret"
    secret.write_text("k8s-secret-0123456789abcdef0123456789")
    env.update(RTC_NODE_ID="rtc-0", RTC_RUNTIME_DIR=str(tmp_path), RTC_JWT_SECRET_FILE=str(secret))
    result = subprocess.run(
        [sys.executable, "-m", "rtc", "check-config"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "2 workers on 0.0.0.0:8081" in result.stdout


def test_selectors_reach_the_rtc_pods() -> None:
    services = _documents(K8S / "rtc-services.yaml")
    for service in services:
        assert service["spec"]["selector"].items() <= POD_LABELS.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {p["name"] for p in CONTAINER["ports"]}
    assert STATEFULSET["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    pdb = _find("rtc-pdb.yaml", "PodDisruptionBudget", "rtc")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= POD_LABELS.items()
    policy = _find("networkpolicy.yaml", "NetworkPolicy", "rtc")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= POD_LABELS.items()
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert open_ports == {p["containerPort"] for p in CONTAINER["ports"]}


def test_hpa_scales_the_statefulset_on_cpu_memory_and_connections() -> None:
    hpa = _find("rtc-hpa.yaml", "HorizontalPodAutoscaler", "rtc")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", STATEFULSET["metadata"]["name"])
    metrics = {(m.get("resource") or m["pods"]["metric"])["name"]: m for m in hpa["spec"]["metrics"]}
    assert set(metrics) == {"cpu", "memory", "active_connections"}
    assert metrics["active_connections"]["type"] == "Pods"
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 300}
    ]


def test_prometheus_adapter_rule_names_the_hpa_metric() -> None:
    adapter = _find("prometheus-adapter.yaml", "ConfigMap", "prometheus-adapter")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert re.fullmatch(rule["name"]["matches"], series)
    assert rule["name"]["as"] == "active_connections"
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


@pytest.mark.parametrize(
    "path, name, track",
    [
        ("canary/rtc-canary.yaml", "rtc-canary", "canary"),
        ("blue-green/rtc-blue.yaml", "rtc-blue", "blue"),
        ("blue-green/rtc-green.yaml", "rtc-green", "green"),
    ],
)
def test_variant_stays_in_step_with_the_base(path: str, name: str, track: str) -> None:
    """A variant differs from rtc-statefulset.yaml only in its name, track, replicas and image."""
    variant = _find(path, "StatefulSet", name)
    expected = copy.deepcopy(STATEFULSET)
    expected["metadata"]["name"] = name
    for labels in (
        expected["metadata"]["labels"],
        expected["spec"]["selector"]["matchLabels"],
        expected["spec"]["template"]["metadata"]["labels"],
    ):
        labels["track"] = track
    expected["spec"]["replicas"] = variant["spec"]["replicas"]
    expected["spec"]["template"]["spec"]["containers"][0]["image"] = variant["spec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    assert variant == expected


def test_blue_green_service_selects_one_color() -> None:
    service = _find("blue-green/service.yaml", "Service", "rtc")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "rtc", "track": "blue"}
    base = copy.deepcopy(_find("rtc-services.yaml", "Service", "rtc"))
    base["spec"]["selector"]["track"] = "blue"
    assert service == base


def test_containerfile_builds_the_user_the_pod_runs_as() -> None:
    text = (K8S / "Containerfile").read_text()
    distribution = re.search(r"^name = (\S+)$", (REPO / "setup.cfg").read_text(), re.MULTILINE)
    assert distribution is not None
    assert f"--find-links /wheels {distribution.group(1)}" in text
    user = re.findall(r"^USER (\d+):(\d+)$", text, re.MULTILINE)
    pod = STATEFULSET["spec"]["template"]["spec"]["securityContext"]
    assert user == [(str(pod["runAsUser"]), str(pod["runAsGroup"]))]
    assert re.search(r'^ENTRYPOINT \["rtc"\]$', text, re.MULTILINE)
    assert re.search(r'^CMD \["serve"\]$', text, re.MULTILINE)
    assert CONTAINER["args"] == ["serve"]
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.MULTILINE):
        for name in source.split():
            assert (REPO / name).exists(), name
            assert f"!{name}" in (REPO / ".containerignore").read_text().replace("/\n", "\n")


# --- the probes and the hook against a live host ------------------------------------------------


@pytest.fixture(scope="module")
def live_host() -> Any:
    redis = start_redis()
    try:
        # A slow drain (2 connections per 0.3 s), so the probes can be read while it runs.
        with hosts(
            ("rtc-0", redis.url), workers=1, args=["--drain-batch", "2", "--drain-interval", "0.3"]
        ) as (host,):
            yield host
    finally:
        redis.stop()


def _probe(host: Host, probe: dict[str, Any]) -> int:
    """An httpGet probe as the kubelet runs it: GET path on the named container port."""
    get = probe["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    assert ports[get["port"]] == 8081  # the live host's port stands in for the container's
    try:
        with urllib.request.urlopen(f"{host.http}{get['path']}", timeout=probe["timeoutSeconds"]) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _pre_stop(host: Host) -> subprocess.Popen[str]:
    """The preStop command line verbatim, in the container's environment (RTC_PORT from the
    ConfigMap, pointed at the live host's port; rtc on PATH as in the image)."""
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "RTC_PORT": str(host.port),
    }
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_adapter_series_is_exposed_by_a_live_host(live_host: Host) -> None:
    adapter = _find("prometheus-adapter.yaml", "ConfigMap", "prometheus-adapter")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    series = rule["seriesQuery"].split("{")[0]
    text = live_host.get("/metrics", port=live_host.metrics_port)[1].decode()
    assert re.search(rf"^{series} \d", text, re.MULTILINE), text


async def test_probes_and_pre_stop_as_written(live_host: Host) -> None:
    """Readiness turns 503 and liveness stays 200 while preStop drains; preStop returns only
    once every socket has migrated."""
    assert _probe(live_host, CONTAINER["readinessProbe"]) == 200
    assert _probe(live_host, CONTAINER["livenessProbe"]) == 200
    clients = [await Client.connect(live_host.ws, f"user{i}") for i in range(10)]
    try:
        hook = _pre_stop(live_host)
        print(f"preStop: {shlex.join(hook.args)}")  # type: ignore[arg-type]
        seen: set[tuple[int, int]] = set()
        while hook.poll() is None:
            seen.add(
                (
                    _probe(live_host, CONTAINER["readinessProbe"]),
                    _probe(live_host, CONTAINER["livenessProbe"]),
                )
            )
            await asyncio.sleep(0.05)  # the probes' sampling interval while preStop runs, not a wait
        out, err = hook.communicate()
        assert hook.returncode == 0, err
        print(out)
        assert (503, 200) in seen, seen
        assert all(live == 200 for _, live in seen), seen
        # Returned only when the host had migrated every socket.
        report = orjson.loads(live_host.get("/admin/drain")[1])
        assert report["done"] and report["migrated"] == 10 and report["active_connections"] == 0, report
        for client in clients:
            await asyncio.wait_for(client.closed.wait(), 5)
            assert client.close_code == 1001
            assert any(f.get("status") == "migrating" for f in client.seen)
        assert _probe(live_host, CONTAINER["readinessProbe"]) == 503
        assert _probe(live_host, CONTAINER["livenessProbe"]) == 200
    finally:
        for client in clients:
            await client.close()
        live_host.request("DELETE", "/admin/drain")
        wait_for(live_host.healthy, 10, "host back in service")


def test_liveness_fails_once_the_supervisor_is_stopped(live_host: Host) -> None:
    """A supervisor that no longer runs (SIGSTOP here) makes /livez 503, so the kubelet restarts."""
    live_host.signal(signal.SIGSTOP)
    try:
        supervisor = psutil.Process(live_host.process.pid)
        wait_for(lambda: supervisor.status() == psutil.STATUS_STOPPED, 5, "the supervisor stopped")
        assert _probe(live_host, CONTAINER["livenessProbe"]) == 503
    finally:
        live_host.signal(signal.SIGCONT)
    assert _probe(live_host, CONTAINER["livenessProbe"]) == 200


def test_rtc_seeds_are_the_redis_cluster_pods() -> None:
    redis = _find("redis-cluster.yaml", "StatefulSet", "redis-cluster")
    service = redis["spec"]["serviceName"]
    pods = {
        f"redis://{redis['metadata']['name']}-{i}.{service}:6379" for i in range(redis["spec"]["replicas"])
    }
    seeds = _find("rtc-config.yaml", "ConfigMap", "rtc-env")["data"]["RTC_REDIS_CLUSTER"].split(",")
    assert set(seeds) == pods
