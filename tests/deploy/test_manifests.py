"""deploy/ agrees with itself and with the code: the manifests parse, the RayJob runs a
command the CLI accepts on a spec where the manifest mounts it, one image and one Ray
version everywhere, GPUs asked of Ray match GPUs asked of Kubernetes, and every Secret the
manifests use exists in an example with the keys they read."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser
from jobs.submit import FORWARDED_ENV
from pipeline.cluster import PACKAGES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent


def load(name):
    docs = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), name
    return docs[0]


def walk(node, key):
    """Every value of ``key`` anywhere under ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def containers(manifest):
    return [c for group in walk(manifest, "containers") for c in group]


MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]


def test_every_yaml_parses():
    names = sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.yaml"))
    assert names == ["cluster.yaml", "kuberay/ray-token.example.yaml",
                     "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                     "kuberay/s3-secret.example.yaml"]
    for name in names:
        load(name)


def test_the_rayjob_runs_a_command_the_cli_accepts_on_the_mounted_spec():
    job = load("kuberay/rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "vidprune"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    mounts = {m["mountPath"]: m["name"] for ms in walk(job, "volumeMounts") for m in ms}
    spec_dir = str(Path(args.spec).parent)
    assert spec_dir in mounts
    volumes = {v["name"]: v for vs in walk(job, "volumes") for v in vs}
    assert "configMap" in volumes[mounts[spec_dir]]


def test_one_image_and_one_ray_version_everywhere():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    built = re.search(r"docker build .* -t (\S+) \.", dockerfile).group(1)
    ray_base = re.search(r"^FROM rayproject/ray:([0-9.]+)-", dockerfile, re.M).group(1)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                        re.M).group(1)
    assert built.endswith(f":{version}")
    images = {c["image"] for name in MANIFESTS for c in containers(load(name))}
    images.add(load("cluster.yaml")["docker"]["image"])
    assert images == {built}
    for name in MANIFESTS:
        assert set(walk(load(name), "rayVersion")) == {ray_base}
    import ray

    assert ray.__version__ == ray_base  # what the tests run is what the image ships
    for package in PACKAGES:  # the image holds the code a job needs
        assert re.search(rf"^COPY .*\b{package} \./{package}$", dockerfile, re.M), package


@pytest.mark.parametrize("name", MANIFESTS)
def test_gpus_asked_of_ray_match_gpus_asked_of_kubernetes(name):
    groups = list(walk(load(name), "workerGroupSpecs"))[0]
    assert groups
    for group in groups:
        gpus = float(group["rayStartParams"].get("num-gpus", 0))
        for c in group["template"]["spec"]["containers"]:
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert float(limits.get("nvidia.com/gpu", 0)) == gpus
            assert float(requests.get("nvidia.com/gpu", 0)) == gpus
    head = list(walk(load(name), "headGroupSpec"))[0]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head only drives


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_chunk_cache_fits_its_volume(name):
    manifest = load(name)
    for c in containers(manifest):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if "VIDPRUNE_CACHE_DIR" not in env:
            continue
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volume = {v["name"]: v for vs in walk(manifest, "volumes") for v in vs}[
            mounts[env["VIDPRUNE_CACHE_DIR"]]]
        limit_gib = int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi"))
        assert int(env["VIDPRUNE_CACHE_BYTES"]) < limit_gib * 2**30


def test_every_secret_used_is_in_an_example_with_its_keys():
    examples = {}
    for path in (DEPLOY / "kuberay").glob("*.example.yaml"):
        secret = load(f"kuberay/{path.name}")
        assert secret["kind"] == "Secret"
        examples[secret["metadata"]["name"]] = set(secret["stringData"])
    used = 0
    for name in MANIFESTS:
        for c in containers(load(name)):
            for ref in c.get("envFrom", []):
                assert ref["secretRef"]["name"] in examples
                used += 1
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in examples[ref["name"]], ref
                    used += 1
    assert used >= 4
    # What the S3 secret sets is what vidprune (botocore) reads from the environment.
    assert examples["vidprune-s3"] <= set(FORWARDED_ENV)


def test_the_cluster_launcher_exports_metrics_and_drives_from_the_head():
    launcher = load("cluster.yaml")
    head, worker = launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]
    assert any("--head" in c and "--metrics-export-port=8080" in c and
               "--dashboard-host=0.0.0.0" in c for c in head)
    assert any("--metrics-export-port=8080" in c for c in worker)
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}
