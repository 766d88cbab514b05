"""Deployment artefacts agree with the config they ship: config/k8s/*, Dockerfile.

Every manifest is loaded with PyYAML and the Jalur config embedded in the ConfigMap is parsed
with ``proxy.config.parse`` (so it must be a valid config). Ports, probe paths, the drain
timeline (grace period, preStop sleeps), the config mount and the security settings are then
checked against that config. The Dockerfile cannot be built here (no Docker engine), so it is
checked statically. ``jalur run --print-config`` is run through ``proxy.cli.main``.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from proxy import admin, cli
from proxy import config as cfg
from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "config" / "k8s"
NATIVE = "deployment-native-sidecar.yaml"
CLASSIC = "deployment-classic-sidecar.yaml"
VARIANTS = [NATIVE, CLASSIC]
MANIFESTS = {
    "configmap.yaml",
    NATIVE,
    CLASSIC,
    "podmonitor.yaml",
    "prometheus-rule.yaml",
    "secret.example.yaml",
    "secret-store.example.yaml",
    "redis.yaml",
    "service.yaml",
}
JALUR = "jalur"  # the sidecar's container name
TOKEN_ENV = "JALUR_ADMIN__TOKEN"

Doc = dict[str, Any]


# -- loading ----------------------------------------------------------------------------


def load_docs(name: str) -> list[Doc]:
    text = (K8S / name).read_text(encoding="utf-8")
    return [d for d in yaml.safe_load_all(text) if d is not None]


def one(name: str, kind: str) -> Doc:
    found = [d for d in load_docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def configmap() -> Doc:
    return one("configmap.yaml", "ConfigMap")


CONFIG_KEY = "jalur.yaml"


@pytest.fixture(scope="module")
def config() -> cfg.Config:
    return cfg.parse(configmap()["data"][CONFIG_KEY], source=f"configmap.yaml:{CONFIG_KEY}")


def pod_spec(variant: str) -> Doc:
    spec: Doc = one(variant, "Deployment")["spec"]["template"]["spec"]
    return spec


def all_containers(spec: Doc) -> Iterator[Doc]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def jalur_container(spec: Doc) -> Doc:
    found = [c for c in all_containers(spec) if c["name"] == JALUR]
    assert len(found) == 1, f"expected one container named {JALUR!r}"
    return found[0]


def app_containers(spec: Doc) -> list[Doc]:
    apps = [c for c in spec["containers"] if c["name"] != JALUR]
    assert apps, "the pod runs an app container beside Jalur"
    return apps


def port_number(container: Doc, port: int | str) -> int:
    """A probe/target port as a number: ints as they are, names via the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port name {port!r} is not declared by {container['name']}"
    return int(named[port])


