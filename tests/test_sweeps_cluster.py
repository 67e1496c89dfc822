"""cluster.yaml: valid for `ray up` (checked offline, as `ray up` checks it before any cloud call) and shaped as
the sweeps need it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from sweeps.grid import DRIVER_RESOURCE

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_offline():
    config = load()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))  # fills in the provider's defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_is_a_cpu_head_with_h100_workers():
    config = load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    # Trials run on the head: it offers the driver slots and no GPU.
    assert head["resources"][DRIVER_RESOURCE] >= 1 and not head["node_config"]["InstanceType"].startswith("p")
    # Workers: p5.48xlarge (8 x H100), autoscaled between bounds within the global maximum.
    assert [w["node_config"]["InstanceType"] for w in workers] == ["p5.48xlarge"]
    worker = workers[0]
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    assert head["resources"][DRIVER_RESOURCE] == 8 * worker["max_workers"]  # one trial per GPU at full size
    # The Ray image matches the Ray that drives it (the ray-ml images stopped at 2.49).
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_cluster_yaml_keeps_ports_private_and_pins_the_code():
    config = load()
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start.replace("--host 0.0.0.0", "")
    assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    setup = " ".join(config["setup_commands"])
    assert "requirements.lock" in setup and "--no-build-isolation ffcv" in setup
    ref = re.search(r"VITREG_REF=(\S+)", setup)
    assert ref and ref.group(1) not in ("main", "master", "HEAD")  # a tag or commit, not a moving branch
