"""Cluster infrastructure: images, KubeRay manifests, the Ray cluster-launcher file, the local
one-machine cluster and the runbook.

Nothing here can start a Kubernetes cluster, build an image or launch EC2 nodes, so every file
is checked against what *can* be checked offline: Kubernetes' own API schemas
(kubernetes-validate), Ray's own cluster-launcher schema and validator, the typed configs of the
jobs the manifests run, the entry points' real command-line flags, the repository paths they
name, the pins pip resolves, and resource arithmetic (a Ray Train worker or an encoder actor must
fit into one pod / node, or the job would wait forever). The slow test runs the whole flow on
this machine: infra/local/cluster.sh up, `ray job submit` of the embedding job with slides and
warehouse on the loopback S3 server, tables checked, cluster.sh down, nothing left running.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCKER = INFRA / "docker"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
LOCAL_SCRIPT = INFRA / "local" / "cluster.sh"
RUNBOOK = ROOT / "docs" / "runbook.md"

# Which typed config each entry point loads (the modules that define the classes).
ENTRY_CONFIGS = {
    "jobs/embed_cohort.py": ("care_scale.embed.config", "EmbedConfig"),
    "train/stage1_ssl.py": ("care_scale.training.config", "Stage1Config"),
    "train/stage2_align.py": ("care_scale.training.config", "Stage2Config"),
}

# Top-level fields of the KubeRay v1 CRDs (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.3):
# a misspelt field is silently dropped by the API server, so we check the names ourselves.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs", "upgradeStrategy", "authOptions",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams",
                     "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas",
                       "idleTimeoutSeconds", "rayStartParams", "template", "scaleStrategy",
                       "numOfHosts"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext",
                     "idleTimeoutSeconds", "upscalingMode", "version", "env", "envFrom",
                     "volumeMounts"}
K8S_VERSION = "1.30"


# ----------------------------------------------------------------------------- helpers
def _docs(path: Path) -> list[dict]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)
            if d.get("kind") == kind]


def _rayjobs() -> list[tuple[Path, dict]]:
    return _by_kind("RayJob")


def _raycluster() -> dict:
    clusters = _by_kind("RayCluster")
    assert len(clusters) == 1, [str(p) for p, _ in clusters]
    return clusters[0][1]


def _config_class(script: str):
    import importlib

    module, name = ENTRY_CONFIGS[script]
    return getattr(importlib.import_module(module), name)


def _parse_entrypoint(entrypoint: str) -> tuple[str, list[str], str | None, list[str]]:
    """``python SCRIPT [args]`` -> (script, args, --config value, --set values)."""
    argv = shlex.split(entrypoint)
    assert argv[0] in ("python", "python3"), entrypoint
    script, args = argv[1], argv[2:]
    config, sets = None, []
    for flag, value in itertools.pairwise(args):
        if flag == "--config":
            config = value
        elif flag == "--set":
            sets.append(value)
    return script, args, config, sets


def _quantity(q) -> float:
    """Kubernetes resource quantity -> a number (bytes for memory, cores for cpu)."""
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6,
             "G": 1e9, "T": 1e12, "m": 1e-3}
    for suffix, factor in units.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


def _pod_groups() -> list[tuple[str, dict, dict]]:
    """(group name, rayStartParams, pod template) for the head and every worker group."""
    spec = _raycluster()["spec"]
    out = [("head", spec["headGroupSpec"]["rayStartParams"], spec["headGroupSpec"]["template"])]
    for g in spec["workerGroupSpecs"]:
        out.append((g["groupName"], g["rayStartParams"], g["template"]))
    return out


def _container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """Instructions of a Dockerfile as (KEYWORD, arguments), continuation lines joined."""
    text = (DOCKER / name).read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _pins(path: Path) -> dict[str, str]:
    """``name -> version`` of a pip requirements file (following ``-r``), names normalised."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            pins.update(_pins(path.parent / line[3:].strip()))
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: not pinned: {raw}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = specs[0].version
    return pins


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def _installed(name: str) -> str:
    return metadata.version(name)


# ----------------------------------------------------------------------------- parsing
def test_every_manifest_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(files) >= 9, files
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} holds no YAML document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    assert {p.name for p in KUBERAY.glob("rayjob-*.yaml")} >= {
        "rayjob-embed.yaml", "rayjob-train-stage1.yaml", "rayjob-train-stage2.yaml"}


