"""deploy/: the cluster launcher config passes Ray's own validation, the RayJob names only fields KubeRay
defines, and the `ensemble` command each runs is a valid config."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from ensemble.config import load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent

# Fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go).
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "submissionMode", "activeDeadlineSeconds", "backoffLimit", "jobId", "metadata",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "suspend", "clusterSelector",
               "submitterPodTemplate", "submitterConfig", "deletionStrategy", "managedBy", "rayClusterSpec"}
RAYCLUSTER_SPEC = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling",
                   "autoscalerOptions", "authOptions", "headServiceAnnotations", "suspend", "managedBy",
                   "gcsFaultToleranceOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress", "suspend"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy", "idleTimeoutSeconds", "suspend"}


def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # Ray's JSON schema and its own checks; raises on an unknown key
    gpu = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu, "a GPU worker type"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start


def test_cluster_launcher_config_rejects_a_misspelt_key():
    """The check above can fail."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    cfg["available_node_types"]["worker_gpu"]["max_worker"] = 4
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(cfg))


def test_rayjob_names_only_kuberay_fields_and_asks_for_gpus():
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert set(spec) <= RAYJOB_SPEC and set(cluster) <= RAYCLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP
    assert all(set(group) <= WORKER_GROUP for group in cluster["workerGroupSpecs"])
    assert cluster["authOptions"] == {"mode": "token"}
    workers = [c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all(c["resources"]["limits"]["nvidia.com/gpu"] >= 1 for c in workers)
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())


def test_the_rayjobs_command_is_a_valid_config():
    """The entrypoint's config file (in the image, this repository) and its overrides load."""
    words = shlex.split(yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["entrypoint"])
    assert words[:2] == ["ensemble", "run"]
    config = Path(words[words.index("--config") + 1]).relative_to("/home/ray/specialist-ensembles")
    cfg = load_config(ROOT / config, [w for w in words[2:] if "=" in w])
    assert cfg.launch.num_gpus == 1 and Path(cfg.runs_dir).is_absolute()
    assert "WORKDIR /home/ray/specialist-ensembles" in (DEPLOY / "Dockerfile").read_text()
