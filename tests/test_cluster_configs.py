"""cluster/: the launcher config against Ray's own schema, the KubeRay RayJob against the
fields KubeRay requires, the runtime-env template through `datagen submit`'s builder,
and the GPU example through `datagen validate`. Nothing here launches a cloud cluster."""

from __future__ import annotations

import re

import pytest
import yaml

from datagen.submit import build

from .conftest import REPO, datagen

CLUSTER = REPO / "cluster"
# Literal credentials that must never sit in a config: OpenAI/HF/GitHub keys, AWS key ids.
LITERAL_SECRET = re.compile(r"sk-[A-Za-z0-9]{8,}|hf_[A-Za-z0-9]{8,}|ghp_[A-Za-z0-9]{8,}|AKIA[0-9A-Z]{12,}")


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "rayjob.yaml", "runtime-env.yaml"])
def test_configs_parse_and_hold_no_literal_secret(name):
    assert isinstance(load(name), dict)
    assert not LITERAL_SECRET.search((CLUSTER / name).read_text())


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cfg = load("aws-gpu.yaml")
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    validate_config(fillout_defaults(cfg))  # what `ray up` checks; raises on an unknown or bad field
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t["node_config"]["InstanceType"] for t in types.values()
           if t["node_config"]["InstanceType"].startswith(("g5.", "p4d."))]
    assert gpu, "no GPU node type"
    assert any("datagen[gpu]" in c for c in cfg["setup_commands"])
    # Token auth on every node; keys fetched at start, never written in the file.
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = " ".join(cmds)
        assert "RAY_AUTH_MODE=token" in start and "OPENAI_API_KEY=\"$(aws ssm get-parameter" in start


def test_rayjob_has_the_fields_kuberay_requires():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m datagen run ")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = cluster["workerGroupSpecs"]
    assert groups
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, key
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    pods = [head["template"]] + [g["template"] for g in groups]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert c["name"] and c["image"]
            for var in c.get("env", []):
                if re.search(r"KEY|TOKEN|SECRET", var["name"]):
                    assert "secretKeyRef" in var["valueFrom"], f"{var['name']} must come from a Secret"
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups
                  for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits)
    # The job the manifest runs exists and is valid.
    job_file = spec["entrypoint"].split()[4]
    assert (REPO / job_file).is_file()


def test_gpu_example_is_a_valid_job():
    res = datagen("validate", "examples/gpu_vllm.yaml", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Qwen/Qwen2.5-7B-Instruct" in res.stdout and "s3://" in res.stdout
    job = yaml.safe_load((REPO / "examples" / "gpu_vllm.yaml").read_text())
    assert job["teachers"][0]["num_gpus"] >= 1


def test_runtime_env_template_goes_through_submit():
    sub = build(REPO / "examples" / "gpu_vllm.yaml", working_dir=REPO,
                runtime_env_file=CLUSTER / "runtime-env.yaml")
    assert sub.entrypoint == "python -m datagen run examples/gpu_vllm.yaml --quiet"
    assert sub.runtime_env["env_vars"]["HF_HOME"] == "/mnt/hf-cache"
    assert {"*.parquet", ".venv", ".git"} <= set(sub.runtime_env["excludes"])
    assert sub.runtime_env["working_dir"] == str(REPO)


def test_dockerfile_copies_what_exists():
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), src
