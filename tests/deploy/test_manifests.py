"""deploy/: the Ray cluster launcher config, the KubeRay manifests, the Dockerfile and the metric
names in rules and dashboards hold together (nothing here needs Docker, AWS or Kubernetes)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from gradleak.cli import build_parser, config_from_args
from gradleak.flags import FLAGS
from gradleak.runtime.telemetry import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEPENDENCIES = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# -- every YAML parses --------------------------------------------------------------------

YAMLS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def test_deploy_has_the_expected_yaml() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAMLS}
    assert {"ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/podmonitor.yaml",
            "prometheus/prometheus.yml", "prometheus/rules/gradleak.rules.yml",
            "grafana/provisioning/datasources/prometheus.yml",
            "grafana/provisioning/dashboards/gradleak.yml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) and d for d in docs)


# -- KubeRay ------------------------------------------------------------------------------

def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return list(group["template"]["spec"]["containers"])


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def gpu_limit(group: dict[str, Any]) -> int:
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers(group))


def custom_resources(group: dict[str, Any]) -> dict[str, float]:
    """KubeRay passes rayStartParams.resources verbatim to `ray start --resources`: a JSON
    object inside a quoted string, e.g. '"{\\"attacker\\": 1}"'."""
    raw = group["rayStartParams"].get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources not in KubeRay's quoted form: {raw!r}"
    return dict(json.loads(json.loads(raw)))


CLUSTER = load(KUBERAY / "raycluster.yaml")
JOB = load(KUBERAY / "rayjob.yaml")


@pytest.mark.parametrize("doc, kind", [(CLUSTER, "RayCluster"), (JOB, "RayJob")], ids=["cluster", "job"])
def test_kuberay_objects(doc: dict[str, Any], kind: str) -> None:
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    all_groups = groups(spec)
    assert len(all_groups) >= 3, "head + CPU worker group + GPU worker group"
    for name, group in all_groups:
        # rayStartParams is map[string]string in the CRD: numbers would be rejected.
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), name
        for c in containers(group):
            assert c["image"] and ":" in c["image"] and not c["image"].endswith(":latest"), name
            assert c["resources"]["limits"] and c["resources"]["requests"], name
            ports = [p["name"] for p in c.get("ports", [])]
            assert len(ports) == len(set(ports)) and all(len(p) <= 15 for p in ports), name
            assert {"metrics", "gradleak"} <= set(ports), f"{name}: Ray metrics / gradleak ports"
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    gpu = [name for name, g in all_groups if gpu_limit(g) > 0]
    attacker = [name for name, g in all_groups if custom_resources(g).get("attacker")]
    assert len(gpu) == 1 and attacker == gpu, "exactly one GPU group, and it alone has `attacker`"
    cpu_workers = [name for name, g in all_groups if name != "head" and gpu_limit(g) == 0]
    assert cpu_workers, "a CPU worker group for the honest peers"
    images = {c["image"] for _, g in all_groups for c in containers(g)}
    assert len(images) == 1, f"head and workers must run one image: {images}"
    assert spec["rayVersion"] == dockerfile_ray_version()


def test_rayjob_runs_the_cluster_of_raycluster_yaml() -> None:
    assert JOB["spec"]["rayClusterSpec"] == CLUSTER["spec"]
    assert JOB["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_entrypoint_is_a_valid_gradleak_run() -> None:
    """The entrypoint goes through the real CLI parser and config validation."""
    argv = shlex.split(JOB["spec"]["entrypoint"])
    assert argv[:2] == ["gradleak", "run"]
    unknown = [a for a in argv if a.startswith("--") and a not in FLAGS and a != "--config"]
    assert not unknown, f"flags gradleak run does not have: {unknown}"
    cfg = config_from_args(build_parser().parse_args(argv[1:]))  # raises ConfigError if invalid
    assert cfg.ray_address == "auto" and cfg.attack.num_gpus >= 1
    # Actors spread over pods: each must bind its own pod's IP, and the attacker goes to the GPU group.
    assert cfg.telemetry.host == "auto", "--host must be auto on a cluster, not the 127.0.0.1 default"
    assert cfg.attack.resource == "attacker"
    head = containers(CLUSTER["spec"]["headGroupSpec"])[0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert cfg.telemetry.metrics_port == ports["gradleak"], "evaluator exporter = the pod's gradleak port"
    mounts = [m["mountPath"] for m in head.get("volumeMounts", [])]
    assert any(cfg.out_dir.startswith(m) for m in mounts), "run records go to a mounted volume"


def test_podmonitor_scrapes_ports_the_pods_have() -> None:
    pm = load(KUBERAY / "podmonitor.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    ports = {p["name"] for _, g in groups(CLUSTER["spec"]) for c in containers(g) for p in c["ports"]}
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == {"metrics", "gradleak"} <= ports
    selector = pm["spec"]["selector"]["matchLabels"]
    for name, g in groups(CLUSTER["spec"]):
        labels = g["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"PodMonitor does not select the {name} pods"
    # The alert on dead exporters watches job="gradleak" (file_sd): pods without the evaluator
    # answer up == 0 on 9480, so this scrape must not use that job name.
    jobs = {r.get("replacement") for e in endpoints for r in e.get("relabelings", [])
            if r.get("targetLabel") == "job"}
    assert "gradleak" not in jobs


# -- Ray cluster launcher -----------------------------------------------------------------

LAUNCHER = load(DEPLOY / "ray-cluster.yaml")


def test_cluster_launcher_node_types() -> None:
    types = LAUNCHER["available_node_types"]
    assert LAUNCHER["head_node_type"] in types
    assert LAUNCHER["provider"]["type"] and LAUNCHER["cluster_name"]
    workers = {n: t for n, t in types.items() if n != LAUNCHER["head_node_type"]}
    assert isinstance(LAUNCHER["max_workers"], int)
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= LAUNCHER["max_workers"]
    for name, t in types.items():
        assert t["resources"].get("CPU", 0) > 0 and t["node_config"], name
        assert t.get("min_workers", 0) <= t.get("max_workers", LAUNCHER["max_workers"]), name
    gpu = {n for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    attacker = {n for n, t in types.items() if t["resources"].get("attacker", 0) > 0}
    assert len(gpu) == 1 and attacker == gpu, "the attacker resource is on the GPU type only"
    assert gpu.isdisjoint({LAUNCHER["head_node_type"]})
    assert any(t["resources"].get("GPU", 0) == 0 for t in workers.values()), "a CPU worker type"


def test_cluster_launcher_runs_the_image_with_metrics_export() -> None:
    image = LAUNCHER["docker"]["image"]
    kuberay_image = containers(CLUSTER["spec"]["headGroupSpec"])[0]["image"]
    assert image == kuberay_image and not image.endswith(":latest")
    head = " ".join(LAUNCHER["head_start_ray_commands"])
    worker = " ".join(LAUNCHER["worker_start_ray_commands"])
    assert "ray start --head" in head and "--address=$RAY_HEAD_IP:6379" in worker
    assert "--dashboard-host=0.0.0.0" in head, "ray job submit needs the job server reachable"
    for cmds in (head, worker):
        assert "--metrics-export-port=8080" in cmds


# -- Dockerfile ---------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_ray_version() -> str:
    base = dockerfile_instructions()[0][1]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(-\w+)?", base)
    assert match, f"base image must be a pinned rayproject/ray:X.Y.Z-pyNN tag, got {base!r}"
    return match.group(1)


def dockerfile_args() -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in
            (a.partition("=") for i, a in dockerfile_instructions() if i == "ARG")}


def test_dockerfile_base_image_is_pinned_and_fits_the_project() -> None:
    ins = dockerfile_instructions()
    assert ins[0][0] == "FROM", "FROM must come first"
    assert "latest" not in ins[0][1]
    ray = dockerfile_ray_version()
    assert Version(ray) in DEPENDENCIES["ray"].specifier
    py = re.search(r"-py(\d)(\d+)", ins[0][1])
    assert py and f"{py.group(1)}.{py.group(2)}" in _python_spec()
    assert not any(i in {"ENTRYPOINT", "CMD"} for i, _ in ins), "Ray images need `ray start` to run"


def _python_spec() -> Any:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_dockerfile_torch_pins_are_the_project_caps() -> None:
    args = dockerfile_args()
    for name, arg in (("torch", "TORCH_SPEC"), ("torchvision", "TORCHVISION_SPEC")):
        pin = Requirement(args[arg])
        assert pin.name == name and str(pin.specifier).startswith("==")
        version = Version(str(pin.specifier)[2:])
        assert version in DEPENDENCIES[name].specifier, f"{pin} outside pyproject's {DEPENDENCIES[name]}"
        caps = [Version(s.version) for s in DEPENDENCIES[name].specifier if s.operator in {"<=", "=="}]
        assert caps == [version], f"{name}: pin {version}, pyproject caps {caps}"


def test_dockerfile_installs_dependencies_before_copying_source() -> None:
    ins = dockerfile_instructions()
    copies = [(n, a.split()) for n, (i, a) in enumerate(ins) if i == "COPY"]
    runs = [(n, a) for n, (i, a) in enumerate(ins) if i == "RUN"]
    where: dict[str, int] = {}  # each source -> the first COPY of it
    for n, words in copies:
        for src in words[:-1]:
            if not src.startswith("--"):
                where.setdefault(src.rstrip("/"), n)
    assert {"pyproject.toml", "gradleak", "p2p", "attacker", "protos", "scripts"} <= where.keys()
    for src in where:
        assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
    deps_run = next(n for n, a in runs if "pip install" in a)
    assert where["pyproject.toml"] < deps_run, "pyproject.toml must be copied before the deps install"
    for pkg in ("gradleak", "p2p", "attacker", "protos", "scripts"):
        assert where[pkg] > deps_run, f"{pkg}/ copied before the dependency layer: every edit re-installs torch"
    final = [a for n, a in runs if n > max(where.values()) and "pip install" in a]
    assert final and re.search(r"pip install --no-cache-dir \.(\s|$)", final[0]), "the project itself"
    for arg in ("${TORCH_SPEC}", "${TORCHVISION_SPEC}"):
        assert arg in ins[deps_run][1] + final[0]


def test_dependency_layer_lists_every_pyproject_dependency() -> None:
    """Run deploy/pyproject_deps.py as the Dockerfile does and check what it would install."""
    args = dockerfile_args()
    out = subprocess.run(
        [sys.executable, str(DEPLOY / "pyproject_deps.py"), str(ROOT / "pyproject.toml"),
         args["TORCH_SPEC"], args["TORCHVISION_SPEC"]],
        capture_output=True, text=True, check=True, timeout=30).stdout.split()
    reqs = {Requirement(r).name: Requirement(r) for r in out}
    assert len(reqs) == len(out) and reqs.keys() == DEPENDENCIES.keys()
    assert str(reqs["torch"]) == args["TORCH_SPEC"] and str(reqs["torchvision"]) == args["TORCHVISION_SPEC"]


def test_dockerignore_keeps_the_context_small_but_not_the_sources() -> None:
    patterns = [p.strip() for p in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for p in patterns:
            negate, pat = p.startswith("!"), p.lstrip("!").rstrip("/")
            pats = [pat, pat + "/*"] + ([pat[3:], pat[3:] + "/*"] if pat.startswith("**/") else [])
            if any(fnmatch.fnmatch(path, q) for q in pats):
                result = not negate
        return result

    for heavy in (".venv", ".git", "runs", "gradleak/__pycache__"):
        assert ignored(heavy), heavy
    copied = [src.rstrip("/") for i, a in dockerfile_instructions() if i == "COPY"
              for src in a.split()[:-1] if not src.startswith("--")]
    for src in copied:
        assert not ignored(src), f"{src} is COPYed but excluded from the build context"


# -- metric and label names in rules and dashboards ---------------------------------------

def known_series() -> tuple[set[str], set[str]]:
    """Series names the exporters can produce (from the registry), and every label name."""
    metrics = Metrics()
    names: set[str] = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    # Label names of the labelled metrics (not in the registry's output until first use),
    # plus what Prometheus and the run's file_sd list add.
    labels = {"job", "instance", "role", "le", "__name__"}
    for m in vars(metrics).values():
        labels.update(getattr(m, "_labelnames", ()))
    assert "gradleak_reconstructions_total" in names and "gradleak_attack_queue_depth" in names
    assert {"batch_size", "defence", "attack", "reason", "code"} <= labels
    return names, labels


RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def exprs() -> list[tuple[str, str]]:
    out = []
    for f in RULE_FILES:
        for group in load(f)["groups"]:
            out += [(f.name, r["expr"]) for r in group["rules"]]
    for f in DASHBOARDS:
        dash = json.loads(f.read_text())
        out += [(f.name, t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
        out += [(f.name, v["definition"]) for v in dash.get("templating", {}).get("list", [])
                if v.get("definition")]
    return out


def test_every_metric_name_exists_in_telemetry() -> None:
    names, _ = known_series()
    used = {(src, n) for src, e in exprs() for n in re.findall(r"gradleak_[a-z_]+", e)}
    assert len({n for _, n in used}) >= 15, "the regex found too few names: is it still matching?"
    unknown = sorted({(src, n) for src, n in used if n not in names})
    assert not unknown, f"metric names not in gradleak/telemetry.py: {unknown}"


def test_every_label_name_exists() -> None:
    _, labels = known_series()
    used = set()
    for src, e in exprs():
        used |= {(src, n) for n in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", e)}
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", e):
            used |= {(src, n.strip()) for n in group.split(",") if n.strip()}
        used |= {(src, n) for n in re.findall(r"label_values\([^,]+,\s*(\w+)\)", e)}
    unknown = sorted({(src, n) for src, n in used if n not in labels})
    assert not unknown, f"label names gradleak does not export: {unknown}"


def test_recording_rules_referenced_anywhere_are_defined() -> None:
    defined = {r["record"] for f in RULE_FILES for g in load(f)["groups"] for r in g["rules"] if "record" in r}
    texts = [f.read_text() for f in [*RULE_FILES, *DASHBOARDS, ROOT / "docs" / "deploy.md"]]
    texts.append((DEPLOY / "prometheus" / "tests" / "gradleak.rules.test.yml").read_text())
    used = {n for t in texts for n in re.findall(r"gradleak:[a-z0-9_]+:[a-z0-9_]+", t)}
    assert used - defined == set()
