"""Test-wide settings, applied before any test imports Ray, and the fixtures that several modules share."""

import os
import sys
from pathlib import Path

# Every Ray instance the tests start (ray.init, `ray start --head`, the processes they spawn) binds to 127.0.0.1:
# Ray's switch for clusters on Windows/macOS, off, makes it use loopback addresses on Linux too. Ray reads it
# when imported, so it is set here, first.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default; each run of the tests waits out several of those
# polls (worker group up, each report, the end, a lost worker). 0.2 s saves 3 to 4 s a run (measured on the
# evaluation-only run: 18-19 s against 14-15 s). A poll a worker misses is only retried: Ray fails a worker after
# 10 minutes without an answer, whatever the interval.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


import pytest


def start_local_ray() -> None:
    """The tests' local Ray instance (2 CPUs, 127.0.0.1, no dashboard, worker output kept out of the test log),
    started unless one is running. It is shared by the modules that use it (starting one takes ~5 s) and stopped at
    the end of the session, or before a test starts a `ray start --head` of its own (tests/test_sweeps.py)."""
    import ray

    if not ray.is_initialized():
        # TRAIN_DRIVER: the slots a sweep's trials take (sweeps.grid.DRIVER_RESOURCE), as the embedded sweep offers.
        ray.init(
            address="local",
            num_cpus=2,
            resources={"TRAIN_DRIVER": 2},
            include_dashboard=False,
            log_to_driver=False,
        )


@pytest.fixture(scope="module")
def ray_local() -> None:
    start_local_ray()


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated data set (4 classes, 32 + 8 images each, 32 px) as an ImageFolder tree and FFCV .beton files."""
    from train.data import generate_dataset, write_beton

    root = generate_dataset(
        tmp_path_factory.mktemp("data"), num_classes=4, train_per_class=32, val_per_class=8, image_size=32
    )
    for split in ("train", "val"):
        write_beton(root, split, root / f"{split}.beton", max_resolution=None, num_workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def tracked_run(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny preset trained 2 epochs on `train_data`'s .beton files by 2 Ray Train workers, logged to a sqlite
    MLflow store as the child of a sweep's parent run. tests/test_train.py checks the run itself (and resumes a
    killed copy to its numbers); tests/test_probe_runs.py probes the model it trained. One run serves both: a run
    costs 15 to 40 s here."""
    from mlflow.tracking import MlflowClient

    from train.config import TrainConfig
    from train.driver import run_training
    from train.tracking import ensure_experiment

    start_local_ray()
    tmp_path = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    config = TrainConfig.from_preset(
        "tiny", {"data": {"path": str(train_data)}, "tracking": {"tracking_uri": uri, "system_metrics_interval_s": 1.0}}
    )
    client = MlflowClient(uri)
    sweep = ensure_experiment(client, uri, "sweep")  # artifacts beside the store
    parent = client.create_run(sweep, run_name="parent").info.run_id
    result = run_training(config, name="tiny-ffcv", storage_path=tmp_path / "runs", mlflow_parent_run_id=parent)
    return {"config": config, "result": result, "tmp_path": tmp_path, "sweep": sweep, "parent": parent}


@pytest.hookimpl(trylast=True)  # after pytest's own grouping of items by fixture
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a `ray start --head` of their own (those taking `ray_env`, tests/test_sweeps.py) run last:
    they stop the shared local instance, which the modules after them would otherwise start again (~5 s)."""
    items.sort(key=lambda item: "ray_env" in getattr(item, "fixturenames", ()))  # stable: the rest keep their order


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "ray" in sys.modules:  # imported: some test may have started it
        import ray

        ray.shutdown()


@pytest.fixture(scope="module")
def imagefolder_root(tmp_path_factory: pytest.TempPathFactory):
    """A tiny generated data set in ImageNet's folder layout (3 classes, 4 + 2 images each, 32 px)."""
    from train.data import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("data"), num_classes=3, train_per_class=4, val_per_class=2, image_size=32
    )


@pytest.fixture
def tiny(imagefolder_root):
    """`tiny(**overrides)`: the tiny training preset on `imagefolder_root`, one worker, validated."""
    from train.config import TrainConfig

    def make(**overrides: object) -> TrainConfig:
        values = {"data": {"path": str(imagefolder_root), "backend": "imagefolder"}, "num_workers": 1, **overrides}
        return TrainConfig.from_preset("tiny", values)

    return make
