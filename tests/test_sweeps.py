"""Sweeps: the experiments (train/experiments/) enumerate what the study ran; the local sweep runs end to end on
CPU as a `ray job submit` job and survives its killed driver without repeating trials or duplicating MLflow runs."""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

import vitreg
from sweeps import grid
from sweeps.finetune_grid import prepare_local
from train.data import GeneratedData, prepare_generated_data
from train.experiments import (
    FINETUNE_SWEEPS,
    SCRATCH_SWEEPS,
    Choice,
    IntRange,
    LogUniform,
    cell_id,
    get_experiment,
    sweep_names,
    training_values,
)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SCRIPT = REPO / "sweeps" / "finetune_grid.py"
DEIT3_SMALL = "deit3_small_patch16_224.fb_in22k_ft_in1k"


# --- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local presets' generated set (256 training images): a trial of 1 epoch takes ~30 s."""
    # The embedded default's size: one epoch is 8 steps, enough for the penalty to show on the planted base.
    return prepare_generated_data(tmp_path_factory.mktemp("data"), GeneratedData())


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of every Ray process started here: token authentication with a token of this test run (Ray
    would otherwise write one to ~/.ray), and this virtual environment first on PATH (job entrypoints)."""
    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def end_session(process: subprocess.Popen, sig: int, wait_s: float = 30.0) -> None:
    """Signal `process` (started with start_new_session=True), wait for it, then SIGKILL whatever is left of its
    session (Ray processes that outlived it). Only processes this test started are touched."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for proc in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getsid(proc.pid) == process.pid:
                proc.kill()


def sweep_command(data: Path, storage: Path, mlflow_uri: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--data",
        str(data),
        "--storage",
        str(storage),
        "--mlflow-uri",
        mlflow_uri,
        *extra,
    ]


