"""deploy/docker-compose*.yml against the Compose Specification schema, plus what a schema cannot see.

The schema is compose-spec/compose-spec `schema/compose-spec.json` (tests/deploy/data/compose-spec.json, see
data/README.md). Beyond it: the GPU reservation and hardening of the service, the CPU override merged the way
Compose merges it (`!reset` included), every bind-mounted folder of the repository existing, the provisioned Grafana
datasource being the one the dashboard names, and every `${VAR}` of the compose files and every ENDOSTREAM_* setting
in deploy/.env.example being known (the service's own settings are validated by its Settings class).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
# Read by the entrypoint or by Compose itself, not by the service's Settings.
NON_SETTINGS = {
    "ENDOSTREAM_BUNDLES_DIR",
    "ENDOSTREAM_BUNDLE_NAME",
    "ENDOSTREAM_CLIPS_DIR",
    "ENDOSTREAM_PUBLISH",
    "ENDOSTREAM_IMAGE",
    "ENDOSTREAM_TRT_PRECISION",
    "ENDOSTREAM_TRT_WORKSPACE_GB",
}
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset` (drop the inherited value) and `!override` (replace, not merge)."""


class Reset:
    pass


class Override:
    def __init__(self, value: Any) -> None:
        self.value = value


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def for_schema(value: Any) -> Any:
    """What Compose validates: `!reset` is null, `!override` is its value."""
    if isinstance(value, Reset):
        return None
    if isinstance(value, Override):
        return for_schema(value.value)
    if isinstance(value, dict):
        return {k: for_schema(v) for k, v in value.items()}
    if isinstance(value, list):
        return [for_schema(v) for v in value]
    return value


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, `!reset` drops, `!override` replaces."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value) if key in base else for_schema(value)
        return out
    if isinstance(base, list) and isinstance(override, list):
        return base + [v for v in override if v not in base]
    return override


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """`${VAR:-default}` etc. with the defaults (or `env`); `${VAR:?msg}` without a value becomes `<VAR>`."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or m.group(3) or f"<{m.group(1)}>", value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)  # its $schema names draft-07 without the trailing '#'
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(path: Path, validator: jsonschema.protocols.Validator) -> None:
    errors = sorted(validator.iter_errors(for_schema(load(path))), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_merged_cpu_project_matches_the_compose_spec(validator: jsonschema.protocols.Validator) -> None:
    merged = merge(load(COMPOSE), load(COMPOSE_CPU))
    assert not list(validator.iter_errors(merged))


def test_service_gets_a_gpu_and_a_hardened_container() -> None:
    service = interpolate(load(COMPOSE))["services"]["endostream"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert any(t.startswith("/tmp") for t in service["tmpfs"])
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert service["ports"] == ["127.0.0.1:8000:8000"], "published on the box only unless .env says otherwise"
    mounts = {m["target"]: m for m in service["volumes"]}
    assert mounts["/models"]["read_only"] is True and mounts["/models"]["type"] == "bind"
    cache = service["environment"]["ENDOSTREAM_ENGINE_CACHE"]
    assert mounts[cache]["type"] == "volume", "engines survive container rebuilds in a named volume"
    assert service["env_file"] == [{"path": ".env", "required": False}]
    assert service["environment"]["ENDOSTREAM_BUNDLE"].startswith("/models/")


def test_cpu_override_drops_the_gpu() -> None:
    project = interpolate(merge(load(COMPOSE), load(COMPOSE_CPU)))
    service = project["services"]["endostream"]
    assert "deploy" not in service
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert service["environment"]["ENDOSTREAM_BACKEND"] == "onnxruntime"
    assert service["environment"]["ENDOSTREAM_BUNDLE"].startswith("/models/"), "base settings are kept"
    assert project["services"]["dcgm-exporter"]["profiles"] == ["gpu-metrics"], "no dcgm-exporter by default"
    assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_profiles_for_the_demo_camera_and_the_capture_card() -> None:
    services = load(COMPOSE)["services"]
    assert services["rtsp-server"]["profiles"] == ["demo-rtsp"]
    assert "rtsp://localhost:8554/endoscope" in services["rtsp-server"]["environment"]["MTX_PATHS_ENDOSCOPE_RUNONINIT"]
    bridge = services["capture-bridge"]
    assert bridge["profiles"] == ["capture"] and interpolate(bridge["devices"]) == ["/dev/video0:/dev/video0"]
    default = {k for k, v in services.items() if not v.get("profiles")}
    assert default == {"endostream", "prometheus", "grafana", "dcgm-exporter"}


def test_mounted_repository_folders_exist() -> None:
    project = interpolate(load(COMPOSE))
    for name, service in project["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            created = isinstance(volume, dict) and volume.get("bind", {}).get("create_host_path")
            if source.startswith("./") and not created and "clips" not in source:
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()


def test_grafana_provisioning_matches_the_dashboard() -> None:
    project = interpolate(load(COMPOSE))
    grafana = project["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/endostream.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_dir] == "./grafana/dashboards"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/endostream.json"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/endostream.json").read_text())
    used = {json.dumps(p["datasource"]) for p in dashboard["panels"] if "datasource" in p}
    assert used == {json.dumps({"type": "prometheus", "uid": uid})}
    assert project["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_prometheus_scrapes_the_compose_service_name() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs["endostream"] == ["endostream:8000"]
    assert jobs["dcgm"] == ["dcgm-exporter:9400"]


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_env_example_documents_every_variable_the_compose_files_use() -> None:
    documented = set(_env_example())
    for path in (COMPOSE, COMPOSE_CPU):
        used = {m.group(1) for m in _VAR.finditer(path.read_text())}
        assert used <= documented, f"{path.name}: {sorted(used - documented)} missing from .env.example"


def test_env_example_settings_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env_example()
    fields = {f"ENDOSTREAM_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("ENDOSTREAM_")} - fields - NON_SETTINGS
    assert not unknown, f"not settings of the service: {sorted(unknown)}"
    for key, value in env.items():
        if key in fields:
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.stream_allowlist and settings.api_token is None


def test_the_schema_rejects_a_broken_file(validator: jsonschema.protocols.Validator) -> None:
    broken = for_schema(load(COMPOSE))
    broken["services"]["endostream"]["gpus_count"] = 1
    broken["services"]["endostream"]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities")
    assert len(list(validator.iter_errors(broken))) >= 1
