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
from ray._private.utils import parse_resources_json

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


# -- the operator's reading of rayStartParams (KubeRay ray-operator/controllers/ray/common/pod.go) --
# Ported from the operator's Go code so the test reads the manifests as the operator does:
# getResourcesMap trims quotes and spaces from both ends of rayStartParams["resources"] and
# unmarshals the rest as a JSON object of numbers; on failure addWellKnownAcceleratorResources
# returns (the error is logged for every pod) before it derives num-gpus from a *gpu limit.
# convertParamMap then writes `--key=value` for each parameter (sorted; "true" as a bare flag,
# "false" left out) into the `ray start` line that the pod's bash runs.

KUBERAY_TRIM = "'\"` "


def kuberay_resources_map(params: dict[str, str]) -> dict[str, float]:
    """getResourcesMap: strings.Trim(value, "'\"` ") then json.Unmarshal into map[string]float64."""
    raw = params.get("resources")
    if raw is None:
        return {}

    def no_constants(name: str) -> None:
        raise ValueError(f"not JSON: {name}")  # Go's encoding/json has no NaN / Infinity

    value = json.loads(raw.strip(KUBERAY_TRIM), parse_constant=no_constants)
    if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
        raise ValueError(f"not a JSON object of numbers: {raw!r}")
    return {k: float(v) for k, v in value.items()}


def _is_gpu_key(key: str) -> bool:
    return key.endswith("gpu") or re.fullmatch(r".*nvidia\.com/mig-\d+g\.\d+gb", key) is not None


def kuberay_start_params(group: dict[str, Any]) -> dict[str, str]:
    """The rayStartParams after generateRayStartCommand's GPU step; raises where the operator errs."""
    params = dict(group.get("rayStartParams", {}))
    limits = containers(group)[0]["resources"].get("limits", {})
    if limits:
        kuberay_resources_map(params)  # the operator stops here on a parse error
        for key in sorted(limits):
            if "num-gpus" not in params and _is_gpu_key(key) and int(limits[key]) != 0:
                params["num-gpus"] = str(int(limits[key]))
    return params


def ray_start_argv(params: dict[str, str]) -> list[str]:
    """The arguments `ray start` receives: convertParamMap's flags, word-split by bash."""
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in {"true", "false"} and key not in {"log-color", "include-dashboard"}:
            flags += [f" --{key} "] if value.lower() == "true" else []
        else:
            flags.append(f" --{key}={value} ")
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + "".join(flags)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return [a for a in out.split("\0") if a]


def custom_resources(group: dict[str, Any]) -> dict[str, float]:
    """The group's custom Ray resources, as the operator parses them."""
    return kuberay_resources_map(group.get("rayStartParams", {}))


CLUSTER = load(KUBERAY / "raycluster.yaml")
JOB = load(KUBERAY / "rayjob.yaml")
PVC = load(KUBERAY / "runs-pvc.yaml")
READER = load(KUBERAY / "runs-reader.yaml")
IMAGE = "REGISTRY/gradleak:0.1.0"  # placeholder; -cpu and -gpu are the two variants of deploy/Dockerfile


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
    # The GPU group runs the gpu image, every other group the cpu image of the same build.
    for name, g in all_groups:
        for c in containers(g):
            variant = "gpu" if name in gpu else "cpu"
            assert c["image"] == f"{IMAGE}-{variant}", f"{name}: {c['image']} is not the {variant} image"
    assert spec["rayVersion"] == dockerfile_ray_version()


