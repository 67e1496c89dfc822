"""One MLflow store for train, sweeps and analysis; experiment kind; links to training runs; the compare command.

Real sqlite stores in tmp dirs; no Ray. Entry scripts are run with their expensive call (training, the sweep, the
probes) replaced by a stub that records what it was given.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from train import tracking
from train.config import TrackingConfig


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One sqlite store for the module's MLflow tests (creating a database takes seconds); names keep them apart."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/outputs/mlflow.db"


def fake_data(root: Path) -> Path:
    """A data directory that passes TrainConfig validation (class names next to empty .beton files)."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / f"{split}.beton").touch()
        (root / f"{split}.classes.json").write_text('{"classes": ["a", "b"]}')
    return root


def uris_seen_by_entry_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str]) -> dict[str, str]:
    """The tracking URI that train/finetune.py, sweeps/finetune_grid.py and analysis/run_probes.py end up with."""
    import analysis.run_probes
    import sweeps.finetune_grid
    import train.finetune
    from analysis.runner import tracking_uri as analysis_uri
    from train.driver import resolve

    data = fake_data(tmp_path / "data")
    seen: dict[str, str] = {}

    def fake_training(config, **_):
        seen["train (driver)"] = resolve(config).tracking.tracking_uri
        seen["train (worker)"] = tracking.RunTracker(resolve(config).tracking).uri
        return {}

    monkeypatch.setattr(train.finetune, "run_training", fake_training)
    monkeypatch.setattr(train.finetune, "prepare_generated_data", lambda path: path)
    train.finetune.main(["--preset", "tiny", "--set", f"data.path={data}", *flag])

    def fake_sweep(settings, **_):
        seen["sweeps"] = settings.tracking_uri
        return SimpleNamespace(trials=[])

    monkeypatch.setattr(sweeps.finetune_grid, "run_sweep", fake_sweep)
    monkeypatch.setattr(sweeps.finetune_grid, "prepare_generated_data", lambda path: data)
    assert sweeps.finetune_grid.main(["--preset", "local", *flag]) == 0

    def fake_analysis(config, **_):
        seen["analysis"] = analysis_uri(config.tracking_uri)
        return SimpleNamespace(summary="s", run_id="r", out_dir=tmp_path, report=SimpleNamespace(errors=[]))

    monkeypatch.setattr(analysis.run_probes, "run_analysis", fake_analysis)
    argv = ["run_probes.py", "--models", "planted", "--dataset", "generated", "--out", str(tmp_path / "p"), *flag]
    monkeypatch.setattr(sys, "argv", argv)
    analysis.run_probes.main()
    return seen


def test_one_default_store_env_and_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)
    default = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    assert tracking.resolve_tracking_uri() == default
    seen = uris_seen_by_entry_scripts(tmp_path, monkeypatch, [])
    assert seen == dict.fromkeys(["train (driver)", "train (worker)", "sweeps", "analysis"], default)

    env = f"sqlite:///{tmp_path}/env/mlflow.db"
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, env)
    assert set(uris_seen_by_entry_scripts(tmp_path, monkeypatch, []).values()) == {env}

    flag = f"sqlite:///{tmp_path}/flag/mlflow.db"  # the flag wins over the environment
    assert set(uris_seen_by_entry_scripts(tmp_path, monkeypatch, ["--mlflow-uri", flag]).values()) == {flag}
    relative = ["--mlflow-uri", "sqlite:///rel/m.db"]  # made absolute: workers run in other directories
    assert set(uris_seen_by_entry_scripts(tmp_path, monkeypatch, relative).values()) == {
        f"sqlite:///{tmp_path}/rel/m.db"
    }


def test_uri_resolution_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    for bad in ("file:///tmp/mlruns", "outputs/mlflow.db"):
        with pytest.raises(ValueError, match="no file store"):
            tracking.resolve_tracking_uri(bad)


