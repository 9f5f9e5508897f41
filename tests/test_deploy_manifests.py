"""The deployment files validate offline and fit together.

Kubernetes objects are validated with ``kubernetes-validate`` (the Kubernetes OpenAPI
schemas, strict: unknown fields are errors) against the oldest and newest versions we
support. The library has no schemas for custom resources, so the PodMonitor (Prometheus
Operator CRD) is checked against our own JSON Schema of the fields we use, written from the
operator's API reference: a structural check that catches misspelt or misplaced fields and
wrong types, not the full CRD.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "build" / "k8s"
CONTAINER = ROOT / "build" / "container"
VERSIONS = ("1.29", latest_version())  # 1.29: the oldest minor still in common support
NOT_OBJECTS = {"kustomization.yaml", "prometheus-adapter-rules.yaml"}
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in NOT_OBJECTS)

_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": _LABELS},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def objects() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind among the manifests."""
    out: dict[str, dict[str, Any]] = {}
    for name in MANIFESTS:
        for doc in load(name):
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    return out


def validate(doc: dict[str, Any], version: str) -> str:
    """Raises on an invalid object; returns the line kubernetes-validate's CLI would print."""
    if doc["kind"] == "PodMonitor":
        jsonschema.validate(doc, PODMONITOR_SCHEMA)
        return f"PodMonitor/{doc['metadata']['name']} passed the structural PodMonitor schema"
    got = kubernetes_validate.validate(doc, version, strict=True)
    return f"{doc['kind']}/{doc['metadata']['name']} passed against version {got} (strict)"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates(name: str, version: str) -> None:
    docs = load(name)
    assert docs, f"{name} holds no object"
    for doc in docs:
        print(f"INFO {name}: {validate(doc, version)}")


def _mutations() -> list[tuple[str, Any]]:
    """(what, function that breaks a copy of the objects) -> each must be refused."""

    def container(o: dict[str, Any]) -> dict[str, Any]:
        return dict(o["Deployment"]["spec"]["template"]["spec"]["containers"][0])

    def typo(o: dict[str, Any]) -> dict[str, Any]:
        c = container(o)
        c["containerPorts"] = c.pop("ports")
        o["Deployment"]["spec"]["template"]["spec"]["containers"] = [c]
        return o["Deployment"]

    def port_type(o: dict[str, Any]) -> dict[str, Any]:
        c = container(o)
        c["ports"] = [{"name": "http", "containerPort": "http"}]
        o["Deployment"]["spec"]["template"]["spec"]["containers"] = [c]
        return o["Deployment"]

    def probe_type(o: dict[str, Any]) -> dict[str, Any]:
        c = container(o)
        c["readinessProbe"] = dict(c["readinessProbe"], periodSeconds="ten")
        o["Deployment"]["spec"]["template"]["spec"]["containers"] = [c]
        return o["Deployment"]

    def hpa_target(o: dict[str, Any]) -> dict[str, Any]:
        o["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["target"]["type"] = 7
        return o["HorizontalPodAutoscaler"]

    def service_port(o: dict[str, Any]) -> dict[str, Any]:
        o["Service"]["spec"]["ports"][0]["port"] = "http"
        return o["Service"]

    def podmonitor_typo(o: dict[str, Any]) -> dict[str, Any]:
        spec = o["PodMonitor"]["spec"]
        spec["podMetricEndpoints"] = spec.pop("podMetricsEndpoints")
        return o["PodMonitor"]

    def podmonitor_interval(o: dict[str, Any]) -> dict[str, Any]:
        o["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
        return o["PodMonitor"]

    return [(f.__name__, f) for f in (typo, port_type, probe_type, hpa_target, service_port,
                                      podmonitor_typo, podmonitor_interval)]  # fmt: skip


@pytest.mark.parametrize(("what", "breaks"), _mutations())
def test_validation_refuses_a_broken_manifest(what: str, breaks: Any) -> None:
    """No vacuous pass: a typical mistake in each kind of object is refused."""
    import copy

    doc = breaks(copy.deepcopy(objects()))
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, VERSIONS[-1])


def test_manifests_fit_together() -> None:
    o = objects()
    dep, svc, pvc = o["Deployment"], o["Service"], o["PersistentVolumeClaim"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in c["ports"]}
    # Service and PodMonitor reach the pods' named ports
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == port_names == {"http", "grpc",
                                                                             "metrics"}  # fmt: skip
    pm = o["PodMonitor"]["spec"]
    assert pm["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in pm["podMetricsEndpoints"]} == {"metrics"}
    # HPA scales this Deployment on the metric the adapter rule publishes
    hpa = o["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": dep["metadata"]["name"]}  # fmt: skip
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    assert [r["name"]["as"] for r in rules] == [hpa["metrics"][0]["pods"]["metric"]["name"]]
    assert 'model="pets"' in rules[0]["seriesQuery"]
    # GPUs requested; the shared store is the RWX claim, mounted where the entry point reads it
    assert (
        c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
    )
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert vols["store"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    env = {e["name"]: e for e in c["env"]}
    assert mounts["store"] == env["PETS_TASK_STORE"]["value"]
    assert vols["shm"]["emptyDir"]["medium"] == "Memory" and mounts["shm"] == "/dev/shm"
    # secrets only from the Secret, with keys the example Secret defines
    secret = o["Secret"]
    for name in ("PETS_ADMIN_KEY", "PETS_ADMIN_TOKEN"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # every PETS_* variable is one the entry point reads or documents (PETS_ADMIN_TOKEN is
    # read by the pets_admin stub); the probes run the image's probe
    entry = (CONTAINER / "entrypoint.sh").read_text()
    for name in env:
        assert re.search(rf"\b{name}\b", entry), f"entrypoint.sh knows nothing of {name}"
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        cmd = probe["exec"]["command"]
        assert cmd[1] == "/opt/pets/build/container/probe.py" and (CONTAINER / "probe.py").is_file()
        assert cmd[cmd.index("--instances") + 1] in entry  # the file the entry point writes
        assert probe["timeoutSeconds"] < probe["periodSeconds"]
    # kustomize applies every object but the example Secret
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(set(MANIFESTS) - {"secret.example.yaml"})
    assert [i["name"] for i in kust["images"]] == [c["image"].split(":")[0]]


def test_dockerfile() -> None:
    text = (CONTAINER / "Dockerfile").read_text()
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3" in text
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", text, re.M), "the server stage is Triton 24.10"
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repo"
    (entry,) = re.findall(r'^ENTRYPOINT \["(.+)"\]$', text, re.M)
    assert (ROOT / Path(entry).relative_to("/opt/pets")).is_file()
    assert "COPY --from=ops /opt/pets/build/out/libpetops.so" in text