# ----------------------------------------------------------------------------- job configs
def _shipped_configs() -> dict[Path, str]:
    """Every config file a RayJob or the runbook runs -> the entry point that loads it."""
    out = {}
    for _, job in _rayjobs():
        script, _, config, _ = _parse_entrypoint(job["spec"]["entrypoint"])
        out[ROOT / config] = script
    return out


def test_every_shipped_config_is_run_by_some_manifest():
    configs = set(_shipped_configs())
    shipped = set((INFRA / "configs").glob("*.yaml"))
    assert shipped, "no configs under infra/configs"
    assert shipped <= configs, f"configs no manifest runs: {sorted(map(str, shipped - configs))}"


@pytest.mark.parametrize("config_path", sorted((INFRA / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_config_validates_against_its_typed_config(config_path):
    from care_scale.config import load_config
    from care_scale.models import list_patch_encoders, list_slide_encoders

    script = _shipped_configs()[config_path]
    cfg = load_config(_config_class(script), str(config_path))
    # Model names must be registry entries, or the job fails only once it is on the cluster.
    if script == "jobs/embed_cohort.py":
        cfg.require_io()
        assert cfg.slide_encoder.name in list_slide_encoders()
        assert cfg.patch_encoder.name == "" or cfg.patch_encoder.name in list_patch_encoders()
        assert cfg.source.startswith("s3://") and cfg.warehouse.startswith("s3://")
    else:
        assert cfg.model.name in list_slide_encoders()
        assert cfg.run.use_gpu and cfg.run.storage_path.startswith("s3://")


# ----------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("path", sorted(KUBERAY.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_points_at_a_real_entry_point_and_config(path):
    docs = _docs(path)
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC_FIELDS}"
    # It runs on the RayCluster we ship (KubeRay reads the cluster name from this key).
    assert spec["clusterSelector"] == {"ray.io/cluster": _raycluster()["metadata"]["name"]}
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")

    script, args, config, sets = _parse_entrypoint(spec["entrypoint"])
    assert script in ENTRY_CONFIGS, f"{path.name}: unexpected entry point {script}"
    assert (ROOT / script).is_file(), f"{path.name}: {script} is not in the repository"
    assert config is not None and (ROOT / config).is_file(), f"{path.name}: config {config}"
    # Every flag the entrypoint passes is one the script really takes.
    help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, check=True,
                               capture_output=True, text=True, timeout=120).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, f"{path.name}: {script} has no flag {flag}"
    from care_scale.config import load_config

    load_config(_config_class(script), str(ROOT / config), sets)

    # The runtime env is one Ray accepts, and its working_dir is the repository copy in the image.
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # Ray checks that a local working_dir exists; the checkout stands in for the image's copy.
    RuntimeEnv(**{**runtime_env, "working_dir": str(ROOT)})
    assert runtime_env["working_dir"] == _image_workdir("Dockerfile.gpu")
    assert runtime_env["working_dir"] == _image_workdir("Dockerfile.cpu")
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())


def test_embed_job_config_goes_through_the_jobs_own_argument_parsing():
    from care_scale.cli import build_parser
    from care_scale.cli.embed import config_from_args

    (_, job), = [(p, j) for p, j in _rayjobs() if "embed_cohort" in j["spec"]["entrypoint"]]
    argv = shlex.split(job["spec"]["entrypoint"])[2:]
    cfg = config_from_args(build_parser().parse_args(["embed", *argv]))
    cfg.require_io()


def test_raycluster_fields_and_autoscaling():
    rc = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_FIELDS
    assert spec["enableInTreeAutoscaling"] is True
    # The cluster's Ray is the one the images install and the tests run.
    ray_pin = _pins(DOCKER / "requirements.txt")["ray"]
    assert spec["rayVersion"] == ray_pin == _installed("ray")
    # `ray job submit` / RayJob submitters reach the job API on the head's dashboard.
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"gpu", "cpu"} <= set(groups)
    for name, g in groups.items():
        assert set(g) <= WORKER_GROUP_FIELDS, (name, set(g) - WORKER_GROUP_FIELDS)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        assert g["maxReplicas"] > 0, f"group {name} can never scale up"
    gpu = groups["gpu"]["template"]["spec"]
    assert "nvidia.com/gpu" in _container(groups["gpu"]["template"])["resources"]["limits"]
    assert gpu["nodeSelector"], "GPU pods need a node selector for GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert _container(groups["gpu"]["template"])["image"].endswith("-gpu")
    assert _container(groups["cpu"]["template"])["image"].endswith("-cpu")