def test_experiment_kind_on_created_and_reused_experiments(store_uri):
    uri = store_uri
    client = tracking.tracking_client(uri)
    created = tracking.ensure_experiment(client, uri, "vitreg-new")
    experiment = client.get_experiment(created)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    folder = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / "vitreg-new"
    assert experiment.artifact_location == folder.as_uri()
    assert tracking.ensure_experiment(client, uri, "vitreg-new") == created  # get, not create again

    # Experiments made before (no tag, or a kind the UI guessed) are retagged; a kind a person chose is kept.
    untagged = client.create_experiment("old")
    guessed = client.create_experiment("guessed", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development_inferred"})
    chosen = client.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    for name, experiment_id, kind in [
        ("old", untagged, "custom_model_development"),
        ("guessed", guessed, "custom_model_development"),
        ("chosen", chosen, "genai_development"),
    ]:
        assert tracking.ensure_experiment(client, uri, name) == experiment_id
        assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == kind, name

    # The experiments that training and a sweep create are tagged too.
    from sweeps import mlflow_runs

    tracker = tracking.RunTracker(TrackingConfig(tracking_uri=uri, experiment="vitreg-train", system_metrics=False))
    run_id = tracker.start(run_id=None, run_name="run", params={"lr": 0.1})
    tracker.finish()
    parent = mlflow_runs.open_parent(uri, "vitreg-sweep", "s", {"a": 1}, "hash")
    for run in (run_id, parent.run_id):
        experiment = client.get_experiment(client.get_run(run).info.experiment_id)
        assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development", experiment.name


def test_training_run_tags_link_probe_runs(store_uri, caplog):
    import mlflow

    uri = store_uri
    client = tracking.tracking_client(uri)
    train_experiment = tracking.ensure_experiment(client, uri, "vitreg-train")
    first = client.create_run(train_experiment, run_name="a").info.run_id
    second = client.create_run(train_experiment, run_name="b").info.run_id

    tags = tracking.training_run_tags(client, {"s4": first})
    assert tags[tracking.TRAINING_RUN_TAG] == first
    assert tags[tracking.PARENT_RUN_TAG] == first
    assert f"[{first}](#/experiments/{train_experiment}/runs/{first})" in tags[tracking.RUN_NOTE_TAG]
    # As analysis/runner.py opens its run: the fluent API in another experiment keeps the link.
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(client, uri, "vitreg-analysis"), tags=tags) as run:
        pass
    probe = client.get_run(run.info.run_id)
    assert probe.data.tags[tracking.PARENT_RUN_TAG] == first
    assert probe.data.tags[tracking.TRAINING_RUN_TAG] == first

    two = tracking.training_run_tags(client, {"a": first, "b": second, "a-again": first})
    assert two[tracking.TRAINING_RUN_TAG] == f"{first},{second}"
    assert tracking.PARENT_RUN_TAG not in two  # a run has one parent: several training runs are tags only

    missing = "0" * 32
    with caplog.at_level(logging.WARNING, logger="train.tracking"):
        alone = tracking.training_run_tags(client, {"x": missing})
    assert alone[tracking.TRAINING_RUN_TAG] == missing and tracking.PARENT_RUN_TAG not in alone
    assert "not in this MLflow store" in caplog.text
    assert tracking.training_run_tags(client, {}) == {}


# -- the compare command on two sweeps written directly to MLflow, as the sweep and the training loop write them --

LAMBDA = {"harmonic": lambda lam, e: lam / (e + 1), "constant": lambda lam, e: lam}
# sweep -> trials: (cell, frozen blocks, registers, lambda, schedule, trainable parameters, per-epoch (acc1, acc5,
# high-norm fraction, outlier fraction))
SWEEPS = {
    "sweep-a": [
        ("f10-r4-l0.1-harmonic", 10, 4, 0.1, "harmonic", 1234, [(50.0, 80.0, 0.20, 0.10), (61.5, 88.25, 0.05, 0.02)]),
        ("f10-r4-l0.01", 10, 4, 0.01, "constant", 1234, [(52.0, 81.0, 0.30, 0.15), (60.25, 87.0, 0.12, 0.06)]),
    ],
    "sweep-b": [
        ("f11-r0-l0", 11, 0, 0.0, "constant", 999, [(55.0, 83.0, 0.40, 0.30), (63.75, 89.5, 0.41, 0.33)]),
        ("f8-r1-l0.1", 8, 1, 0.1, "constant", 5678, [(40.0, 70.0, 0.25, 0.20), (58.0, 86.0, 0.01, 0.0)]),
    ],
}


def epoch_metrics(epoch: int, lam: float, values: tuple[float, float, float, float]) -> dict[str, float]:
    acc1, acc5, high_norm, outliers = values
    return {
        "epoch": epoch,
        "train/loss": 1.0 / (epoch + 1),
        "train/lambda": lam,
        "val/top1": acc1,
        "val/top5": acc5,
        "artifact/high_norm_fraction": high_norm,
        "artifact/outlier_fraction": outliers,
        "artifact/max_median_ratio": 10 * high_norm + 1,
        "artifact/cls_attention_entropy": 0.5,
    }


