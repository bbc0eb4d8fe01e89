"""deploy/ agrees with the code it runs.

The settings classes ignore unknown variables (extra="ignore"), so a misspelt DOSEWATCH_* name
in a manifest would be dropped without a word. These tests read deploy/compose.yaml,
deploy/k8s/*.yaml and deploy/Dockerfile and check every variable, command, port, probe and
replica count against the settings classes and the CLI, and that no secret is committed.
"""

from __future__ import annotations

import glob
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dosewatch.cli import _parser
from services.api.settings import ApiSettings
from services.common.settings import CommonSettings
from services.dosage.service import DosageSettings
from services.geofence.service import GeofenceSettings
from services.ingest.service import IngestSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

SERVICES: dict[str, type[CommonSettings]] = {
    "ingest": IngestSettings,
    "geofence": GeofenceSettings,
    "dosage": DosageSettings,
    "api": ApiSettings,
}
STATEFUL = ("geofence", "dosage")  # consumer-group members with state in PostgreSQL
PREFIX = "DOSEWATCH_"
PLACEHOLDER = "CHANGE-ME"
# Settings that hold a secret: never given a value in a manifest, only through *_FILE (or, in
# Compose, a ${VAR} reference to the operator's environment).
SECRET_SETTINGS = {"DOSEWATCH_KAFKA_SASL_PASSWORD", "DOSEWATCH_DATABASE_URL",
                   "DOSEWATCH_JWT_SECRET"}  # fmt: skip
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]+:(?P<password>[^@\s]*)@", re.IGNORECASE)
# A Compose reference that must come from the environment: ${VAR} or ${VAR:?message}, never a
# ${VAR:-default}, which would be a committed fallback.
REQUIRED_REF = re.compile(r"^\$\{(?P<name>\w+)(?::?\?[^}]*)?\}$")
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# -- what the code accepts ---------------------------------------------------------------------


def setting_names(cls: type[CommonSettings]) -> set[str]:
    """Every environment variable the settings class reads: DOSEWATCH_<FIELD>, and
    DOSEWATCH_<FIELD>__<SUBFIELD> for nested models such as the dosage rule parameters."""
    prefix = cls.model_config.get("env_prefix") or ""
    nested = cls.model_config.get("env_nested_delimiter") or ""
    assert prefix == PREFIX
    names: set[str] = set()
    for name, info in cls.model_fields.items():
        names.add(f"{prefix}{name}".upper())
        sub = info.annotation
        if nested and isinstance(sub, type) and issubclass(sub, BaseModel):
            names |= {f"{prefix}{name}{nested}{inner}".upper() for inner in sub.model_fields}
    return names


def test_setting_names_cover_flat_and_nested_fields() -> None:
    names = setting_names(DosageSettings)
    assert {
        "DOSEWATCH_KAFKA_BOOTSTRAP",
        "DOSEWATCH_DATABASE_URL_FILE",
        "DOSEWATCH_GROUP_ID",
    } <= names
    assert "DOSEWATCH_DOSAGE__TARGET_S" in names
    assert "DOSEWATCH_DOSAGE__NOT_A_RULE" not in names
    assert "DOSEWATCH_MAX_BODY_BYTES" in setting_names(IngestSettings)
    assert "DOSEWATCH_MAX_BODY_BYTES" not in names