# ids must not be "gpu": conftest skips tests carrying the keyword "gpu" on CPU machines.
@pytest.mark.parametrize("group", ["head", "gpu", "cpu"], ids=lambda g: f"{g}-group")
def test_raycluster_pod_templates_validate_against_the_kubernetes_api(group):
    import kubernetes_validate

    (_, params, template), = [g for g in _pod_groups() if g[0] == group]
    # KubeRay embeds plain PodTemplateSpecs: validate each as a core/v1 PodTemplate (strict:
    # unknown fields are errors).
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"care-scale-{group}"}, "template": template}
    kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    # rayStartParams are passed to `ray start` as strings.
    assert all(isinstance(v, str) for v in params.values()), params


@pytest.mark.parametrize("group", ["head", "gpu", "cpu"], ids=lambda g: f"{g}-group")
def test_pods_have_shm_object_store_and_s3_credentials(group):
    (_, params, template), = [g for g in _pod_groups() if g[0] == group]
    pod = template["spec"]
    c = _container(template)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    # The object store lives in /dev/shm: it must fit there and inside the pod's memory limit.
    store = int(params["object-store-memory"])
    assert store <= _quantity(shm["sizeLimit"]) < _quantity(c["resources"]["limits"]["memory"])
    assert c["resources"]["requests"] == c["resources"]["limits"], "Guaranteed QoS pods"
    # S3: the Secret (optional, so IRSA alone also works) and the IRSA service account.
    secrets = [e["secretRef"] for e in c.get("envFrom", []) if "secretRef" in e]
    assert secrets and all(s.get("optional") is True for s in secrets)
    (_, secret), = _by_kind("Secret")
    assert {s["name"] for s in secrets} == {secret["metadata"]["name"]}
    (_, sa), = _by_kind("ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    # The embedding job's slide cache directory is a mounted volume big enough for its bound.
    from care_scale.config import load_config
    from care_scale.embed.config import EmbedConfig

    embed = load_config(EmbedConfig, str(INFRA / "configs" / "embed-s3.yaml"))
    cache = volumes[mounts[embed.cache_dir]]["emptyDir"]
    assert embed.cache_max_bytes <= _quantity(cache["sizeLimit"])


def test_core_objects_validate_and_hold_no_credentials():
    import kubernetes_validate

    (_, secret), = _by_kind("Secret")
    (_, sa), = _by_kind("ServiceAccount")
    for obj in (secret, sa):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
                        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    # No manifest anywhere carries something that looks like an AWS key.
    for path in INFRA.rglob("*"):
        if path.is_file():
            assert not re.search(r"AKIA[0-9A-Z]{16}", path.read_text()), path


def test_jobs_fit_the_pods_they_need():
    """Encoder actors and Ray Train workers must fit into one GPU pod, or they never start."""
    from care_scale.config import load_config
    from care_scale.embed.config import EmbedConfig
    from care_scale.training.config import Stage1Config, Stage2Config

    groups = {g["groupName"]: g for g in _raycluster()["spec"]["workerGroupSpecs"]}
    gpu_pod = _container(groups["gpu"]["template"])["resources"]["limits"]
    pod_cpus, pod_gpus = _quantity(gpu_pod["cpu"]), _quantity(gpu_pod["nvidia.com/gpu"])
    max_gpus = groups["gpu"]["maxReplicas"] * pod_gpus

    embed = load_config(EmbedConfig, str(INFRA / "configs" / "embed-s3.yaml"))
    c = embed.concurrency
    assert 0 < c.num_gpus_per_actor <= pod_gpus and c.num_cpus_per_actor <= pod_cpus
    assert c.encoder_actors * c.num_gpus_per_actor <= max_gpus
    for cls, name in ((Stage1Config, "train-stage1-s3.yaml"), (Stage2Config, "train-stage2-s3.yaml")):
        run = load_config(cls, str(INFRA / "configs" / name)).run
        assert run.use_gpu and run.cpus_per_worker <= pod_cpus, name
        assert run.num_workers <= max_gpus, name


# ----------------------------------------------------------------------------- AWS launcher
def test_aws_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = _docs(AWS_CLUSTER)[0]
    jsonschema.validate(config, schema)
    # What `ray up` itself does before touching the cloud: fill defaults, then validate.
    validate_config(prepare_config(config))

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    for name, t in types.items():
        # S3 through the instance role, never through keys on the node.
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    # Training workers and encoder actors fit one GPU node.
    gpu_cpus = min(t["resources"]["CPU"] for t in types.values() if t["resources"].get("GPU"))
    from care_scale.config import load_config
    from care_scale.training.config import Stage1Config

    run = load_config(Stage1Config, str(INFRA / "configs" / "train-stage1-s3.yaml")).run
    assert run.cpus_per_worker <= gpu_cpus


def test_aws_cluster_yaml_names_real_paths_and_the_image_pins():
    config = _docs(AWS_CLUSTER)[0]
    for remote, local in config["file_mounts"].items():
        assert (ROOT / local).exists(), f"file_mounts source {local} (run `ray up` from the root)"
    mounted = {remote.rstrip("/"): (ROOT / local).resolve()
               for remote, local in config["file_mounts"].items()}
    setup = "\n".join(config["setup_commands"])
    # Paths under the mounted checkout that the setup commands name exist in the repository.
    for remote, local in mounted.items():
        for rel in re.findall(re.escape(remote) + r"/([\w./-]+)", setup):
            assert (local / rel).exists(), rel
    # The same torch and requirement pins as the GPU image.
    assert f"torch=={_torch_pin('Dockerfile.gpu')}" in setup
    assert "infra/docker/requirements-gpu.txt" in setup
    assert "[gpu]" in setup and "gpu" in _pyproject()["optional-dependencies"]


# ----------------------------------------------------------------------------- images
def _image_workdir(name: str) -> str:
    workdirs = [a for k, a in _dockerfile(name) if k == "WORKDIR"]
    return workdirs[-1]


def _torch_pin(name: str) -> str:
    runs = " ".join(a for k, a in _dockerfile(name) if k == "RUN")
    (pin,) = set(re.findall(r"\btorch==([\w.+]+)", runs))
    return pin


def _dockerignore_allows(rel: str) -> bool:
    """Docker's rule: the last matching .dockerignore pattern decides; '!' re-includes."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            allowed = negate
    return allowed


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_is_pinned_non_root_and_names_real_paths(name):
    instructions = _dockerfile(name)
    (base,) = [a for k, a in instructions if k == "FROM"]
    _image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"unpinned base {base}"
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(?i)(secret|password|token|access_key)", args), args
        if keyword == "COPY":
            assert "--from" not in args
            *sources, _dest = shlex.split(args)
            for src in sources:
                for path in sorted(ROOT.glob(src)) or [ROOT / src]:
                    assert path.exists(), f"{name}: COPY {src}: not in the repository"
                    rel = str(path.relative_to(ROOT))
                    assert _dockerignore_allows(rel), f"{name}: .dockerignore excludes {rel}"
    copied = {shlex.split(a)[0] for k, a in instructions if k == "COPY"}
    # Everything the RayJobs run is in the image's working_dir.
    for _, job in _rayjobs():
        script, _, config, _ = _parse_entrypoint(job["spec"]["entrypoint"])
        assert script.split("/")[0] in copied, f"{name}: {script} is not copied"
        assert any(config.startswith(c.rstrip("/")) for c in copied), f"{name}: {config}"
    runs = " ".join(a for k, a in instructions if k == "RUN")
    for req in re.findall(r"-r (\S+\.txt)", runs):
        assert (ROOT / req).is_file(), req
    # torch is the version the tests run (PyPI's CUDA build on GPU, the +cpu build on CPU).
    assert _torch_pin(name).split("+")[0] == _installed("torch").split("+")[0]
    if name == "Dockerfile.gpu":
        assert "'.[gpu]'" in runs and "requirements-gpu.txt" in runs
        # requirements-gpu.txt pulls in requirements-cucim.txt: the COPY must bring it along.
        assert "cucim-cu12" in _pins(DOCKER / "requirements-gpu.txt")
        assert any("requirements-cucim.txt" in a for k, a in instructions if k == "COPY")
    else:
        assert _torch_pin(name) == _installed("torch")  # 2.13.0+cpu, as on this machine
        # The CPU image needs no cuCIM (the optional extra, CuPy and CUDA wheels with it).
        assert "cucim" not in runs and "[gpu]" not in runs


def test_dockerignore_keeps_history_and_secrets_out():
    for rel in (".git/config", ".env", "tests/conftest.py", ".aws/credentials",
                "care_scale/__pycache__/x.pyc", "care_scale.egg-info/PKG-INFO"):
        assert not _dockerignore_allows(rel), rel
    for rel in ("care_scale/config.py", "jobs/embed_cohort.py", "infra/configs/embed-s3.yaml",
                "infra/docker/requirements.txt", "pyproject.toml"):
        assert _dockerignore_allows(rel), rel


def test_requirement_pins_cover_pyproject():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = _pyproject()
    common = _pins(DOCKER / "requirements.txt")
    gpu = _pins(DOCKER / "requirements-gpu.txt")
    extras = project["optional-dependencies"]
    # cuCIM is an optional extra, pinned in its own file; the GPU image carries it.
    assert not any(canonicalize_name(Requirement(d).name) == "cucim-cu12"
                   for d in project["dependencies"])
    assert "cucim-cu12" not in common
    cucim_deps = [Requirement(d) for d in extras["cucim"]]
    assert {canonicalize_name(r.name) for r in cucim_deps} == {"cucim-cu12"}
    assert set(map(str, cucim_deps)) <= {str(Requirement(d)) for d in extras["gpu"]}
    for pins_file, extra in (("requirements-cucim.txt", "cucim"), ("requirements-gpu.txt", "gpu"),
                             ("requirements.txt", "hf")):
        pins = _pins(DOCKER / pins_file)
        for dep in extras[extra]:
            req = Requirement(dep)
            name = canonicalize_name(req.name)
            assert name in pins and req.specifier.contains(pins[name]), (pins_file, dep)
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name == "torch":  # installed first by each Dockerfile, from the right index
            assert name not in common
            assert req.specifier.contains(_torch_pin("Dockerfile.gpu"))
            continue
        assert name in common, f"{dep} (pyproject) has no pin in requirements.txt"
        assert req.specifier.contains(common[name]), f"pin {name}=={common[name]} vs {dep}"
    # The ray pin carries the extras pyproject asks for.
    ray_line = next(ln for ln in (DOCKER / "requirements.txt").read_text().splitlines()
                if ln.startswith("ray["))
    (ray_dep,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    assert Requirement(ray_line).extras == Requirement(ray_dep).extras
    # TensorRT's meta packages and wheels move in lockstep.
    assert len({v for n, v in gpu.items() if n.startswith("tensorrt")}) == 1


def _readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", text, re.DOTALL)
    assert match, marker
    return match.group(1)


def test_readme_installs_cucim_for_the_tests_not_for_the_quick_start():
    quick, tests = _readme_command("quickstart-command"), _readme_command("test-command")
    assert "cucim" not in quick and "requirements" not in quick
    # .ci/run executes exactly this one line.
    assert "\n" not in tests
    assert "-r infra/docker/requirements.txt -r infra/docker/requirements-cucim.txt" in tests
    assert re.search(r"'\.\[[\w,]*\bcucim\b[\w,]*\]'", tests)


def test_common_pins_are_the_tested_versions():
    """The CPU image reproduces this machine's environment (same Python minor, same pins)."""
    from packaging.utils import canonicalize_name

    for name, version in _pins(DOCKER / "requirements.txt").items():
        assert _installed(canonicalize_name(name)) == version, name
    # The README's test command installs the cucim pin as well (the suite tests that backend);
    # the quick start does not, and its tests skip then.
    for name, version in _pins(DOCKER / "requirements-cucim.txt").items():
        try:
            installed = _installed(canonicalize_name(name))
        except metadata.PackageNotFoundError:
            continue
        assert installed == version, name
    (base,) = [a for k, a in _dockerfile("Dockerfile.cpu") if k == "FROM"]
    assert f"python:{sys.version_info.major}.{sys.version_info.minor}." in base


def _pip_dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
         "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)


@pytest.mark.network
def test_pins_resolve_with_pip(tmp_path):
    """pip finds a distribution for every pin, for each image's interpreter and platform."""
    # CPU image: Python 3.11, like this machine.
    cpu = _pip_dry_run("-r", str(DOCKER / "requirements.txt"))
    assert cpu.returncode == 0, cpu.stdout[-2000:] + cpu.stderr[-2000:]
    assert "Would install" in cpu.stdout
    # GPU image: Ubuntu 24.04's Python 3.12, manylinux wheels only (what the image will get).
    gpu_pins = _pins(DOCKER / "requirements-gpu.txt")
    # tensorrt, tensorrt-cu13 and tensorrt-cu13-libs are source packages that fetch their wheel
    # from NVIDIA's index at install time; that index is not reachable here. The bindings wheel
    # (cp312) is on PyPI and carries the same version (checked in test_requirement_pins_...).
    skip = {"tensorrt", "tensorrt-cu13", "tensorrt-cu13-libs"}
    reqs = tmp_path / "gpu-wheels.txt"
    lines = [f"{n}=={v}" for n, v in gpu_pins.items() if n not in skip]
    ray_line = next(ln for ln in (DOCKER / "requirements.txt").read_text().splitlines()
                if ln.startswith("ray["))
    lines = [ray_line if ln.startswith("ray==") else ln for ln in lines]
    lines.append(f"torch=={_torch_pin('Dockerfile.gpu')}")
    reqs.write_text("\n".join(lines) + "\n")
    platforms = [a for p in ("manylinux_2_39_x86_64", "manylinux_2_28_x86_64",
                             "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64", "linux_x86_64")
                 for a in ("--platform", p)]
    gpu = _pip_dry_run("--python-version", "3.12", "--implementation", "cp", *platforms,
                       "--only-binary=:all:", "--target", str(tmp_path / "t"), "-r", str(reqs))
    assert gpu.returncode == 0, gpu.stdout[-2000:] + gpu.stderr[-2000:]
    assert "torch-2.13.0" in gpu.stdout and "tensorrt_cu13_bindings" in gpu.stdout


# ----------------------------------------------------------------------------- runbook
def test_runbook_is_linked_and_names_real_paths():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- section:cluster -->(.*?)<!-- /section:cluster -->", readme, re.DOTALL)
    assert section and "docs/runbook.md" in section.group(1)
    text = RUNBOOK.read_text()
    for heading in ("Submitting a cohort", "Watching", "Resuming", "Sizing", "Training",
                    "Exporting", "Querying", "Cost"):
        assert re.search(rf"^#+ .*{heading}", text, re.MULTILINE | re.IGNORECASE), heading
    named = set(re.findall(r"\b((?:jobs|train|export|infra|configs|docs)/[\w./-]+\w)", text))
    assert named, "the runbook names no repository path"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"runbook names paths that do not exist: {missing}"


def test_runbook_commands_use_real_flags():
    """Every `python jobs|train|export/... --flag` in the runbook's code blocks is a real flag."""
    text = RUNBOOK.read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.DOTALL))
    blocks = re.sub(r"\\\n\s*", " ", blocks)  # join continuation lines
    commands = re.findall(r"python ((?:jobs|train|export)/\w+\.py)([^\n]*)", blocks)
    scripts = {script for script, _ in commands}
    assert scripts >= {"jobs/embed_cohort.py", "train/stage1_ssl.py", "train/stage2_align.py",
                       "export/export_patch_encoder.py", "export/export_slide_encoder.py"}
    helps = {script: subprocess.run([sys.executable, script, "--help"], cwd=ROOT, check=True,
                                    capture_output=True, text=True, timeout=120).stdout
             for script in scripts}
    for script, args in commands:
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", args):
            assert flag in helps[script], f"runbook: {script} has no flag {flag}"