@pytest.fixture(scope="module")
def store(store_uri):
    """Two sweeps: a parent run each (sweeps.mlflow_runs.open_parent) with child runs logged by RunTracker."""
    from sweeps import mlflow_runs

    uri = store_uri
    parents = {}
    for sweep, trials in SWEEPS.items():
        parent = mlflow_runs.open_parent(uri, f"vitreg-{sweep}", sweep, {"grid": sweep}, "hash")
        parents[sweep] = parent
        for cell, frozen, registers, lam, schedule, trainable, epochs in trials:
            tracker = tracking.RunTracker(TrackingConfig(tracking_uri=uri, system_metrics=False))
            params = {
                "frozen_blocks": frozen,
                "registers": registers,
                "penalty_lambda": lam,
                "lambda_schedule": schedule,
                "epochs": len(epochs),
                "model_info": {"trainable_parameters": trainable, "depth": 12},
            }
            tracker.start(run_id=None, run_name=f"train-{cell}", params=params, parent_run_id=parent.run_id)
            history = [epoch_metrics(e, LAMBDA[schedule](lam, e), v) for e, v in enumerate(epochs)]
            tracker.finish(history)
        mlflow_runs.close_parent(uri, parent, "FINISHED")
    return SimpleNamespace(uri=uri, parents=parents)


def test_compare_two_sweeps_known_answer(store, tmp_path):
    import matplotlib.image
    from mlflow.tracking import MlflowClient

    from sweeps import compare

    by_id = store.parents["sweep-b"].run_id  # one sweep by name, one by parent run id
    out = tmp_path / "cmp"
    assert compare.main(["sweep-a", by_id, "--mlflow-uri", store.uri, "--out", str(out)]) == 0
    with (out / "table.csv").open() as handle:
        rows = list(csv.DictReader(handle))

    # Table 8 order: frozen blocks descending, then registers, lambda; last-epoch values as logged.
    expected = [
        ("sweep-b", "f11-r0-l0", "11", "0", "999", "0.0", "constant", "63.75", "89.5", "0.41", "0.33"),
        ("sweep-a", "f10-r4-l0.01", "10", "4", "1234", "0.01", "constant", "60.25", "87.0", "0.12", "0.06"),
        ("sweep-a", "f10-r4-l0.1-harmonic", "10", "4", "1234", "0.1", "harmonic", "61.5", "88.25", "0.05", "0.02"),
        ("sweep-b", "f8-r1-l0.1", "8", "1", "5678", "0.1", "constant", "58.0", "86.0", "0.01", "0.0"),
    ]
    keys = ["sweep", "trial", "frozen_blocks", "registers", "trainable_parameters", "lambda", "schedule", "acc1"]
    keys += ["acc5", "artifact/high_norm_fraction", "artifact/outlier_fraction"]
    assert [tuple(row[k] for k in keys) for row in rows] == expected
    assert all(row["epochs"] == "2" and row["status"] == "FINISHED" for row in rows)

    text = (out / "table.txt").read_text()
    assert "Acc@1 (%)" in text and "sweep" in text.splitlines()[0]
    assert "63.75*" in text and "61.50*" in text and "1,234" in text  # best per frozen-blocks group, grouped digits

    # The schedule figure: each drawn line is the run's logged history, in the schedule's column.
    lines = {}
    for sweep, trials in SWEEPS.items():
        for _cell, frozen, registers, lam, schedule, _, epochs in trials:
            label = f"λ={lam:.2f} reg{registers} frozen{frozen} [{sweep}]"
            lines[(schedule, "train/lambda", label)] = ((0.0, 1.0), tuple(LAMBDA[schedule](lam, e) for e in (0, 1)))
            lines[(schedule, "artifact/high_norm_fraction", label)] = ((0.0, 1.0), tuple(v[2] for v in epochs))
            ratios = tuple(10 * v[2] + 1 for v in epochs)  # as logged by epoch_metrics
            lines[(schedule, "artifact/max_median_ratio", label)] = ((0.0, 1.0), ratios)
            lines[(schedule, "val/top1", label)] = ((0.0, 1.0), tuple(v[0] for v in epochs))
    plotted = compare.compare_sweeps(["sweep-a", by_id], tmp_path / "again", store.uri).plotted
    assert plotted.keys() == lines.keys()
    for key, (x, y) in lines.items():
        assert plotted[key][0] == x and plotted[key][1] == pytest.approx(y, abs=1e-12), key
    image = matplotlib.image.imread(out / "lambda_schedules.png")
    assert image.shape[0] > 400 and image.shape[1] > 600 and image[..., :3].std() > 0.05  # a drawn figure

    # Logged to MLflow (once per call): runs in experiment vitreg-compare, tagged with the sweeps, holding the files.
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name("vitreg-compare")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], "tags.`vitreg.compared_sweeps` = 'sweep-a,sweep-b'")
    assert len(runs) == 2
    for run in runs:
        assert run.info.run_name == "compare-sweep-a+sweep-b" and run.info.status == "FINISHED"
        assert run.data.tags["vitreg.compared_sweeps"] == "sweep-a,sweep-b"
        assert run.data.tags["vitreg.compared_parent_run_ids"] == f"{store.parents['sweep-a'].run_id},{by_id}"
        logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "compare")}
        assert logged == {"table.txt", "table.csv", "accuracy_vs_artifacts.png", "lambda_schedules.png"}


