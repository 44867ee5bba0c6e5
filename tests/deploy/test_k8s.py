"""deploy/k8s against the Kubernetes JSON schemas, plus the wiring between the objects.

Built-in kinds are validated against the strict (no unknown fields) v1.33 schemas that the `kubernetes-validate`
package ships, trimmed to the kinds used here (tests/deploy/data/k8s, see data/README.md). The ServiceMonitor (a
Prometheus Operator CRD) is validated against a hand-written subset schema (data/servicemonitor.schema.json) and
checked structurally; the Kustomization is checked against the files in the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
DATA = Path(__file__).parent / "data"
SCHEMAS = {
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscaler-autoscaling-v2.json",
}
ENTRYPOINT_SETTINGS = {"ENDOSTREAM_TRT_PRECISION", "ENDOSTREAM_TRT_WORKSPACE_GB"}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def _named(name: str) -> dict[str, Any]:
    return next(doc for _, doc in _documents() if doc.get("metadata", {}).get("name") == name)


def _by_kind() -> dict[str, dict[str, Any]]:
    """The endostream object of each kind (the settings ConfigMap, not the adapter's)."""
    docs = {doc["kind"]: doc for _, doc in _documents() if doc["kind"] != "ConfigMap"}
    return {**docs, "ConfigMap": _named("endostream-settings")}


@pytest.fixture(scope="module")
def registry() -> Registry:
    definitions = json.loads((DATA / "k8s" / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


def _ids() -> list[str]:
    return [f"{name}:{doc['kind']}" for name, doc in _documents()]


@pytest.mark.parametrize(("name", "doc"), _documents(), ids=_ids())
def test_manifest_matches_its_schema(name: str, doc: dict[str, Any], registry: Registry) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if doc["kind"] == "ServiceMonitor":
        schema = json.loads((DATA / "servicemonitor.schema.json").read_text())
    elif doc["kind"] == "Kustomization":
        listed = set(doc["resources"])
        assert listed == {p.name for p in K8S.glob("*.yaml")} - {name}, "kustomization lists every manifest"
        return
    else:
        assert key in SCHEMAS, f"{name}: no schema shipped for {key}"
        schema = json.loads((DATA / "k8s" / SCHEMAS[key]).read_text())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{name} {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_strict_schemas_catch_a_misspelt_field(registry: Registry) -> None:
    deployment = _by_kind()["Deployment"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    schema = json.loads((DATA / "k8s" / SCHEMAS[("apps/v1", "Deployment")]).read_text())
    assert list(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(broken))


def test_deployment_gpu_probes_and_security() -> None:
    deployment = _by_kind()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "room for a first TensorRT build"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/tmp" in mounts
    settings = _by_kind()["ConfigMap"]
    assert container["envFrom"][0]["configMapRef"]["name"] == settings["metadata"]["name"]
    assert mounts[settings["data"]["ENDOSTREAM_ENGINE_CACHE"]], "the engine cache is a volume"


def test_service_servicemonitor_and_hpa_point_at_the_deployment() -> None:
    kinds = _by_kind()
    deployment, service, monitor, hpa = (
        kinds[k] for k in ("Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler")
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "endostream_queue_depth"


def test_adapter_rule_serves_the_hpa_metric() -> None:
    rules = _named("endostream-adapter-rules")
    (rule,) = yaml.safe_load(rules["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == _by_kind()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith("endostream_queue_depth{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_configmap_holds_valid_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _by_kind()["ConfigMap"]["data"]
    fields = {f"ENDOSTREAM_{name.upper()}" for name in Settings.model_fields}
    assert set(data) - fields <= ENTRYPOINT_SETTINGS, sorted(set(data) - fields)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert str(settings.bundle).startswith("/models/")
