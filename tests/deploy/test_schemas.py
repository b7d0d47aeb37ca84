"""Every deploy file passes the schema of the program that reads it, with unknown fields as errors.

- deploy/ray-cluster.yaml: the `ray-schema.json` that the installed ray package ships (the one
  `ray up` validates against).
- deploy/kuberay/*.yaml and the Grafana provisioning files: the schemas vendored under
  tests/deploy/schemas/ (README.md there names their sources and what they leave out).
- deploy/prometheus/*: promtool (test_prometheus_config.py); the dashboard JSON: its PromQL and
  names (test_dashboards.py, test_manifests.py).

The planted-error tests are tests of these tests: a misspelt field put into any object of any
deploy file, or a value of the wrong type, must make validation fail.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
BASE = "https://gradleak.invalid/schemas/"


def ray_schema_path() -> Path:
    """ray/autoscaler/ray-schema.json of the installed ray, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    assert path.is_file(), path
    return path


def _registry() -> Registry:
    resources = []
    for f in sorted(SCHEMAS.glob("*.yaml")):
        contents = yaml.safe_load(f.read_text())
        assert contents["$id"] == BASE + f.name, f"{f.name}: $id must be {BASE + f.name}"
        resources.append((contents["$id"], Resource.from_contents(contents, default_specification=DRAFT202012)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def vendored(file: str, definition: str) -> Draft202012Validator:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": f"{BASE}{file}#/$defs/{definition}"}
    return Draft202012Validator(schema, registry=REGISTRY)


def ray_validator() -> Any:
    schema = json.loads(ray_schema_path().read_text())
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


KUBERAY = "kuberay-ray.io-v1.subset.yaml"
CORE = "kubernetes-core-v1.subset.yaml"
VALIDATORS = {
    "ray-cluster.yaml": ray_validator(),
    "kuberay/raycluster.yaml": vendored(KUBERAY, "RayCluster"),
    "kuberay/rayjob.yaml": vendored(KUBERAY, "RayJob"),
    "kuberay/podmonitor.yaml": vendored("prometheus-operator-podmonitor-v1.subset.yaml", "PodMonitor"),
    "kuberay/runs-pvc.yaml": vendored(CORE, "PersistentVolumeClaim"),
    "kuberay/runs-reader.yaml": vendored(CORE, "Pod"),
    "grafana/provisioning/datasources/prometheus.yml": vendored("grafana-provisioning.subset.yaml", "datasources"),
    "grafana/provisioning/dashboards/gradleak.yml": vendored("grafana-provisioning.subset.yaml", "dashboards"),
}
# Checked by the program that reads them instead of a schema (see the module docstring).
CHECKED_ELSEWHERE = {
    "prometheus/prometheus.yml", "prometheus/rules/gradleak.rules.yml",
    "prometheus/tests/gradleak.rules.test.yml",
}
# Objects the schemas leave open on purpose (a planted field there is not an error):
# provider-specific parts of the launcher config, and Kubernetes parts the manifests pass through.
OPEN = {
    # file_mounts maps remote to local paths; Ray's schema leaves it untyped.
    "ray-cluster.yaml": {("provider",), ("auth",), ("file_mounts",), ("available_node_types", "*", "node_config"),
                         ("available_node_types", "*", "node_config", "BlockDeviceMappings", "*"),
                         ("available_node_types", "*", "node_config", "BlockDeviceMappings", "*", "Ebs")},
    "grafana/provisioning/datasources/prometheus.yml": {("datasources", "*", "jsonData")},
}


def load(rel: str) -> Any:
    return yaml.safe_load((DEPLOY / rel).read_text())


def errors(rel: str, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATORS[rel].iter_errors(doc)]


def test_every_deploy_file_is_validated() -> None:
    files = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"}}
    assert files == VALIDATORS.keys() | CHECKED_ELSEWHERE, "a deploy file without a schema (or a stale entry)"


@pytest.mark.parametrize("rel", sorted(VALIDATORS))
def test_deploy_file_matches_its_schema(rel: str) -> None:
    assert errors(rel, load(rel)) == []


def objects(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every mapping in a document (list items as their index)."""
    if isinstance(node, dict):
        yield path
        for k, v in node.items():
            yield from objects(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from objects(v, (*path, i))


def get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def is_open(rel: str, path: tuple[Any, ...]) -> bool:
    def match(pattern: tuple[Any, ...]) -> bool:
        return len(pattern) == len(path) and all(p == "*" or p == k for p, k in zip(pattern, path, strict=True))
    return any(match(p) for p in OPEN.get(rel, set()))


@pytest.mark.parametrize("rel", sorted(VALIDATORS))
def test_planted_unknown_field_fails_in_every_object(rel: str) -> None:
    """Put a misspelt field into each mapping of the file in turn: validation must fail each time
    (except in the few objects the schemas leave open, listed in OPEN)."""
    doc = load(rel)
    paths = [p for p in objects(doc) if not is_open(rel, p)]
    assert len(paths) >= 2
    missed = []
    for path in paths:
        bad = copy.deepcopy(doc)
        get(bad, path)["gradleakPlantedField"] = {"planted": True}
        if not errors(rel, bad):
            missed.append("/".join(map(str, path)) or "<root>")
    assert not missed, f"{rel}: a planted unknown field passed validation at {missed}"


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    bad = copy.deepcopy(doc)
    get(bad, path[:-1])[path[-1]] = value
    return bad


def _gpu_index(spec: dict[str, Any]) -> int:
    return next(i for i, g in enumerate(spec["workerGroupSpecs"]) if g["groupName"] == "gpu-attacker")


def planted() -> list[tuple[str, str, Any]]:
    """Specific mistakes a user could make, each of which the schemas must catch."""
    launcher = load("ray-cluster.yaml")
    cluster = load("kuberay/raycluster.yaml")
    job = load("kuberay/rayjob.yaml")
    pm = load("kuberay/podmonitor.yaml")
    gpu = _gpu_index(cluster["spec"])
    gpu_docker = ("available_node_types", "ray.worker.gpu", "docker")
    group = ("spec", "workerGroupSpecs", gpu)
    container = (*group, "template", "spec", "containers", 0)
    bad_docker = copy.deepcopy(launcher)
    get(bad_docker, gpu_docker)["worker_run_option"] = get(bad_docker, gpu_docker).pop("worker_run_options")
    bad_group = copy.deepcopy(cluster)
    get(bad_group, group)["rayStartParam"] = get(bad_group, group).pop("rayStartParams")
    return [
        ("ray-cluster.yaml", "misspelt worker_run_options", bad_docker),
        ("ray-cluster.yaml", "resources as a string", _set(launcher, ("available_node_types", "ray.worker.gpu",
                                                                         "resources", "GPU"), "1")),
        ("ray-cluster.yaml", "unknown top-level key", _set(launcher, ("docker_image",), "x")),
        ("kuberay/raycluster.yaml", "misspelt rayStartParams", bad_group),
        ("kuberay/raycluster.yaml", "number in rayStartParams", _set(cluster, (*group, "rayStartParams",
                                                                               "num-gpus"), 1)),
        ("kuberay/raycluster.yaml", "replicas as a string", _set(cluster, (*group, "replicas"), "1")),
        ("kuberay/raycluster.yaml", "bad quantity", _set(cluster, (*container, "resources", "limits", "memory"),
                                                         "16 GB")),
        ("kuberay/raycluster.yaml", "port name too long", _set(cluster, (*container, "ports", 0, "name"),
                                                               "ray-metrics-export")),
        ("kuberay/rayjob.yaml", "unknown submission mode", _set(job, ("spec", "submissionMode"), "JobMode")),
        ("kuberay/rayjob.yaml", "misspelt ttl", _set(job, ("spec", "ttlSecondsAfterFinish"), 600)),
        ("kuberay/podmonitor.yaml", "bad interval", _set(pm, ("spec", "podMetricsEndpoints", 0, "interval"), "15")),
        ("kuberay/podmonitor.yaml", "bad relabel action", _set(pm, ("spec", "podMetricsEndpoints", 0,
                                                                    "relabelings", 0, "action"), "rename")),
    ]


@pytest.mark.parametrize("rel, what, doc", planted(), ids=[f"{r}-{w}" for r, w, _ in planted()])
def test_planted_mistake_fails(rel: str, what: str, doc: Any) -> None:
    assert errors(rel, doc), f"{rel}: {what} passed validation"