def test_compare_refuses_what_is_not_a_sweep(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from sweeps import compare, mlflow_runs

    with pytest.raises(mlflow_runs.SweepNotFound, match=r"no sweep named 'nope'.*sweep-a, sweep-b"):
        compare.compare_sweeps(["nope"], tmp_path, store.uri)
    child = mlflow_runs.child_runs(store.uri, store.parents["sweep-a"])[0].info.run_id
    with pytest.raises(mlflow_runs.SweepNotFound, match="not a sweep's parent run"):
        compare.compare_sweeps([child], tmp_path, store.uri)
    with pytest.raises(ValueError, match="measures: unknown"):
        compare.compare_sweeps(["sweep-a"], tmp_path, store.uri, measures=["val/top1"])

    # Two sweeps of one name (in two experiments): the name is ambiguous; their run ids are listed.
    ids = [mlflow_runs.open_parent(store.uri, f"exp-{i}", "same", {}, "h").run_id for i in range(2)]
    with pytest.raises(mlflow_runs.SweepNotFound, match="taken by 2 parent runs") as error:
        compare.compare_sweeps(["same"], tmp_path, store.uri)
    assert all(run_id in str(error.value) for run_id in ids)
    with pytest.raises(SystemExit):  # the command says so and stops
        compare.main(["same", "--mlflow-uri", store.uri, "--out", str(tmp_path)])
    client = MlflowClient(store.uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments, "tags.`vitreg.compared_sweeps` = 'same'") == []  # nothing logged


# --- the MLflow server going down mid-run (a real `mlflow server`, stopped and started again) -------------------


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` over a sqlite store; returns once it answers /health."""
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "art"),
        "--workers", "1",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert server.poll() is None, f"mlflow server exited with {server.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not answer /health within 120 s")


def stop_mlflow_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # its whole session: the server and its uvicorn worker
    server.wait(timeout=30)


@pytest.mark.slow
def test_a_server_down_mid_run_loses_nothing_and_back_fills_when_it_returns(tmp_path, caplog, monkeypatch):
    """Epoch 0 is logged, the server dies, epoch 1 cannot be logged (retried, then a warning, training goes on),
    the server comes back: `finish` back-fills epoch 1, and the run holds each epoch once, its params and FINISHED."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    settings = TrackingConfig(
        tracking_uri=uri, experiment="outage", system_metrics=False, retries=2, retry_backoff_s=0.01,
        http_timeout_s=60, http_max_retries=0,
    )  # fmt: skip
    # A dead server refuses the connection at once; the timeout only has to outlast a slow answer on a busy machine.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    history = [{"epoch": 0, "val/top1": 12.5}, {"epoch": 1, "val/top1": 25.0}]
    try:
        tracker = tracking.RunTracker(settings)
        run_id = tracker.start(run_id=None, run_name="outage", params={"lr": 0.1})
        assert run_id is not None
        tracker.log_history(history[:1])
        stop_mlflow_server(server)

        with caplog.at_level(logging.WARNING, logger=tracking.logger.name):
            tracker.log_history(history)  # epoch 1: the server is down
        assert not tracker.online and "training goes on" in caplog.text

        server = start_mlflow_server(tmp_path, port)
        tracker.finish(history)
        client = tracking.tracking_client(uri)
        points = client.get_metric_history(run_id, "val/top1")
        assert [(p.step, p.value) for p in points] == [(0, 12.5), (1, 25.0)]  # each epoch once, none lost
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    finally:
        if server.poll() is None:
            stop_mlflow_server(server)