def runs_of(uri: str) -> tuple[list, list]:
    """(parent runs, child runs) of every experiment in the store."""
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if r.data.tags.get("vitreg.role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


# --- experiments: plain data that enumerate the study's runs -------------------------------------------------------


def test_paper_preset_is_the_studys_32_fine_tunes_exactly_once():
    preset = get_experiment("paper", FINETUNE_SWEEPS)
    fine_tunes = [c for c in preset.grid if c.get("epochs") != 0]
    cells = {(c["frozen_blocks"], c["registers"], c["penalty_lambda"]) for c in fine_tunes}
    expected = {
        (f, r, lam)
        for f, r, lam in itertools.product((8, 9, 10, 11), (0, 1, 4), (0.0, 0.01, 0.1))
        if (r, lam) != (0, 0)
    }
    assert len(fine_tunes) == len(cells) == 32
    assert cells == expected
    # ... and Table 8's "no fine-tuning" row: the pretrained model evaluated without a training step.
    (baseline,) = [c for c in preset.grid if c.get("epochs") == 0]
    assert baseline["registers"] == 0 and baseline["penalty_lambda"] == 0.0
    assert preset.trials == len(preset.grid) == 33
    # Every trial is the single fine-tune of `train/finetune.py` (the training preset) with its cell's values.
    assert preset.base_values() == training_values("finetune")

    # What Tune + Optuna will run: GridSampler over the cell ids hands out each of the 32 cells once.
    space = grid.param_space(preset)
    searcher = grid.search_algorithm(preset)
    assert searcher.set_search_properties(preset.metric, preset.mode, space)
    suggested = [searcher.suggest(f"trial{i}")["cell"] for i in range(preset.trials)]
    assert sorted(suggested) == sorted(cell_id(c) for c in preset.grid)
    assert len(set(suggested)) == 33


@pytest.mark.parametrize(
    ("frozen", "registers", "parameters"),
    [(11, 0, 2_236_648), (11, 4, 2_238_184), (10, 0, 4_011_880), (10, 4, 4_013_416), (9, 0, 5_787_112),
     (9, 4, 5_788_648), (8, 0, 7_562_344), (8, 4, 7_563_880)],
)  # fmt: skip
def test_trainable_parameters_match_table_8(frozen, registers, parameters):
    with torch.device("meta"):  # shapes only: no weights allocated or downloaded
        model = vitreg.build_model(DEIT3_SMALL, registers=registers, frozen_blocks=frozen)
    assert vitreg.trainable_parameters(model) == parameters


def test_other_presets_are_plain_data():
    schedules = get_experiment("schedules", FINETUNE_SWEEPS)
    assert [(c["lambda_schedule"], c["penalty_lambda"]) for c in schedules.grid] == [
        ("harmonic", 0.1), ("exp_hard", 0.1), ("exp_soft", 0.01), ("step", 0.01), ("constant", 0.01), ("constant", 0.0)
    ]  # fmt: skip
    assert {(c["frozen_blocks"], c["registers"]) for c in schedules.grid} == {(10, 4)}
    assert schedules.base["epochs"] == 50
    assert schedules.base_values() == {**training_values("finetune"), "epochs": 50}

    search = get_experiment("search", FINETUNE_SWEEPS)
    assert not search.is_grid and search.asha is not None and search.trials > 1
    assert search.space["frozen_blocks"] == IntRange(0, 11) and search.space["registers"] == IntRange(0, 8)
    assert isinstance(search.space["penalty_lambda"], LogUniform) and isinstance(search.space["lr"], LogUniform)
    assert isinstance(search.space["lambda_schedule"], Choice)
    # Tune domains come out with the inclusive integer bounds (Tune's randint excludes its upper bound).
    space = grid.param_space(search)
    assert (space["frozen_blocks"].lower, space["frozen_blocks"].upper) == (0, 12)

    local = get_experiment("local", FINETUNE_SWEEPS)
    assert local == get_experiment("paper", FINETUNE_SWEEPS, local=True)
    assert local.local and local.planted_base and 4 <= local.trials <= 6
    assert {key for cell in local.grid for key in cell} == {
        "frozen_blocks", "registers", "penalty_lambda", "lambda_schedule"
    }  # fmt: skip
    scratch = get_experiment("scratch", SCRATCH_SWEEPS)
    assert [c["registers"] for c in scratch.grid] == [0, 4] and scratch.base_values() == training_values("scratch")
    assert get_experiment("local", SCRATCH_SWEEPS) == get_experiment("scratch", SCRATCH_SWEEPS, local=True)
    assert sweep_names(FINETUNE_SWEEPS) == ["local", "paper", "schedules", "search", "entry"]
    with pytest.raises(ValueError, match="allowed: local, paper"):
        get_experiment("papr", FINETUNE_SWEEPS)
    with pytest.raises(ValueError, match="preset='finetun': allowed: finetune, scratch, tiny"):
        training_values("finetun")


def test_bad_values_fail_before_any_compute_naming_the_field(tiny_data, tmp_path):
    settings = grid.make_settings(
        get_experiment("local", FINETUNE_SWEEPS),
        prefix="finetune",
        storage_path=str(tmp_path),
        data=str(tiny_data),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        train_overrides={"frozen_blocks": 9},
    )
    with pytest.raises(ValueError, match=r"frozen_blocks=9: must be in 0\.\.4"):
        grid.validate(settings)
    assert settings.name.startswith("finetune-local-")  # overrides never resume the plain sweep
    # The planted base is part of the local experiment, not an override: the plain command keeps the plain name.
    local, data = prepare_local(get_experiment("local", FINETUNE_SWEEPS), str(tiny_data), planted_base=True)
    assert Path(local.base["checkpoint"]).is_file() and local.base["model_kwargs"] == {}
    assert grid.make_settings(local, prefix="finetune", storage_path=str(tmp_path), data=data).name == (
        "finetune-local"
    )
    assert (
        grid.train_config(grid.make_settings(local, prefix="x", data=data), {}).checkpoint == local.base["checkpoint"]
    )


@pytest.mark.parametrize("preset", ["paper", "schedules", "search", "scratch"])
def test_cluster_presets_make_valid_training_configs(preset, tiny_data, tmp_path):
    """Every trial config of the cluster presets validates (shapes only: no weights are loaded); the data here
    is the generated set standing in for ImageNet."""
    registry = SCRATCH_SWEEPS if preset == "scratch" else FINETUNE_SWEEPS
    settings = grid.make_settings(
        get_experiment(preset, registry),
        prefix="x",
        storage_path=str(tmp_path),
        data=str(tiny_data),
        tracking_uri="sqlite:///:memory:",
    )
    base = grid.validate(settings)
    assert base.use_gpu and base.data.backend == "ffcv" and base.tracking.tracking_uri == "sqlite:///:memory:"
    if preset == "scratch":
        configs = [grid.train_config(settings, cell) for cell in settings.preset.grid]
        assert [(c.registers, c.frozen_blocks, c.pretrained, c.epochs, c.num_workers) for c in configs] == [
            (0, 0, False, 150, 2), (4, 0, False, 150, 2)
        ]  # fmt: skip
    elif preset == "paper":
        assert base.model == DEIT3_SMALL and base.pretrained and base.epochs == 10


@pytest.mark.parametrize(
    ("registry", "name"), [(FINETUNE_SWEEPS, name) for name in FINETUNE_SWEEPS] + [(SCRATCH_SWEEPS, "scratch")]
)
def test_every_experiment_shrinks_to_a_valid_local_version(registry, name, tiny_data, tmp_path):
    """`--local`: the same experiment (a grid stays a grid, a search keeps its axes) on the tiny ViT, the CPU and
    the generated data, with no more trials; every trial config of it validates."""
    full, local = get_experiment(name, registry), get_experiment(name, registry, local=True)
    assert local.local and not full.local and local.name != full.name
    assert local.is_grid == full.is_grid and set(local.space) == set(full.space)
    assert local.trials <= full.trials
    settings = grid.make_settings(
        local, prefix="x", storage_path=str(tmp_path), data=str(tiny_data), tracking_uri="sqlite:///:memory:"
    )
    base = grid.validate(settings)
    assert not base.use_gpu and base.data.path == tiny_data.resolve() and base.epochs <= 3


def test_max_concurrent_trials_follows_the_cluster():
    config = type("C", (), {"use_gpu": True, "num_workers": 1, "cpus_per_worker": 8.0})()
    assert grid.max_concurrent_trials(config, {"GPU": 32, "TRAIN_DRIVER": 32, "CPU": 800}, 32) == 32
    assert grid.max_concurrent_trials(config, {"GPU": 8, "TRAIN_DRIVER": 32}, 32) == 8
    assert grid.max_concurrent_trials(config, {"TRAIN_DRIVER": 32, "CPU": 32}, 6) == 6  # GPU nodes not up yet
    cpu = type("C", (), {"use_gpu": False, "num_workers": 2, "cpus_per_worker": 0.5})()
    assert grid.max_concurrent_trials(cpu, {"CPU": 2, "TRAIN_DRIVER": 2}, 4) == 2
    assert grid.max_concurrent_trials(cpu, {"CPU": 64, "TRAIN_DRIVER": 8}, 4) == 2  # CPU: a small number


# --- end to end ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_head(ray_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head` on this machine (dashboard and job API on 127.0.0.1, token authentication, one
    TRAIN_DRIVER slot); yields (dashboard URL, environment for `ray job submit`) and stops the head afterwards."""
    port, dashboard_port = free_port(), free_port()
    # The tests' shared local instance stops first: Ray's state API, called in the head's workers, would otherwise
    # guess between two clusters on this machine.
    ray.shutdown()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    # RAY_ADDRESS: every process of this head finds it (the state API); no drain: SIGTERM stops it at once.
    env = {**ray_env, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            '--resources={"TRAIN_DRIVER": 1}',
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=(tmp_path / "head.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{dashboard}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # answering (e.g. 401 without the token): it is up
                break
            except OSError:
                assert time.time() < deadline, "the dashboard did not come up"
                time.sleep(1)
        yield dashboard, {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    finally:
        # `ray start --block` stops its own node on SIGTERM; `ray stop` would stop every Ray on this machine.
        end_session(head, signal.SIGTERM)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(dashboard: str, env: dict[str, str], entrypoint: list[str], *flags: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> [flags] -- entrypoint`, retried while the job agent is not up yet."""
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(REPO), *flags, "--"]
    for _ in range(30):  # the dashboard answers a little before its job agent does
        job = subprocess.run(submit + entrypoint, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent to submit job" not in job.stdout + job.stderr:
            return job
        time.sleep(2)
    raise AssertionError(f"no job agent:\n{job.stdout[-2000:]}{job.stderr[-2000:]}")


def kill_processes_running(*words: str) -> int:
    """SIGKILL every process whose command line holds all `words` (the job's entrypoint); returns how many."""
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if all(any(word in part for part in proc.info["cmdline"] or ()) for word in words):
                proc.kill()
                killed += 1
    return killed


@pytest.mark.slow
def test_sweep_job_resumes_after_its_driver_is_killed(tiny_data, ray_env, tmp_path):
    """`ray job submit --working-dir . -- python sweeps/finetune_grid.py --preset local` (2 trials of 1 epoch, one
    at a time, one worker each) against a `ray start --head` on this machine; the job's driver is SIGKILLed as soon
    as the first trial's MLflow run has finished, and the same job is submitted again: the sweep completes with 2
    trials, the first one is not trained again, and MLflow holds one parent run with exactly one child run per
    trial."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_of(uri)  # create the database now: polling it while the sweep creates it races MLflow's migrations
    results = tmp_path / "results"
    # One Ray Train worker per trial: a worker process costs seconds of imports on 2 cores, and DDP is the
    # training tests' subject (tests/test_train.py), not this one's.
    extra = ("--num-samples", "2", "--epochs", "1", "--max-concurrent", "1", "--set", "num_workers=1")
    entrypoint = ["python", "sweeps/finetune_grid.py", "--preset", "local"]
    entrypoint += sweep_command(tiny_data, results, uri, *extra)[2:]
    with ray_head(ray_env, tmp_path) as (dashboard, env):
        first = submit_job(dashboard, env, entrypoint, "--no-wait")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        deadline = time.time() + 300
        finished: list = []
        while not finished:
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(1)
            finished = [r for r in runs_of(uri)[1] if r.info.status == "FINISHED"]
        assert kill_processes_running("finetune_grid.py", str(results)) >= 1  # the driver, not the head
        first_run = finished[0]
        name = first_run.info.run_name
        checkpoint = next(results.glob(f"*/train_runs/{name}/epoch_0001/state.pt"))
        checkpoint_mtime = checkpoint.stat().st_mtime_ns
        # Rank 0 writes result.json before MLflow shows the run FINISHED: the rerun finds the trial finished and
        # starts no worker group for it (the driver would rewrite the file if it fitted again).
        result_file = checkpoint.parents[1] / "result.json"
        result_mtime = result_file.stat().st_mtime_ns

        second = submit_job(dashboard, env, entrypoint)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert "succeeded" in second.stdout

    parents, children = runs_of(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["vitreg.sweep"].startswith("finetune-local-")
    assert len(children) == 2, [c.info.run_name for c in children]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert first_run.info.run_id in {c.info.run_id for c in children}  # the same run, not a new one
    client = MlflowClient(uri)
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/top1")] == [0]
        assert {"frozen_blocks", "registers", "lambda", "schedule"} <= set(child.data.tags)
    assert checkpoint.stat().st_mtime_ns == checkpoint_mtime  # the finished trial was not trained again
    assert result_file.stat().st_mtime_ns == result_mtime  # ... nor fitted again to learn that it had finished

    # Tune: the restored experiment holds both trials, finished, with their metrics.
    from ray.tune import ExperimentAnalysis

    experiment = checkpoint.parents[3]
    trials = ExperimentAnalysis(str(experiment)).trials
    assert sorted(str(t) for t in trials) == sorted(c.info.run_name.removeprefix("train-") for c in children)
    assert all(t.status == "TERMINATED" and t.last_result.get("val/top1") is not None for t in trials)

    # The report: printed (in the job's log), written, and attached to the parent run.
    assert "Acc@1 (%)" in second.stdout and "Layers frozen" in second.stdout
    rows = list(csv.DictReader((experiment / "report" / "table.csv").open()))
    assert len(rows) == 2 and all(row["acc1"] and row["trainable_parameters"] for row in rows)
    # The embedded default starts from the planted-artifact model: its artifacts (~60x the median norm) stay
    # where lambda = 0 and fall where the penalty acts, already after one epoch of 8 steps (measured: 68 vs 55;
    # `make run`'s 3 epochs: 56 vs 14-16).
    ratio = {float(row["lambda"]): float(row["artifact/max_median_ratio"]) for row in rows}
    assert set(ratio) == {0.0, 0.01} and ratio[0.0] > 40
    assert ratio[0.01] < 0.9 * ratio[0.0]
    assert (experiment / "report" / "accuracy_vs_artifacts.png").stat().st_size > 10_000
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/table.csv", "report/accuracy_vs_artifacts.png", "report/table.txt"} <= artifacts