def prestop_sleep(container: Doc) -> float:
    """Seconds the container's preStop hook sleeps (exec `sleep N` or the `sleep` action)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"), command
    assert len(command) == 2, command
    return float(command[1])


def config_path(container: Doc) -> str:
    args = list(container.get("command", [])) + list(container.get("args", []))
    assert args[:1] == ["run"], f"jalur must be started with `run`: {args}"
    for flag in ("-c", "--config"):
        if flag in args:
            return str(args[args.index(flag) + 1])
    raise AssertionError(f"no -c FILE in {args}")


# -- every manifest ---------------------------------------------------------------------


def test_every_manifest_loads_and_is_named() -> None:
    names = {p.name for p in K8S.glob("*.yaml")}
    assert names >= MANIFESTS
    for name in sorted(names):
        docs = load_docs(name)
        assert docs, f"{name} is empty"
        for d in docs:
            assert d.get("apiVersion"), name
            assert d.get("kind"), name
            assert d["metadata"]["name"], name


def test_configmap_holds_a_valid_production_config(config: cfg.Config) -> None:
    # Both listeners on the pod IP: the kubelet's probes and Prometheus come from outside
    # the pod's network namespace.
    assert config.listen.host == "0.0.0.0"
    assert config.admin.host == "0.0.0.0"
    # The token comes from the Secret (env override), never from the ConfigMap.
    assert config.admin.token is None
    assert config.boundary.consent.key is None
    # Read-only root filesystem: the audit log goes to stderr or to an absolute path (a
    # volume), never the default relative file in the working directory.
    assert config.compliance.audit.path == "-" or config.compliance.audit.path.startswith("/")
    assert config.drain.delay > 0
    assert config.drain.timeout > 0
    assert {s.kind for s in config.systems.values()} == {"social", "commerce"}
    # In-pod upstreams (loopback) must not collide with Jalur's own ports: the pod shares
    # one network namespace.
    for cluster in config.clusters.values():
        for endpoint in cluster.endpoints:
            m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", endpoint)
            if m:
                assert int(m.group(1)) not in (config.listen.port, config.admin.port), endpoint


def test_secret_example_is_obviously_fake() -> None:
    secret = one("secret.example.yaml", "Secret")
    token = secret["stringData"]["token"]
    assert "example" in token
    assert "replace" in token
    assert "replace" in secret["stringData"]["audit-key"]
    for doc in load_docs("secret-store.example.yaml"):
        for value in doc["stringData"].values():
            assert "example-not-a-real-password-replace-me" in value


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_fleet_store_is_redis_that_never_evicts_and_persists(
    variant: str, config: cfg.Config
) -> None:
    """Several replicas: the memory store would execute a payment once per replica."""
    assert config.store.kind == "redis"
    assert one(variant, "Deployment")["spec"]["replicas"] > 1
    env = {e["name"]: e for e in jalur_container(pod_spec(variant))["env"]}
    ref = env["JALUR_STORE__URL"]["valueFrom"]["secretKeyRef"]
    secrets = {d["metadata"]["name"]: d for d in load_docs("secret-store.example.yaml")}
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    redis = one("redis.yaml", "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"
    service = one("redis.yaml", "Service")["metadata"]["name"]
    assert f"@{service}:" in secrets[ref["name"]]["stringData"]["url"]


# -- both deployment variants -----------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_ports_match_listeners(variant: str, config: cfg.Config) -> None:
    jalur = jalur_container(pod_spec(variant))
    ports = {p["name"]: p["containerPort"] for p in jalur["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.port}


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_hit_the_admin_listener(variant: str, config: cfg.Config) -> None:
    jalur = jalur_container(pod_spec(variant))
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe, path in expected.items():
        get = jalur[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(jalur, get["port"]) == config.admin.port, probe
        assert get.get("scheme", "HTTP") == "HTTP", probe


async def test_probe_and_scrape_paths_exist_on_the_admin_listener(
    config: cfg.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every path a manifest points the kubelet or Prometheus at answers on a real admin app:
    200 while serving; /readyz turns 503 when draining while /livez stays 200."""
    paths = set()
    for variant in VARIANTS:
        jalur = jalur_container(pod_spec(variant))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            paths.add(jalur[probe]["httpGet"]["path"])
    scrape = one("podmonitor.yaml", "PodMonitor")["spec"]["podMetricsEndpoints"]
    paths.update(e.get("path", "/metrics") for e in scrape)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # one process here
    status = admin.Status(config=config)
    app = admin.make_app(status, Metrics(CollectorRegistry()))
    async with TestClient(TestServer(app)) as client:
        for path in sorted(paths):
            resp = await client.get(path)
            assert resp.status == 200, path
        status.draining = True
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/livez")).status == 200