@pytest.mark.parametrize("doc, kind", [(CLUSTER, "RayCluster"), (JOB, "RayJob")], ids=["cluster", "job"])
def test_operator_reads_the_custom_resource_and_the_gpu(doc: dict[str, Any], kind: str) -> None:
    """The GPU group's rayStartParams as KubeRay's operator parses them, and what `ray start` gets."""
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    for name, group in groups(spec):
        params = kuberay_start_params(group)  # raises where the operator would log an error
        argv = ray_start_argv(params)
        resources = [a.split("=", 1)[1] for a in argv if a.startswith("--resources=")]
        ray_resources = parse_resources_json(resources[0], None, None) if resources else {}
        if gpu_limit(group):
            assert custom_resources(group) == {"attacker": 1.0}, name
            assert params["num-gpus"] == str(gpu_limit(group)), f"{name}: no num-gpus derived"
            assert f"--num-gpus={gpu_limit(group)}" in argv
            assert ray_resources == {"attacker": 1}, f"{name}: ray start --resources got {resources}"
        else:
            assert "num-gpus" not in params and "attacker" not in ray_resources, name


def test_kuberay_port_rejects_what_the_operator_rejects() -> None:
    """The port is faithful where it matters: the escaped double-quoted form that `ray start` alone
    accepts fails the operator's parser, so no num-gpus is derived; the single-quoted one works."""
    escaped = {"resources": '"{\\"attacker\\": 1}"'}
    assert parse_resources_json(ray_start_argv(escaped)[0].split("=", 1)[1], None, None) == {"attacker": 1}
    with pytest.raises(ValueError):
        kuberay_resources_map(escaped)
    with pytest.raises(ValueError):
        kuberay_start_params({"rayStartParams": escaped, "template": {"spec": {"containers": [
            {"resources": {"limits": {"nvidia.com/gpu": 1}}}]}}})
    assert kuberay_resources_map({"resources": "'{\"attacker\": 1}'"}) == {"attacker": 1.0}
    assert kuberay_resources_map({"resources": '{"attacker": 1, "x": 0.5}'}) == {"attacker": 1.0, "x": 0.5}
    with pytest.raises(ValueError):
        kuberay_resources_map({"resources": "'{\"attacker\": \"1\"}'"})  # map[string]float64


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
    # The GPU is a fact: without --device the attacker starts on cuda, or the run fails at start.
    assert cfg.attack.effective_device == "cuda", "--device auto would let a missing GPU pass silently"
    # Every batch size of the grid is attacked (none skipped as batch_too_large).
    assert max(cfg.peers.batch_sizes) <= cfg.attack.max_batch_size and not cfg.attack.allow_unattacked
    # Actors spread over pods: each must bind its own pod's IP, and the attacker goes to the GPU group.
    assert cfg.telemetry.host == "auto", "--host must be auto on a cluster, not the 127.0.0.1 default"
    assert cfg.attack.resource == "attacker"
    head = containers(CLUSTER["spec"]["headGroupSpec"])[0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert cfg.telemetry.metrics_port == ports["gradleak"], "evaluator exporter = the pod's gradleak port"
    mounts = [m["mountPath"] for m in head.get("volumeMounts", [])]
    assert any(cfg.out_dir.startswith(m) for m in mounts), "run records go to a mounted volume"


def runs_mounts(group: dict[str, Any]) -> list[str]:
    """Where the Ray container of a group mounts the run-records claim."""
    pod = group["template"]["spec"]
    claims = {v["name"] for v in pod.get("volumes", [])
              if v.get("persistentVolumeClaim", {}).get("claimName") == PVC["metadata"]["name"]}
    return [m["mountPath"] for m in containers(group)[0].get("volumeMounts", [])
            if m["name"] in claims and not m.get("readOnly")]


@pytest.mark.parametrize("doc, kind", [(CLUSTER, "RayCluster"), (JOB, "RayJob")], ids=["cluster", "job"])
def test_run_records_land_on_the_claim_in_every_group(doc: dict[str, Any], kind: str) -> None:
    """The driver (head) and the evaluator actor (any pod) write the run directory: every group
    mounts the same ReadWriteMany claim at the same path, and --out is under it."""
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    cfg = config_from_args(build_parser().parse_args(shlex.split(JOB["spec"]["entrypoint"])[1:]))
    for name, group in groups(spec):
        mounts = runs_mounts(group)
        assert mounts == ["/home/ray/runs"], f"{name}: the run-records claim is not mounted read-write"
        assert Path(cfg.out_dir).is_relative_to(mounts[0]), f"--out {cfg.out_dir} is not on the claim"
        assert not any("emptyDir" in v for v in group["template"]["spec"].get("volumes", [])
                       if v["name"] == "runs"), name
    assert "ReadWriteMany" in PVC["spec"]["accessModes"], "pods on several nodes write the run directory"
    # Nothing owns the claim: deleting the cluster (shutdownAfterJobFinishes, the TTL) leaves it.
    assert "ownerReferences" not in PVC["metadata"]


def test_reader_pod_mounts_the_claim_read_only() -> None:
    pod = READER["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = pod["containers"][0]["volumeMounts"]
    assert [vols[m["name"]]["persistentVolumeClaim"]["claimName"] for m in mounts] == [PVC["metadata"]["name"]]
    assert all(m.get("readOnly") for m in mounts) and vols["runs"]["persistentVolumeClaim"]["readOnly"]
    assert pod["containers"][0]["image"] == f"{IMAGE}-cpu"
    assert "kubectl cp gradleak-runs-reader:" in (ROOT / "docs" / "deploy.md").read_text(), \
        "docs/deploy.md says how to copy the results out"


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


def test_cluster_launcher_gpu_node_gets_the_gpu_image_and_the_gpu() -> None:
    docker = LAUNCHER["docker"]
    assert docker["image"] == f"{IMAGE}-cpu", "head and CPU workers run the cpu image"
    for name, t in LAUNCHER["available_node_types"].items():
        node_docker = t.get("docker", {})
        options = [o for opt in docker.get("run_options", []) + node_docker.get("worker_run_options", [])
                   for o in [" ".join(opt.split())]]
        if t["resources"].get("GPU", 0) > 0:
            assert node_docker.get("worker_image") == f"{IMAGE}-gpu", name
            assert "--gpus all" in options or "--gpus=all" in options, f"{name}: GPU not exposed to the container"
        else:
            assert node_docker.get("worker_image", docker["image"]).endswith("-cpu"), name
            assert not any(o.startswith("--gpus") for o in options), name


def test_cluster_launcher_shm_is_not_below_the_object_store() -> None:
    """A fixed --shm-size switches off the launcher's sizing of /dev/shm from the node's memory;
    one below Ray's default object store (30% of memory) sends the object store to /tmp."""
    docker = LAUNCHER["docker"]
    assert not docker.get("disable_shm_size_detection", False)
    options = docker.get("run_options", []) + [o for t in LAUNCHER["available_node_types"].values()
                                               for o in t.get("docker", {}).get("worker_run_options", [])]
    assert not [o for o in options if "--shm-size" in o], "leave /dev/shm to the launcher's detection"


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


VARIANTS = ("cpu", "gpu")


def dockerfile_base(variant: str) -> str:
    """The FROM image for a VARIANT build argument (ARGs before FROM substituted)."""
    ins = dockerfile_instructions()
    at = next(n for n, (i, _) in enumerate(ins) if i == "FROM")
    assert all(i == "ARG" for i, _ in ins[:at]), "only ARGs may precede FROM"
    pre = dict(a.partition("=")[::2] for _, a in ins[:at])
    assert pre.get("VARIANT") == "cpu", "VARIANT defaults to the cpu image"
    pre["VARIANT"] = variant
    return re.sub(r"\$\{(\w+)\}", lambda m: pre[m.group(1)], ins[at][1])


def dockerfile_ray_version() -> str:
    versions = set()
    for variant in VARIANTS:
        base = dockerfile_base(variant)
        match = re.fullmatch(rf"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-{variant}", base)
        assert match, f"VARIANT={variant}: base must be rayproject/ray:X.Y.Z-pyNN-{variant}, got {base!r}"
        versions.add(match.group(1))
    assert len(versions) == 1
    return versions.pop()


def dockerfile_args() -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in
            (a.partition("=") for i, a in dockerfile_instructions() if i == "ARG")}


def test_dockerfile_base_image_is_pinned_and_fits_the_project() -> None:
    ins = dockerfile_instructions()
    assert any(i == "FROM" for i, _ in ins)
    ray = dockerfile_ray_version()
    assert Version(ray) in DEPENDENCIES["ray"].specifier
    for variant in VARIANTS:
        base = dockerfile_base(variant)
        assert "latest" not in base
        py = re.search(r"-py(\d)(\d+)", base)
        assert py and f"{py.group(1)}.{py.group(2)}" in _python_spec()
    assert not any(i in {"ENTRYPOINT", "CMD"} for i, _ in ins), "Ray images need `ray start` to run"


def test_dockerfile_variant_selects_the_torch_wheels() -> None:
    """cpu: torch from the CPU wheel index; gpu: the CUDA wheels; anything else stops the build."""
    deps = next(a for i, a in dockerfile_instructions() if i == "RUN" and "pip install" in a)
    cases = dict(re.findall(r"(\w+|\*)\)\s*([^;]*?(?:;[^;]*?)*?)\s*;;", deps))
    assert set(cases) == {"cpu", "gpu", "*"}, cases
    assert "${TORCH_CPU_INDEX}" in cases["cpu"] and "/whl/cpu" in dockerfile_args()["TORCH_CPU_INDEX"]
    assert "index-url" not in cases["gpu"], "gpu: PyPI's CUDA wheels, no extra index"
    assert "exit 1" in cases["*"]


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
    assert {"pyproject.toml", "deploy/constraints.txt", "gradleak", "p2p", "attacker", "protos",
            "scripts"} <= where.keys()
    for src in where:
        assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
    deps_run = next(n for n, a in runs if "pip install" in a)
    assert where["pyproject.toml"] < deps_run, "pyproject.toml must be copied before the deps install"
    for pkg in ("gradleak", "p2p", "attacker", "protos", "scripts"):
        assert where[pkg] > deps_run, f"{pkg}/ copied before the dependency layer: every edit re-installs torch"
    final = [a for n, a in runs if n > max(where.values()) and "pip install" in a]
    assert final and re.search(r"pip install --no-cache-dir .*-r /tmp/torch-index.txt \.(\s|$)", final[0]), \
        "the project itself"
    for arg in ("${TORCH_SPEC}", "${TORCHVISION_SPEC}"):
        assert arg in ins[deps_run][1] + final[0]
    assert where["deploy/constraints.txt"] < deps_run, "constraints copied before the dependency layer"


def test_dockerfile_installs_under_the_constraints_and_runs_pip_check() -> None:
    runs = [a for i, a in dockerfile_instructions() if i == "RUN"]
    installs = [c for a in runs for c in a.split("&&") if "pip install" in c]
    assert len(installs) >= 2
    for cmd in installs:
        assert "-c constraints.txt" in cmd, f"pip install without the constraints: {cmd.strip()}"
    last = max(n for n, a in enumerate(runs) if "pip install" in a)
    steps = [c.strip() for c in runs[last].split("&&")]
    first_install = next(n for n, c in enumerate(steps) if "pip install" in c)
    assert "pip check" in steps[first_install + 1:], "`pip check` after the last install"


def constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==" and not req.marker, f"not an exact pin: {line}"
        assert req.name not in pins, f"pinned twice: {req.name}"
        pins[req.name] = Version(spec[0].version)
    return pins


def test_constraints_pin_every_dependency_inside_pyproject() -> None:
    pins = constraints()
    for name, req in DEPENDENCIES.items():
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
        assert pins[name] in req.specifier, f"{name}=={pins[name]} outside pyproject's {req}"
    args = dockerfile_args()
    for name, arg in (("torch", "TORCH_SPEC"), ("torchvision", "TORCHVISION_SPEC")):
        assert f"{name}=={pins[name]}" == args[arg], f"{arg} differs from the constraints"
    assert pins["ray"] == Version(dockerfile_ray_version()), "the base image's Ray is the pinned one"


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
    assert not unknown, f"metric names not in gradleak/runtime/telemetry.py: {unknown}"


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
