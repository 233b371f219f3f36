"""The Kubernetes and KServe manifests in ``deploy/``, checked offline against schemas.

- Deployment, Service, HorizontalPodAutoscaler and PodDisruptionBudget: kubernetes-validate's
  bundled schemas of one Kubernetes version, in strict mode (an unknown field fails).
- ServiceMonitor and InferenceService: the published CRDs of the prometheus-operator and of
  KServe (its *full* CRD, whose predictor inlines every PodSpec field beside KServe's own), stored
  verbatim in ``tests/schemas/``. Their ``openAPIV3Schema`` refuses unknown fields here, as the API
  server's strict field validation (``kubectl apply``'s default) does; ``metadata``, which a CRD
  leaves open, is checked against Kubernetes' ObjectMeta, as the API server checks it.
- What ties the files together: selectors, port names, probe paths, the termination grace period,
  the autoscaling.

Every validator is also shown broken manifests, which it must reject for the intended reason.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
MONITORING = KUBE / "monitoring"
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SERVICEMONITOR_CRD = SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml"
INFERENCESERVICE_CRD = SCHEMAS / "serving.kserve.io_inferenceservices.yaml.gz"

# The Kubernetes version whose schemas kubernetes-validate checks against (the newest it bundles
# when this was written; a kubernetes-validate without it fails the tests, it does not skip them).
KUBERNETES_VERSION = "1.37"
CORE_FILES = ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]
NAME = "recmix"
PORT = 8000
# libyaml's loader where PyYAML has it: KServe's full CRD is about 2 MB of YAML
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- loading --------------------------------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _one(path: Path) -> dict[str, Any]:
    docs = _documents(path)
    assert len(docs) == 1, f"{path.name}: expected one document, found {len(docs)}"
    return docs[0]


@cache
def _crd(path: Path) -> dict[str, Any]:
    """A stored CRD (gzip-compressed where its name ends in .gz), loaded once per session."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        docs = [doc for doc in yaml.load_all(f, Loader=YAML_LOADER) if doc is not None]
    assert len(docs) == 1, f"{path.name}: expected one document, found {len(docs)}"
    return docs[0]