@pytest.mark.parametrize("variant", VARIANTS)
def test_grace_period_covers_the_drain(variant: str, config: cfg.Config) -> None:
    spec = pod_spec(variant)
    grace = spec["terminationGracePeriodSeconds"]
    jalur = jalur_container(spec)
    drain = config.drain.delay + config.drain.timeout
    assert grace >= drain
    if variant == NATIVE:
        # The kubelet stops a native sidecar only after the app containers have exited, so
        # the app's preStop comes first, then Jalur's whole drain.
        assert "lifecycle" not in jalur
        assert grace >= max(prestop_sleep(a) for a in app_containers(spec)) + drain
    else:
        # The grace period is counted from the start of the preStop hook.
        assert grace >= prestop_sleep(jalur) + drain


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_is_mounted_as_a_directory(variant: str) -> None:
    spec = pod_spec(variant)
    jalur = jalur_container(spec)
    path = config_path(jalur)
    directory, filename = posixpath.split(path)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for m in jalur["volumeMounts"] if m["mountPath"] == directory]
    assert len(mounts) == 1, f"nothing mounted at {directory}"
    mount = mounts[0]
    # A subPath mount never sees ConfigMap updates; a directory mount gets the ..data swap.
    assert "subPath" not in mount
    assert "subPathExpr" not in mount
    assert mount.get("readOnly") is True
    source = volumes[mount["name"]]["configMap"]
    assert source["name"] == configmap()["metadata"]["name"]
    assert "items" not in source  # every key appears under its own name
    assert filename in configmap()["data"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_admin_token_comes_from_the_secret(variant: str) -> None:
    env = {e["name"]: e for e in jalur_container(pod_spec(variant))["env"]}
    ref = env[TOKEN_ENV]["valueFrom"]["secretKeyRef"]
    secret = one("secret.example.yaml", "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert all("value" not in e or "token" not in e["name"].lower() for e in env.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_audit_key_comes_from_the_secret(variant: str) -> None:
    env = {e["name"]: e for e in jalur_container(pod_spec(variant))["env"]}
    ref = env["JALUR_AUDIT__KEY"]["valueFrom"]["secretKeyRef"]
    secret = one("secret.example.yaml", "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert len(secret["stringData"][ref["key"]]) >= 16  # audit.key's minimum


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_context_and_resources(variant: str) -> None:
    spec = pod_spec(variant)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] != 0
    assert spec.get("automountServiceAccountToken") is False
    for c in all_containers(spec):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert "add" not in sc["capabilities"], c["name"]
        assert sc.get("runAsNonRoot", True) is True, c["name"]
        assert sc.get("runAsUser", 1) != 0, c["name"]
        assert c["resources"]["requests"]["memory"], c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]
    # Read-only root: /tmp is a volume (tempfile, multiprocess metrics with --workers).
    assert "/tmp" in {m["mountPath"] for m in jalur_container(spec)["volumeMounts"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_tie_deployment_service_and_podmonitor(variant: str, config: cfg.Config) -> None:
    deployment = one(variant, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = one("service.yaml", "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = one("podmonitor.yaml", "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- each variant -----------------------------------------------------------------------


def test_native_sidecar_is_a_restartable_init_container() -> None:
    spec = pod_spec(NATIVE)
    inits = {c["name"]: c for c in spec.get("initContainers", [])}
    assert JALUR in inits
    assert inits[JALUR]["restartPolicy"] == "Always"
    assert JALUR not in {c["name"] for c in spec["containers"]}
    # Its startupProbe gates the app containers' start.
    assert "startupProbe" in inits[JALUR]


def test_native_app_keeps_serving_while_the_endpoint_goes(config: cfg.Config) -> None:
    for app in app_containers(pod_spec(NATIVE)):
        assert prestop_sleep(app) >= config.drain.delay, app["name"]


def test_classic_sidecar_sleeps_before_sigterm(config: cfg.Config) -> None:
    spec = pod_spec(CLASSIC)
    assert "initContainers" not in spec
    jalur = jalur_container(spec)
    assert "restartPolicy" not in jalur
    assert prestop_sleep(jalur) >= config.drain.delay
    # Every container is stopped at once: the app must accept until Jalur stops accepting
    # (Jalur's preStop, then drain.delay), or requests to in-pod clusters fail.
    for app in app_containers(spec):
        assert prestop_sleep(app) >= prestop_sleep(jalur) + config.drain.delay, app["name"]


# -- Service and PodMonitor -------------------------------------------------------------


def test_service_targets_the_data_listener(config: cfg.Config) -> None:
    ports = one("service.yaml", "Service")["spec"]["ports"]
    for variant in VARIANTS:
        jalur = jalur_container(pod_spec(variant))
        targets = {port_number(jalur, p["targetPort"]) for p in ports}
        assert targets == {config.listen.port}, variant


def test_podmonitor_scrapes_the_admin_port(config: cfg.Config) -> None:
    monitor = one("podmonitor.yaml", "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint.get("path", "/metrics") == "/metrics"
    for variant in VARIANTS:
        jalur = jalur_container(pod_spec(variant))
        assert port_number(jalur, endpoint["port"]) == config.admin.port, variant


# -- Dockerfile -------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def last(instructions: list[tuple[str, str]], name: str) -> str:
    values = [rest for ins, rest in instructions if ins == name]
    assert values, f"Dockerfile has no {name}"
    return values[-1]


def test_dockerfile_base_user_and_entrypoint(config: cfg.Config) -> None:
    ins = dockerfile()
    bases = [rest.split()[0] for i, rest in ins if i == "FROM"]
    assert bases, "Dockerfile has no FROM"
    assert all(b == "python:3.11-slim" for b in bases), bases
    # USER: numeric (runAsNonRoot can verify it), not root, and the uid the pods run as.
    user = last(ins, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), user
    assert int(uid) == 10001
    for variant in VARIANTS:
        assert pod_spec(variant)["securityContext"]["runAsUser"] == int(uid)
    assert json.loads(last(ins, "ENTRYPOINT")) == ["jalur"]
    cmd = json.loads(last(ins, "CMD"))
    assert cmd == ["run", "-c", "/etc/jalur/jalur.yaml"]
    # The image's default config path is where the manifests mount the ConfigMap.
    for variant in VARIANTS:
        assert config_path(jalur_container(pod_spec(variant))) == cmd[2]
    assert set(last(ins, "EXPOSE").split()) == {str(config.listen.port), str(config.admin.port)}
    assert last(ins, "STOPSIGNAL") == "SIGTERM"
    # The runtime stage installs jalur without dev/test extras.
    installs = [rest for i, rest in ins if i == "RUN" and "pip install" in rest]
    assert installs, "Dockerfile never runs pip install"
    assert not any("[" in r for r in installs), installs
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^jalur = "proxy\.cli:main"$', pyproject, re.M)


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything out, then only what the build copies back in
    assert {"!pyproject.toml", "!README.md", "!proxy"} <= set(lines)


# -- jalur run --print-config -----------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in list(os.environ):
        if var.startswith(cfg.ENV_PREFIX):
            monkeypatch.delenv(var)
    path = tmp_path / CONFIG_KEY
    path.write_text(configmap()["data"][CONFIG_KEY], encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_print_config_merges_env_and_masks_secrets(
    fmt: str,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "s3cret-admin-token")
    monkeypatch.setenv("JALUR_LISTEN__PORT", "18080")
    argv = ["run", "-c", str(config_file), "--print-config"]
    if fmt == "json":
        argv.append("json")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    printed = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert printed["admin"]["token"] == "***"
    assert printed["listen"]["port"] == 18080
    assert printed["admin"]["port"] == 9901
    assert printed["drain"] == {"delay": 5.0, "timeout": 25.0}
    assert [r["name"] for r in printed["routes"]][:1] == ["feed"]


def test_print_config_reports_every_error(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JALUR_LISTEN__PORT", "not-a-port")
    monkeypatch.setenv("JALUR_DRAIN__TIMEOUT", "-1")
    assert cli.main(["run", "-c", str(config_file), "--print-config"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "2 error(s)" in captured.err
    assert "$.listen.port" in captured.err
    assert "JALUR_LISTEN__PORT" in captured.err
    assert "$.drain.timeout" in captured.err