def build_settings(
    cls: type[CommonSettings], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> CommonSettings:
    """The settings a container with exactly this environment would get."""
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cls()


def test_cli_runs_each_service_by_name() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("dosewatch") == "dosewatch.cli:main"
    for name in SERVICES:
        assert _parser().parse_args([name]).command == name


def assert_group_or_api(name: str, s: CommonSettings) -> None:
    """Consumer-group members are named dosewatch-<service>; the API is in no group (every
    replica reads every partition) and serves its probes on its own port."""
    if isinstance(s, ApiSettings):
        assert (s.api_host, s.api_port) == (s.http_host, s.http_port), f"{name}: probe port"
    else:
        assert getattr(s, "group_id", None) == f"dosewatch-{name}"


# -- YAML helpers ------------------------------------------------------------------------------


def walk_pairs(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(key, scalar) for every scalar, with Kubernetes `{name: K, value: V}` read as K: V."""
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node:
            yield node["name"], node["value"]
        for k, v in node.items():
            yield from walk_pairs(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from walk_pairs(item, key)
    else:
        yield key, node


def assert_no_committed_secret(where: str, node: Any, allow_refs: bool) -> None:
    for key, value in walk_pairs(node):
        if not isinstance(value, str):
            continue
        ok = value == PLACEHOLDER or (allow_refs and REQUIRED_REF.match(value) is not None)
        names_a_secret = key.upper().endswith(("_FILE", "NAME"))  # a path or secretName
        if SECRET_KEY.search(key) and not names_a_secret:
            assert ok, f"{where}: {key} has a literal value; use a reference or {PLACEHOLDER}"
        for m in URL_PASSWORD.finditer(value):
            pw = m["password"]
            fine = pw == PLACEHOLDER or (allow_refs and REQUIRED_REF.match(pw) is not None)
            assert fine, f"{where}: {key} has a URL with a literal password"


def test_secret_scan_catches_literals() -> None:
    with pytest.raises(AssertionError):
        assert_no_committed_secret("x", {"POSTGRES_PASSWORD": "hunter2"}, allow_refs=True)
    with pytest.raises(AssertionError):
        assert_no_committed_secret("x", {"POSTGRES_PASSWORD": "${PW:-hunter2}"}, allow_refs=True)
    with pytest.raises(AssertionError):
        url = "postgresql://u:hunter2@db/x"
        assert_no_committed_secret("x", [{"name": "DOSEWATCH_DATABASE_URL", "value": url}], True)
    with pytest.raises(AssertionError):
        assert_no_committed_secret("x", {"POSTGRES_PASSWORD": "${PW:?set it}"}, allow_refs=False)
    assert_no_committed_secret("x", {"POSTGRES_PASSWORD": "${PW:?set it}"}, allow_refs=True)
    assert_no_committed_secret("x", {"KAFKA_SASL_PASSWORD_FILE": "/run/pw"}, allow_refs=False)
    assert_no_committed_secret("x", {"database-url": "postgresql://u:CHANGE-ME@db/x"}, False)


# -- Compose -----------------------------------------------------------------------------------


def interpolate(value: str) -> str:
    """What Compose would substitute: defaults as written, required variables as a stand-in."""

    def sub(m: re.Match[str]) -> str:
        op = m["op"] or ""
        if op.endswith("-"):
            return m["arg"]
        return "from-the-environment" if op.endswith("?") else ""

    return INTERPOLATION.sub(sub, value)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose_services_match_settings_and_commands(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    assert set(SERVICES) <= set(services)
    for name, cls in SERVICES.items():
        svc = services[name]
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
        assert svc["command"] == [name], f"{name} runs {svc['command']!r}"
        env = compose_env(svc)
        assert env, f"{name} has no environment"
        unknown = set(env) - setting_names(cls)
        assert not unknown, f"{name}: not settings of {cls.__name__}: {sorted(unknown)}"

        s = build_settings(cls, {k: interpolate(v) for k, v in env.items()}, monkeypatch)
        assert s.http_host == "0.0.0.0"
        assert s.http_port > 0
        assert_group_or_api(name, s)
        health = " ".join(svc["healthcheck"]["test"])
        m = re.search(r"https?://[^/\s:]+:(\d+)/readyz\b", health)
        assert m, f"{name}: healthcheck does not probe /readyz"
        assert int(m[1]) == s.http_port, f"{name}: healthcheck port is not DOSEWATCH_HTTP_PORT"
        replicas = int(svc.get("deploy", {}).get("replicas", 1))
        if name in STATEFUL:
            assert 1 <= replicas <= s.partitions, f"{name}: {replicas} replicas > partitions"
            assert "DOSEWATCH_DATABASE_URL" in env or "DOSEWATCH_DATABASE_URL_FILE" in env

        needs = {"kafka"} | ({"postgres"} if name in STATEFUL else set())
        depends = svc["depends_on"]
        for dep in needs:
            assert depends[dep]["condition"] == "service_healthy", f"{name} -> {dep}"
            assert "healthcheck" in services[dep], f"{dep} has no healthcheck to wait for"

    assert services["geofence"]["deploy"]["replicas"] == 2
    published = [str(p).rsplit(":", 1)[-1] for p in services["ingest"].get("ports", [])]
    assert compose_env(services["ingest"])["DOSEWATCH_HTTP_PORT"] in published


def test_compose_services_agree_on_topics_and_rules(compose: dict[str, Any]) -> None:
    envs = {name: compose_env(compose["services"][name]) for name in SERVICES}
    for key in ("KAFKA_BOOTSTRAP", "PARTITIONS", "REPLICATION_FACTOR", "TOPIC_PREFIX"):
        values = {env.get(PREFIX + key) for env in envs.values()}
        assert len(values) == 1, f"services disagree on {PREFIX}{key}: {values}"
    rule_keys = ("DOSEWATCH_DOSAGE", "DOSEWATCH_TZ", "DOSEWATCH_SHIFTS")
    rules = [{k: v for k, v in envs[n].items() if k.startswith(rule_keys)} for n in STATEFUL]
    assert rules[0] == rules[1], "geofence and dosage must share the rule parameters"


def test_compose_kafka_is_single_node_kraft_reachable_as_configured(
    compose: dict[str, Any],
) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = compose_env(kafka)
    assert not any("ZOOKEEPER" in k for k in env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    voters = dict(v.split("@", 1) for v in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))
    assert set(voters) == {node}
    protocols = dict(
        p.split(":", 1) for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listeners = dict(x.split("://", 1) for x in env["KAFKA_LISTENERS"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners
    assert voters[node].rsplit(":", 1)[1] == listeners[controller].rsplit(":", 1)[1]
    advertised = {
        address: listener
        for listener, address in (
            x.split("://", 1) for x in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        )
    }
    assert set(advertised.values()) <= set(listeners) <= set(protocols)
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"  # one broker
    for name in SERVICES:
        svc_env = compose_env(compose["services"][name])
        bootstrap = svc_env["DOSEWATCH_KAFKA_BOOTSTRAP"]
        assert bootstrap in advertised, f"{name}: {bootstrap} is not an advertised listener"
        wanted = svc_env.get("DOSEWATCH_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
        assert protocols[advertised[bootstrap]] == wanted


def test_compose_postgres_password_comes_from_the_environment(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert pg["image"] == "postgres:16" or pg["image"].startswith("postgres:16")
    env = compose_env(pg)
    ref = REQUIRED_REF.match(env["POSTGRES_PASSWORD"])
    assert ref is not None, "POSTGRES_PASSWORD must be ${VAR:?...} from the environment"
    url_form = re.compile(
        r"^postgresql://(?P<user>[^:@/]+):\$\{(?P<var>\w+)[^}]*\}@(?P<host>[^:/]+):(?P<port>\d+)"
        r"/(?P<db>[^?/]+)"
    )
    for name in STATEFUL:
        url = compose_env(compose["services"][name])["DOSEWATCH_DATABASE_URL"]
        m = url_form.match(url)
        assert m, f"{name}: DOSEWATCH_DATABASE_URL is not postgresql://USER:${{VAR}}@HOST:PORT/DB"
        assert m["var"] == ref["name"]
        assert m["user"] == env.get("POSTGRES_USER", "postgres")
        assert m["db"] == env.get("POSTGRES_DB", m["user"])
        assert m["host"] == "postgres"


def test_compose_commits_no_secret(compose: dict[str, Any]) -> None:
    assert_no_committed_secret(str(COMPOSE), compose, allow_refs=True)


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_installs_the_project_and_runs_dosewatch_unprivileged() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    text = "\n".join(ln for ln in lines if not ln.startswith("#"))
    stages = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert stages and stages[-1] == "python:3.11-slim"
    assert re.search(r"pip install \.(\s|$)", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.findall(r"^ENTRYPOINT\s+(.+)$", text, re.MULTILINE)[-1] == '["dosewatch"]'
    env = dict(re.findall(r"\b(DOSEWATCH_\w+)=(\S+)", text))
    assert set(env) <= setting_names(CommonSettings)
    assert env.get("DOSEWATCH_HTTP_HOST") == "0.0.0.0"
    assert re.findall(r"^EXPOSE\s+(\d+)", text, re.MULTILINE) == [env["DOSEWATCH_HTTP_PORT"]]
    assert not SECRET_KEY.search(" ".join(env)), "no secrets baked into the image"


def test_pip_install_ships_every_data_file_the_packages_read() -> None:
    """Without setuptools-scm or MANIFEST.in, only package-data globs reach a wheel."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_data: dict[str, list[str]] = setuptools.get("package-data", {})
    roots = [p.rstrip("*") for p in setuptools["packages"]["find"]["include"]]
    missing = []
    for root in roots:
        for path in sorted((ROOT / root).rglob("*")):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT)
            shipped = False
            for depth in range(1, len(rel.parts)):
                pkg_dir = ROOT.joinpath(*rel.parts[:depth])
                pkg = ".".join(rel.parts[:depth])
                for pattern in package_data.get(pkg, []) + package_data.get("*", []):
                    if str(path) in glob.glob(str(pkg_dir / pattern), recursive=True):
                        shipped = True
            if not shipped:
                missing.append(str(rel))
    assert not missing, f"not in any package-data glob: {missing}"


# -- Kubernetes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> list[tuple[Path, dict[str, Any]]]:
    assert not list(K8S.glob("*.yml")), "use .yaml"
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, path
                docs.append((path, doc))
    assert docs
    return docs


def of_kind(docs: list[tuple[Path, dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for _, doc in docs:
        if doc["kind"] == kind:
            name = doc["metadata"]["name"]
            assert name not in found, f"two {kind}s named {name}"
            found[name] = doc
    return found


def container_env(
    container: dict[str, Any], configmaps: Mapping[str, dict[str, Any]]
) -> dict[str, str]:
    """The container's variables: envFrom first, then env (which wins). valueFrom entries get
    a stand-in value."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "secrets are mounted as files, not envFrom"
        ref = source["configMapRef"]
        assert ref["name"] in configmaps or ref.get("optional"), f"no ConfigMap {ref['name']}"
        data = configmaps.get(ref["name"], {}).get("data", {})
        env.update({source.get("prefix", "") + k: str(v) for k, v in data.items()})
    for item in container.get("env", []):
        env[item["name"]] = str(item["value"]) if "value" in item else "from-the-cluster"
    return env


def probe_port(probe: dict[str, Any], container: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        named = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert port in named, f"no container port named {port}"
        port = named[port]
    return int(port)


def test_k8s_kustomization_applies_everything_but_the_secret(
    k8s: list[tuple[Path, dict[str, Any]]],
) -> None:
    (kust,) = [doc for _, doc in k8s if doc["kind"] == "Kustomization"]
    files = {p.name for p, _ in k8s} - {"kustomization.yaml"}
    secret_files = {p.name for p, doc in k8s if doc["kind"] == "Secret"}
    assert secret_files, "the Secret's shape is documented in a manifest"
    assert set(kust["resources"]) == files - secret_files
    (ns,) = of_kind(k8s, "Namespace")
    assert kust.get("namespace", ns) == ns
    for path, doc in k8s:
        if doc["kind"] not in ("Namespace", "Kustomization"):
            assert doc["metadata"].get("namespace") == ns, f"{path.name}: {doc['kind']}"


def test_k8s_configmap_and_secret_hold_settings_and_placeholders_only(
    k8s: list[tuple[Path, dict[str, Any]]],
) -> None:
    for name, cm in of_kind(k8s, "ConfigMap").items():
        keys = set(cm.get("data", {}))
        assert keys, f"ConfigMap {name} is empty"
        assert all(k.startswith(PREFIX) for k in keys), f"ConfigMap {name}: {sorted(keys)}"
        assert not keys & SECRET_SETTINGS, f"ConfigMap {name} holds a secret setting"
    for name, secret in of_kind(k8s, "Secret").items():
        assert "data" not in secret, f"Secret {name}: base64 data would hide a real value"
        assert secret["stringData"], f"Secret {name} documents no keys"
        for key, value in secret["stringData"].items():
            assert value == PLACEHOLDER, f"Secret {name}: {key} is not {PLACEHOLDER}"
    for path, doc in k8s:
        assert_no_committed_secret(path.name, doc, allow_refs=False)


def test_k8s_deployments_match_settings_commands_probes_and_partitions(
    k8s: list[tuple[Path, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    deployments = of_kind(k8s, "Deployment")
    configmaps = of_kind(k8s, "ConfigMap")
    secrets = of_kind(k8s, "Secret")
    assert set(deployments) == set(SERVICES)
    shared: dict[str, set[str]] = {}
    for name, cls in SERVICES.items():
        spec = deployments[name]["spec"]
        template = spec["template"]
        labels = template["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container.get("args") == [name], f"{name} runs {container.get('args')!r}"
        assert container.get("command") in (None, ["dosewatch"])

        env = container_env(container, configmaps)
        unknown = set(env) - setting_names(cls)
        assert not unknown, f"{name}: not settings of {cls.__name__}: {sorted(unknown)}"
        assert not set(env) & SECRET_SETTINGS, f"{name}: secrets go through *_FILE"
        for key in ("KAFKA_BOOTSTRAP", "PARTITIONS", "TOPIC_PREFIX", "HTTP_PORT"):
            shared.setdefault(key, set()).add(env.get(PREFIX + key, "(default)"))

        # Each *_FILE is a key of the Secret, mounted read-only where the variable points.
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        stand_ins = dict(env)
        for key, value in env.items():
            if not key.endswith("_FILE"):
                continue
            file = Path(value)
            mount = mounts.get(str(file.parent))
            assert mount is not None and mount.get("readOnly"), f"{name}: {key} is not mounted"
            volume = volumes[mount["name"]]["secret"]
            items = {i["path"]: i["key"] for i in volume.get("items", [])}
            secret_key = items.get(file.name, file.name if not items else None)
            assert secret_key is not None, f"{name}: {file.name} is not in the mounted items"
            assert secret_key in secrets[volume["secretName"]]["stringData"], (name, key)
            stand_in = tmp_path / f"{name}-{file.name}"
            stand_in.write_text("postgresql://u:p@db/x" if "DATABASE" in key else "pw")
            stand_ins[key] = str(stand_in)

        s = build_settings(cls, stand_ins, monkeypatch)
        assert s.http_host == "0.0.0.0"
        assert_group_or_api(name, s)
        if s.kafka_sasl_mechanism is not None:
            assert s.kafka_sasl_password is not None, f"{name}: SASL without a password file"
        if name in STATEFUL:
            assert "DOSEWATCH_DATABASE_URL_FILE" in env, f"{name} has no database"

        ports = [p["containerPort"] for p in container["ports"]]
        assert ports == [s.http_port], f"{name}: container ports {ports}"
        probes = {
            "readinessProbe": "/readyz",
            "livenessProbe": "/healthz",
            "startupProbe": "/healthz",
        }
        for probe, path in probes.items():
            if probe == "startupProbe" and probe not in container:
                continue
            assert container[probe]["httpGet"]["path"] == path, f"{name}: {probe}"
            assert probe_port(container[probe], container) == s.http_port, f"{name}: {probe}"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"

        replicas = int(spec.get("replicas", 1))
        assert replicas >= 1
        if name in STATEFUL:
            assert replicas <= s.partitions, f"{name}: {replicas} replicas > partitions"

    disagree = {k: v for k, v in shared.items() if len(v) > 1}
    assert not disagree, f"services disagree: {disagree}"


def test_k8s_ingest_service_reaches_the_intake_port(
    k8s: list[tuple[Path, dict[str, Any]]],
) -> None:
    deployments = of_kind(k8s, "Deployment")
    services = of_kind(k8s, "Service")
    assert "ingest" in services
    spec = services["ingest"]["spec"]
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selected = spec["selector"].items() <= labels.items()
        assert selected == (name == "ingest"), f"the ingest Service selects {name}"
    ingest = deployments["ingest"]["spec"]["template"]["spec"]["containers"][0]
    configmaps = of_kind(k8s, "ConfigMap")
    http_port = int(container_env(ingest, configmaps)["DOSEWATCH_HTTP_PORT"])
    for port in spec["ports"]:
        probe = {"httpGet": {"port": port.get("targetPort", port["port"])}}
        assert probe_port(probe, ingest) == http_port


def test_deploy_readme_covers_scaling_and_tls() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "DOSEWATCH_PARTITIONS",
        "DOSEWATCH_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        "DOSEWATCH_KAFKA_SASL_MECHANISM=SCRAM-SHA-512",
        "sslmode=verify-full",
    ):
        assert needle in text
    names = set(re.findall(r"\bDOSEWATCH_[A-Z0-9_]*[A-Z0-9]\b", text))
    every = set().union(*(setting_names(cls) for cls in SERVICES.values()))
    assert names <= every, f"README names unknown settings: {sorted(names - every)}"
    for pw in URL_PASSWORD.findall(text):
        assert pw in ("PASSWORD", PLACEHOLDER) or REQUIRED_REF.match(pw), "README: a password"


def test_env_names_in_every_yaml_are_prefixed_settings(
    compose: dict[str, Any], k8s: list[tuple[Path, dict[str, Any]]]
) -> None:
    """Belt and braces: any DOSEWATCH_ key anywhere in deploy/ is a known setting."""
    every = set().union(*(setting_names(cls) for cls in SERVICES.values()))
    docs: list[Any] = [compose, *(doc for _, doc in k8s)]
    for doc in docs:
        for key, _ in walk_pairs(doc):
            if key.startswith(PREFIX):
                assert key in every, key