@cache
def _manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/, by kind (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _documents(path):
            assert doc["kind"] not in found, f"{doc['kind']} defined twice"
            found[doc["kind"]] = doc
    return found


def manifest(kind: str) -> dict[str, Any]:
    """A fresh copy, so that a test may break it."""
    return copy.deepcopy(_manifests()[kind])


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or -> valueFrom for a variable taken from elsewhere."""
    return {e["name"]: e["value"] if "value" in e else e["valueFrom"] for e in container["env"]}


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# --- validators -----------------------------------------------------------------------------------


def validate_core(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@cache
def _kubernetes_type_validator(filename: str) -> jsonschema.protocols.Validator:
    """A validator of one Kubernetes type (an ObjectMeta) rather than a whole object.

    kubernetes_validate.validate finds a schema from an object's apiVersion and kind, which an
    embedded type has not; this loads the same strict schema files as it does, the same way.
    """
    folder = f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict"
    schema = schema_contents(f"{folder}/{filename}", KUBERNETES_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", KUBERNETES_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_object_meta(doc: dict[str, Any]) -> None:
    """An object's metadata, which a CRD's schema leaves open (``type: object``)."""
    validator = _kubernetes_type_validator("objectmeta-meta-v1.json")
    for error in validator.iter_errors(doc["metadata"]):
        error.path.appendleft("metadata")  # where it is in the whole object, as other errors say
        raise error


def _refuse_unknown_fields(schema: Any) -> Any:
    """A CRD's structural schema with ``additionalProperties: false`` wherever it lists the
    properties of an object and neither allows others nor preserves unknown fields: the API
    server prunes such fields, and refuses them under strict field validation."""
    if isinstance(schema, list):
        return [_refuse_unknown_fields(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: _refuse_unknown_fields(value)
        for key, value in schema.items()
        if key not in ("properties", "default", "example", "enum")
    }
    for key in ("default", "example", "enum"):  # values, not schemas
        if key in schema:
            out[key] = schema[key]
    if "properties" in schema:
        # a map of property names to schemas, not a schema itself
        out["properties"] = {k: _refuse_unknown_fields(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


@cache
def _crd_validator(path: Path, version: str) -> jsonschema.protocols.Validator:
    """The stored CRD's schema of one version, strict; built once per session."""
    (served,) = [v for v in _crd(path)["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{path.name}: {version} is not served"
    schema = _refuse_unknown_fields(served["schema"]["openAPIV3Schema"])
    # OpenAPI 3.0 schema objects are JSON Schema draft 4 in substance (boolean exclusiveMinimum
    # and exclusiveMaximum included); unknown keywords (x-kubernetes-*) are ignored.
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def validate_servicemonitor(doc: dict[str, Any]) -> None:
    _crd_validator(SERVICEMONITOR_CRD, "v1").validate(doc)
    validate_object_meta(doc)


def validate_inferenceservice(doc: dict[str, Any]) -> None:
    _crd_validator(INFERENCESERVICE_CRD, "v1beta1").validate(doc)
    validate_object_meta(doc)


# --- the published schemas on disk ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "group", "kind"),
    [
        (SERVICEMONITOR_CRD, "monitoring.coreos.com", "ServiceMonitor"),
        (INFERENCESERVICE_CRD, "serving.kserve.io", "InferenceService"),
    ],
)
def test_stored_crds_are_valid_custom_resource_definitions(path: Path, group: str, kind: str):
    crd = _crd(path)
    validate_core(crd)
    assert crd["spec"]["group"] == group
    assert crd["spec"]["names"]["kind"] == kind


def _schema_records() -> dict[str, tuple[int, str]]:
    """file name -> (size, sha256) of the upstream bytes, from the table in the README."""
    records = {}
    for line in (SCHEMAS / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            size = re.match(r"([0-9,]+) bytes", cells[3])
            assert size, f"README.md: no size in bytes in {line!r}"
            records[cells[0].strip("`")] = (int(size[1].replace(",", "")), cells[4].strip("`"))
    return records


def test_stored_schemas_are_the_upstream_files_the_readme_records():
    """Each file is the upstream one, byte for byte (the .gz decompressed), as recorded."""
    stored = sorted(p.name for p in SCHEMAS.iterdir() if p.name != "README.md")
    records = _schema_records()
    assert sorted(records) == stored
    for name in stored:
        data = (SCHEMAS / name).read_bytes()
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        assert (len(data), hashlib.sha256(data).hexdigest()) == records[name], name


# --- schema validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("filename", CORE_FILES)
def test_core_manifests_validate_strictly(filename: str):
    for doc in _documents(KUBE / filename):
        validate_core(doc)


def test_servicemonitor_matches_its_crd():
    validate_servicemonitor(manifest("ServiceMonitor"))


def test_inferenceservice_matches_its_crd():
    validate_inferenceservice(manifest("InferenceService"))


REMOVED = object()  # in BROKEN: the field is deleted


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    """Breaks a manifest: sets (or with REMOVED deletes) the value at a dotted path; numbers
    index lists."""
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key: Any = int(last) if isinstance(node, list) else last
    if value is REMOVED:
        del node[key]
    else:
        node[key] = value


# kind, the dotted path that is set or removed, the value, its validator, and the schema keyword
# that must reject it: "additionalProperties" (an unknown field) and "required" (a missing one)
# are reported at the parent object and name the field, the others at the path itself.
BROKEN: list[tuple[str, str, Any, Callable[[dict[str, Any]], None], str]] = [
    ("Deployment", "spec.replicas", "2", validate_core, "type"),
    (
        "Deployment",
        "spec.template.spec.containers.0.readinessProbe.httpGet.paht",
        "/readyz",
        validate_core,
        "additionalProperties",
    ),
    (
        "Deployment",
        "spec.template.spec.terminationGracePeriod",
        40,
        validate_core,
        "additionalProperties",
    ),
    ("Service", "spec.ports.0.port", "8000", validate_core, "type"),
    ("HorizontalPodAutoscaler", "spec.minReplicas", 2.5, validate_core, "type"),
    ("PodDisruptionBudget", "spec.minAvailabe", 1, validate_core, "additionalProperties"),
    (
        "ServiceMonitor",
        "spec.endpoints.0.interval",
        "15 seconds",
        validate_servicemonitor,
        "pattern",
    ),
    (
        "ServiceMonitor",
        "spec.endpoints.0.portName",
        "http",
        validate_servicemonitor,
        "additionalProperties",
    ),
    ("ServiceMonitor", "spec.selector", ["recmix"], validate_servicemonitor, "type"),
    ("ServiceMonitor", "spec.endpoints", REMOVED, validate_servicemonitor, "required"),
    ("ServiceMonitor", "metadata.label", {}, validate_servicemonitor, "additionalProperties"),
    ("InferenceService", "spec", "recmix", validate_inferenceservice, "type"),
    ("InferenceService", "specs", {}, validate_inferenceservice, "additionalProperties"),
    ("InferenceService", "spec.predictor", REMOVED, validate_inferenceservice, "required"),
    ("InferenceService", "spec.predictor.minReplicas", "2", validate_inferenceservice, "type"),
    ("InferenceService", "spec.predictor.scaleMetric", "gpu", validate_inferenceservice, "enum"),
    # Not a field of the predictor: a custom predictor names its protocol in the PROTOCOL env.
    (
        "InferenceService",
        "spec.predictor.protocolVersion",
        "v2",
        validate_inferenceservice,
        "additionalProperties",
    ),
    # the pod spec that the predictor inlines
    (
        "InferenceService",
        "spec.predictor.terminationGracePeriod",
        40,
        validate_inferenceservice,
        "additionalProperties",
    ),
    (
        "InferenceService",
        "spec.predictor.containers.0.ports.0.containerPort",
        "8000",
        validate_inferenceservice,
        "type",
    ),
    (
        "InferenceService",
        "spec.predictor.containers.0.readinessProbe.httpGet.paht",
        "/v2/health/ready",
        validate_inferenceservice,
        "additionalProperties",
    ),
    (
        "InferenceService",
        "spec.predictor.containers.0.name",
        REMOVED,
        validate_inferenceservice,
        "required",
    ),
    (
        "InferenceService",
        "spec.predictor.containers.0.securityContext.capabilities.drop",
        "ALL",
        validate_inferenceservice,
        "type",
    ),
    (
        "InferenceService",
        "spec.predictor.volumes.0.emptyDir.sizeLimit",
        "128 MB",
        validate_inferenceservice,
        "pattern",
    ),
    (
        "InferenceService",
        "metadata.annotation",
        {},
        validate_inferenceservice,
        "additionalProperties",
    ),
]


@pytest.mark.parametrize(
    ("kind", "path", "value", "validator", "keyword"),
    BROKEN,
    ids=[f"{kind}-{path}" for kind, path, *_ in BROKEN],
)
def test_validators_reject_broken_manifests(kind: str, path: str, value: Any, validator, keyword):
    doc = manifest(kind)
    validator(doc)  # whole, it passes
    _set(doc, path, value)
    with pytest.raises(jsonschema.ValidationError) as caught:
        validator(doc)
    error = caught.value
    where = ".".join(str(part) for part in error.absolute_path)
    assert error.validator == keyword, f"{where}: {error.message}"
    if keyword in ("additionalProperties", "required"):
        *parent, field = path.split(".")
        assert where == ".".join(parent), error.message
        assert repr(field) in error.message
    else:
        assert where == path, error.message


# --- kustomize ------------------------------------------------------------------------------------


def test_kustomization_lists_the_core_manifests_only():
    kustomization = _one(KUBE / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == CORE_FILES
    for name in kustomization["resources"]:
        assert (KUBE / name).is_file()
    # Clusters without the Prometheus Operator lack the ServiceMonitor CRD: it is applied apart.
    core_kinds = {doc["kind"] for name in CORE_FILES for doc in _documents(KUBE / name)}
    assert core_kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    monitoring = _one(MONITORING / "kustomization.yaml")
    assert monitoring["resources"] == ["servicemonitor.yaml"]
    assert _one(MONITORING / "servicemonitor.yaml")["kind"] == "ServiceMonitor"


# --- what ties the files together -----------------------------------------------------------------


def test_service_selects_the_deployments_pods_on_the_named_port():
    deployment, service = manifest("Deployment"), manifest("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/name"] == NAME
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port == {"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}
    container = _container(deployment["spec"]["template"]["spec"], NAME)
    (container_port,) = container["ports"]
    assert container_port["name"] == "http"
    assert container_port["containerPort"] == PORT


def test_deployment_probes_resources_and_rollout():
    deployment = manifest("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = _container(pod, NAME)
    assert container["image"] == "recmix:cpu"
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"] == {"path": "/readyz", "port": "http"}
    assert (ready["periodSeconds"], ready["failureThreshold"]) == (5, 2)
    assert live["httpGet"] == {"path": "/healthz", "port": "http"}
    assert (live["periodSeconds"], live["failureThreshold"]) == (10, 3)
    # liveness must never ask /readyz: a loading or draining pod would be restarted
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "512Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": "/metrics",
    }


def _assert_hardened(pod: dict[str, Any], container: dict[str, Any]) -> None:
    for context in (pod["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == context["runAsGroup"] == 10001  # the image's USER
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    # the read-only root needs a writable /tmp
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def _assert_graceful(pod: dict[str, Any], container: dict[str, Any]) -> None:
    env = _env(container)
    assert env["RECMIX_WORKERS"] == "1"
    drain, graceful = float(env["RECMIX_DRAIN_SECONDS"]), float(env["RECMIX_GRACEFUL_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain + graceful
    assert env["RECMIX_API_KEY"] == {
        "secretKeyRef": {"name": "recmix-api-key", "key": "api-key", "optional": True}
    }


def test_deployment_is_hardened_and_drains_gracefully():
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    container = _container(pod, NAME)
    _assert_hardened(pod, container)
    _assert_graceful(pod, container)
    assert pod["terminationGracePeriodSeconds"] == 40


def test_hpa_and_pdb_target_the_deployment():
    deployment, hpa, pdb = (
        manifest("Deployment"),
        manifest("HorizontalPodAutoscaler"),
        manifest("PodDisruptionBudget"),
    )
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    assert spec["minReplicas"] <= deployment["spec"]["replicas"] <= spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    # the PDB selects exactly the Deployment's pods, and leaves one of them evictable
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] == 1 < spec["minReplicas"]


def test_servicemonitor_selects_the_service_and_its_port():
    service, monitor = manifest("Service"), manifest("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"


def test_inferenceservice_runs_the_image_as_a_v2_custom_predictor():
    isvc = manifest("InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    # KServe's HPA scales like the plain one: as many pods, on the same CPU utilisation
    hpa = manifest("HorizontalPodAutoscaler")["spec"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (
        hpa["minReplicas"],
        hpa["maxReplicas"],
    )
    (metric,) = hpa["metrics"]
    assert predictor["scaleMetric"] == metric["resource"]["name"] == "cpu"
    assert predictor["scaleTarget"] == metric["resource"]["target"]["averageUtilization"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    deployment_pod = manifest("Deployment")["spec"]["template"]["spec"]
    assert container["image"] == _container(deployment_pod, NAME)["image"]
    (port,) = container["ports"]
    assert port == {"containerPort": PORT, "protocol": "TCP"}
    assert _env(container)["PROTOCOL"] == "v2"
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"] == {"path": "/v2/health/ready", "port": PORT}
    assert live["httpGet"] == {"path": "/v2/health/live", "port": PORT}
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_inferenceservice_matches_the_deployment_in_resources_and_security():
    deployment_pod = manifest("Deployment")["spec"]["template"]["spec"]
    deployment_container = _container(deployment_pod, NAME)
    predictor = manifest("InferenceService")["spec"]["predictor"]
    container = _container(predictor, "kserve-container")
    _assert_hardened(predictor, container)
    _assert_graceful(predictor, container)
    assert container["resources"] == deployment_container["resources"]
    assert container["securityContext"] == deployment_container["securityContext"]
    assert predictor["securityContext"] == deployment_pod["securityContext"]
    assert (
        predictor["terminationGracePeriodSeconds"]
        == deployment_pod["terminationGracePeriodSeconds"]
    )


def test_inferenceservice_pods_stay_out_of_the_plain_service():
    """Both in one namespace: the recmix Service must not send traffic to KServe's pods."""
    selector = manifest("Service")["spec"]["selector"]
    isvc = manifest("InferenceService")
    labels = {
        **isvc["metadata"].get("labels", {}),
        **isvc["spec"]["predictor"].get("labels", {}),
    }
    assert not selector.items() <= labels.items()


def test_manifests_name_no_latest_tag_and_no_host_paths():
    for kind, doc in _manifests().items():
        for node in _walk(doc):
            if isinstance(node, dict):
                assert "hostPath" not in node, kind
                image = node.get("image")
                assert not (isinstance(image, str) and image.endswith(":latest")), kind