# ----------------------------------------------------------------------------- local cluster
def test_local_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(LOCAL_SCRIPT)], check=True)
    assert os.access(LOCAL_SCRIPT, os.X_OK)
    bad = subprocess.run(["bash", str(LOCAL_SCRIPT), "sideways"], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 64 and "usage" in bad.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _tree(pid: int) -> set[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def _procs_mentioning(needle: str) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
                if needle in cmdline and _alive(int(d.name)):
                    out.add(int(d.name))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return out


@pytest.mark.slow
def test_local_cluster_runs_the_embedding_job_from_s3_and_stops_cleanly(tmp_path):
    """cluster.sh up -> synthetic slides to the S3 server -> `ray job submit` -> tables -> down."""
    import boto3
    from deltalake import DeltaTable

    from care_scale.synthetic import write_synthetic_slide

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_"))}  # nothing of the caller's leaks in
    env.update(CARE_SCALE_LOCAL_STATE=str(state), CARE_SCALE_LOCAL_BUCKET="cohort",
               PYTHON=sys.executable, RAY_USAGE_STATS_ENABLED="0",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    # `down` in a new shell that never exported the state folder: cluster.sh finds it.
    env_without_state = {k: v for k, v in env.items() if k != "CARE_SCALE_LOCAL_STATE"}
    started = time.time()
    up = subprocess.run(["bash", str(LOCAL_SCRIPT), "up"], env=env, capture_output=True,
                        text=True, timeout=180, check=False)
    ours: set[int] = set()
    ray_tmp = (state / "ray_tmp").read_text().strip() if (state / "ray_tmp").exists() else None
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        exported = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.MULTILINE))
        assert {"RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} <= set(exported)
        assert exported["CARE_SCALE_LOCAL_STATE"] == str(state.resolve())
        assert exported["RAY_ADDRESS"].startswith("http://127.0.0.1:")
        assert exported["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        status = subprocess.run(["bash", str(LOCAL_SCRIPT), "status"], env=env,
                                capture_output=True, text=True, check=False)
        assert status.returncode == 0 and "ray: running" in status.stdout
        for name in ("moto", "ray"):
            ours |= _tree(int((state / f"{name}.pid").read_text()))

        # Two tiny synthetic slides onto the loopback S3 server.
        s3 = boto3.client("s3", endpoint_url=exported["AWS_ENDPOINT_URL"],
                          aws_access_key_id=exported["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exported["AWS_SECRET_ACCESS_KEY"],
                          region_name="us-east-1")
        for i in range(2):
            path = tmp_path / f"slide_{i}.tiff"
            write_synthetic_slide(path, width=1024, height=768, mpp=0.5, seed=i)
            s3.upload_file(str(path), "cohort", f"slides/slide_{i}.tiff")

        # Submit exactly as the runbook says: the job reaches S3 through the standard AWS
        # environment of the cluster (cluster.sh exported it to Ray), no keys in the command.
        job_env = {**env, **exported}
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", exported["RAY_ADDRESS"],
             "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"env_vars": {"OMP_NUM_THREADS": "1"},
                                               "excludes": [".git", "tests", "benchmarks"]}),
             "--", "python", "jobs/embed_cohort.py", "s3://cohort/slides/*.tiff",
             "--warehouse", "s3://cohort/warehouse",
             "--set", "progress=log", "--set", "decode_batch_size=16",
             "--set", "encode_batch_size=16", "--set", "concurrency.torch_threads=1"],
            env=job_env, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-4000:]
        assert "succeeded" in out.lower(), out[-4000:]

        options = {"aws_access_key_id": exported["AWS_ACCESS_KEY_ID"],
                   "aws_secret_access_key": exported["AWS_SECRET_ACCESS_KEY"],
                   "aws_endpoint_url": exported["AWS_ENDPOINT_URL"], "aws_region": "us-east-1",
                   "aws_allow_http": "true"}
        slides = DeltaTable("s3://cohort/warehouse/slides",
                            storage_options=options).to_pyarrow_table().to_pylist()
        assert sorted(s["slide_id"] for s in slides) == ["slide_0", "slide_1"]
        assert all(s["source_uri"].startswith("s3://cohort/slides/") for s in slides)
        assert all(s["num_regions"] >= 1 for s in slides)
        regions = DeltaTable("s3://cohort/warehouse/regions", storage_options=options)
        assert regions.to_pyarrow_table().num_rows == sum(s["num_regions"] for s in slides)
        ours |= {p for name in ("moto", "ray") if (state / f"{name}.pid").exists()
                 for p in _tree(int((state / f"{name}.pid").read_text()))}
    finally:
        down = subprocess.run(["bash", str(LOCAL_SCRIPT), "down"], env=env_without_state,
                              capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    time.sleep(1)
    left = {p for p in ours if _alive(p)}
    if ray_tmp:
        left |= _procs_mentioning(ray_tmp)
    assert not left, f"processes left behind: {sorted(left)}"
    assert not (state / "ray.pid").exists() and not (state / "moto.pid").exists()
    after = subprocess.run(["bash", str(LOCAL_SCRIPT), "status"], env=env,
                           capture_output=True, text=True, check=False)
    assert after.returncode == 1 and "moto: stopped" in after.stdout
    assert time.time() - started < 180
