"""A training run probed as itself: `run:` and `mlflow:` model specs, sweeps' trials, the fine-tuned figures' data.

The training run is tests/conftest.py's `tracked_run` (the tiny preset, 2 epochs, 2 Ray Train workers, FFCV data,
MLflow in a sqlite store), which tests/test_train.py checks as a run; every known answer is read from its
checkpoints' state.pt files, the weights at the end of each epoch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from oracles import explicit_prefix_attention

import vitreg
from analysis import runs
from analysis.finetune_figures import (
    attention_summary,
    progression_across_figure,
    progression_figure,
    progression_panels,
    schedule_panels,
    schedules_figure,
)
from analysis.probe_sweep import main as probe_sweep
from analysis.specs import ModelSpecError, load_model, parse_model_spec
from train.checkpoints import MODEL_FILE, STATE_FILE
from train.config import TrainConfig
from train.data import IMAGENET_MEAN, IMAGENET_STD, generate_dataset
from train.driver import CONFIG_FILE, RESULT_FILE
from train.loop import MLFLOW_RUN_ID_FILE
from train.tracking import PARENT_RUN_TAG, TRAINING_RUN_TAG, ensure_experiment

pytestmark = pytest.mark.slow  # the Ray training run they probe
LAST = "epoch_0002"  # the run's last checkpoint, after its 2 epochs (a checkpoint is named after the next epoch)


@pytest.fixture(scope="module")
def trained(tracked_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trained run's directory, result, config and MLflow store. The store is a copy (the same runs, the same
    artifact folders), so that the runs these tests log stay out of the store tests/test_train.py counts runs in."""
    tmp = tmp_path_factory.mktemp("probe_runs")
    store = Path(tracked_run["config"].tracking.tracking_uri.removeprefix("sqlite:///"))
    shutil.copy(store, tmp / "mlflow.db")
    result = tracked_run["result"]
    run_dir = Path(result["path"])
    assert Path(result["checkpoint_path"]) == run_dir / LAST  # the checkpoints these tests name
    return {"run_dir": run_dir, "result": result, "config": tracked_run["config"], "uri": f"sqlite:///{tmp}/mlflow.db"}


def images(count: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def trained_state(run_dir: Path, checkpoint: str = LAST) -> dict[str, torch.Tensor]:
    """The weights of `checkpoint` (by default the end of training), straight from its state.pt."""
    return torch.load(run_dir / checkpoint / STATE_FILE, map_location="cpu", weights_only=True)["model"]


def rebuilt(config: TrainConfig, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The model of `config` built as training builds it, then given `state` (None: left at its init)."""
    torch.manual_seed(123)
    model = vitreg.build_model(
        config.model,
        img_size=config.img_size,
        registers=config.registers,
        register_init_std=config.register_init_std,
        num_classes=config.num_classes,
        **config.model_kwargs,
    )
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def assert_is_trained_model(model: torch.nn.Module, run_dir: Path, config: TrainConfig, checkpoint: str = LAST) -> None:
    state = trained_state(run_dir, checkpoint)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert vitreg.count_registers(model) == 4 and loaded["reg_token"].shape == (1, 4, 64)
    assert model.head.out_features == 4
    with torch.no_grad():
        logits = model.eval()(images())
        reference = rebuilt(config, state)(images())
        untrained = rebuilt(config, None)(images())
    assert torch.equal(logits, reference)
    assert not torch.allclose(logits, untrained, atol=1e-3)  # the known answer is not what any model gives


# ---------------------------------------------------------------------------------------------------------------
# run: and mlflow: specs
# ---------------------------------------------------------------------------------------------------------------


def test_file_names_are_the_trainings() -> None:
    assert (runs.CONFIG_FILE, runs.RESULT_FILE) == (CONFIG_FILE, RESULT_FILE)
    assert (runs.STATE_FILE, runs.MODEL_FILE, runs.MLFLOW_RUN_ID_FILE) == (STATE_FILE, MODEL_FILE, MLFLOW_RUN_ID_FILE)


def test_run_spec_is_the_model_at_the_end_of_training(trained: dict) -> None:
    run_dir, config = trained["run_dir"], trained["config"]
    spec = parse_model_spec(f"run:{run_dir}")
    assert spec.label == "tiny-ffcv"
    assert Path(spec.checkpoint) == run_dir / LAST / MODEL_FILE  # the model file training writes
    assert (spec.name, spec.registers, spec.num_classes, spec.img_size) == ("vit_tiny_patch16_224", 4, 4, 32)
    assert spec.model_kwargs == config.model_kwargs
    assert spec.training_run_id == trained["result"]["mlflow_run_id"] is not None
    model, mean, std = load_model(spec)
    assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)  # what training normalised with, not timm's (0.5, 0.5, 0.5)
    assert_is_trained_model(model, run_dir, config)


def test_mlflow_spec_finds_the_run_through_its_storage_tag(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = trained["result"]["mlflow_run_id"]
    spec = parse_model_spec(f"mlflow:{run_id}:label=ft", tracking_uri=trained["uri"])
    assert (spec.label, spec.run_dir, spec.training_run_id) == ("ft", str(trained["run_dir"]), run_id)
    assert_is_trained_model(load_model(spec)[0], trained["run_dir"], trained["config"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])  # the same store, from the environment
    assert parse_model_spec(f"mlflow:{run_id}@2").checkpoint == spec.checkpoint


def test_checkpoints_are_chosen_by_name_or_epoch(trained: dict) -> None:
    run_dir = trained["run_dir"]
    # The first of the run's two checkpoints: the model after epoch 0, not the last one.
    named = [parse_model_spec(text) for text in (f"run:{run_dir}@epoch_0001", f"run:{run_dir}@1")]
    named.append(parse_model_spec(f"run:{run_dir}/epoch_0001"))
    assert {spec.checkpoint for spec in named} == {str(run_dir / "epoch_0001" / MODEL_FILE)}
    assert {spec.label for spec in named} == {"tiny-ffcv@epoch_0001"}
    assert_is_trained_model(load_model(named[0])[0], run_dir, trained["config"], "epoch_0001")
    assert parse_model_spec(f"run:{run_dir}:img_size=64").img_size == 64
    with pytest.raises(ModelSpecError, match=r"no checkpoint 'epoch_0003'.*checkpoints: epoch_0001, epoch_0002"):
        parse_model_spec(f"run:{run_dir}@epoch_0003")


def test_unfinished_run_needs_a_named_checkpoint(trained: dict, tmp_path: Path) -> None:
    copy = shutil.copytree(trained["run_dir"], tmp_path / "unfinished")
    (copy / RESULT_FILE).unlink()
    with pytest.raises(ModelSpecError, match=r"has not finished.*@epoch_0002"):
        parse_model_spec(f"run:{copy}")
    spec = parse_model_spec(f"run:{copy}@2")
    assert spec.training_run_id == trained["result"]["mlflow_run_id"]  # from the mlflow_run_id file


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (":registers=2", r"bad option 'registers=2' \(a training run's model has its own"),
        (":random", "bad option 'random'"),
        (":img_size=x", "img_size='x' is not an integer"),
    ],
)
def test_bad_run_options_fail_naming_them(trained: dict, tail: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        parse_model_spec(f"run:{trained['run_dir']}{tail}")


def test_missing_runs_fail_naming_them(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=f"{tmp_path / 'nothing'} does not exist"):
        parse_model_spec(f"run:{tmp_path / 'nothing'}")
    with pytest.raises(ModelSpecError, match=f"{tmp_path} is not a training run directory"):
        parse_model_spec(f"run:{tmp_path}")
    with pytest.raises(ModelSpecError, match=r"MLflow run '0{32}' not found"):
        parse_model_spec(f"mlflow:{'0' * 32}", tracking_uri=trained["uri"])


def test_a_checkpoint_without_model_file_loads_from_its_state(trained: dict, tmp_path: Path) -> None:
    """Runs from before training wrote model files: state.pt holds the same model."""
    copy = shutil.copytree(trained["run_dir"], tmp_path / "state_only")
    (copy / LAST / MODEL_FILE).unlink()
    spec = parse_model_spec(f"run:{copy}")
    assert Path(spec.checkpoint) == copy / LAST / STATE_FILE
    assert_is_trained_model(load_model(spec)[0], copy, trained["config"])


def test_a_model_file_that_disagrees_with_its_run_config_is_refused(trained: dict, tmp_path: Path) -> None:
    copy = shutil.copytree(trained["run_dir"], tmp_path / "edited")
    config = json.loads((copy / CONFIG_FILE).read_text())
    (copy / CONFIG_FILE).write_text(json.dumps({**config, "num_classes": 5}))
    with pytest.raises(ModelSpecError, match=r"not the model its run's config.json describes \(num_classes: config 5"):
        parse_model_spec(f"run:{copy}")


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: trials by directory, by name under the storage, by MLflow parent run
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def sweep(trained: dict, tmp_path: Path) -> Path:
    """`<storage>/s1/train_runs/` with trial `a` (the trained run) and trial `b` (the same, unfinished)."""
    train_runs = tmp_path / "storage" / "s1" / runs.SWEEP_TRAIN_RUNS
    shutil.copytree(trained["run_dir"], train_runs / "train-a")
    (shutil.copytree(trained["run_dir"], train_runs / "train-b") / RESULT_FILE).unlink()
    return train_runs.parent


def test_sweep_trials_by_directory_and_name(sweep: Path) -> None:
    for ref, storage in ((str(sweep), None), (str(sweep / runs.SWEEP_TRAIN_RUNS), None), ("s1", sweep.parent)):
        name, trials = runs.find_trials(ref, storage)
        assert name == "s1"
        assert [(trial.name, trial.finished) for trial in trials] == [("a", True), ("b", False)]


def test_sweep_trials_by_mlflow_parent_run(trained: dict, sweep: Path) -> None:
    client = MlflowClient(trained["uri"])
    experiment = ensure_experiment(client, trained["uri"], "sweeps-here")  # artifacts beside the store
    parent = client.create_run(experiment, tags={runs.SWEEP_ROLE_TAG: "sweep", runs.SWEEP_NAME_TAG: "s-ml"})
    for trial in ("a", "b"):
        tags = {runs.STORAGE_TAG: str(sweep / runs.SWEEP_TRAIN_RUNS / f"train-{trial}")}
        tags[PARENT_RUN_TAG] = parent.info.run_id
        client.create_run(experiment, tags=tags, run_name=f"train-{trial}")
    for ref in ("s-ml", parent.info.run_id):
        name, trials = runs.find_trials(ref, sweep.parent / "elsewhere", trained["uri"])
        assert name == "s-ml"
        assert [(trial.name, trial.run_dir, trial.finished) for trial in trials] == [
            ("a", sweep / runs.SWEEP_TRAIN_RUNS / "train-a", True),
            ("b", sweep / runs.SWEEP_TRAIN_RUNS / "train-b", False),
        ]
    with pytest.raises(runs.RunError, match="no sweep directory, sweep name or sweep parent run id 'nope'"):
        runs.find_trials("nope", sweep.parent, trained["uri"])


# ---------------------------------------------------------------------------------------------------------------
# The fine-tuned figures' data, against an explicit forward pass
# ---------------------------------------------------------------------------------------------------------------


def explicit_attention(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Written out from the blocks' weights (`oracles.explicit_prefix_attention`): per block the head-mean rows of
    CLS and the registers over the patches (each rescaled to sum 1) and the [CLS] norm of the block's output.

    Returns: CLS maps (B, L, N), CLS norms (B, L), last-block register maps (B, R, N).
    """
    rows, norms, _ = explicit_prefix_attention(model, x)  # (B, L, P, T), (B, L, T)
    patches = rows[..., rows.shape[2] :]
    patches = patches / patches.sum(dim=-1, keepdim=True)
    return patches[:, :, 0].numpy(), norms[:, :, 0].numpy(), patches[:, -1, 1:].numpy()


def test_figure_panels_hold_the_explicit_attention_and_cls_norms(trained: dict, tmp_path: Path) -> None:
    fine_tuned = load_model(parse_model_spec(f"run:{trained['run_dir']}"))[0]
    plain = vitreg.build_model("vit_tiny_patch16_224", img_size=32, num_classes=4, **trained["config"].model_kwargs)
    batch = images(2)
    pixels = np.random.default_rng(0).random((2, 32, 32, 3))
    summaries = [
        attention_summary(model.eval(), batch, pixels, label) for model, label in ((fine_tuned, "ft"), (plain, "plain"))
    ]
    cls_maps, cls_norms, register_maps = explicit_attention(fine_tuned, batch)
    plain_maps, _, _ = explicit_attention(plain, batch)
    assert summaries[0].layers == [0, 1, 2, 3] and summaries[0].cls_maps.shape == (2, 4, 4, 4)

    for image in range(2):
        maps, norms = progression_panels(summaries[0], image)  # one row of the progression figure
        np.testing.assert_allclose(maps.reshape(4, 16), cls_maps[image], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(norms, cls_norms[image], rtol=1e-5)
        panels = schedule_panels(summaries, image)  # (1 + 4 registers, 2 models, 4, 4)
        assert panels.shape == (5, 2, 4, 4)
        np.testing.assert_allclose(panels[0, 0].ravel(), cls_maps[image, -1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(panels[1:, 0].reshape(4, 16), register_maps[image], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(panels[0, 1].ravel(), plain_maps[image, -1], rtol=1e-5, atol=1e-7)
        assert np.isnan(panels[1:, 1]).all()  # the plain model has no registers
    np.testing.assert_allclose(summaries[0].cls_maps.sum(axis=(-2, -1)), 1.0, rtol=1e-5)

    # The drawings lay these panels out; they must draw from them without error.
    progression_figure(summaries[0], tmp_path / "progression.png")
    progression_across_figure(summaries, 0, tmp_path / "across.png")
    schedules_figure(summaries, 0, tmp_path / "schedules.png")


# ---------------------------------------------------------------------------------------------------------------
# The command (last: it shuts Ray down when done)
# ---------------------------------------------------------------------------------------------------------------


def test_probe_sweep_probes_every_finished_trial_and_tags_its_training_run(trained: dict, sweep: Path) -> None:
    out = sweep.parent / "probes"
    probe_sweep([str(sweep), "--out", str(out), "--mlflow-uri", trained["uri"], "--probes", "norms"])
    models = (out / "models.csv").read_text().splitlines()
    assert len(models) == 2 and models[1].startswith("a,")  # trial b has not finished: left out
    figures = sorted(path.name for path in (out / "finetune").iterdir())
    assert figures == [
        "last_block_cls_vs_registers_image0.png",
        "last_block_cls_vs_registers_image1.png",
        "progression_a.png",
        "progression_all_image0.png",
        "progression_all_image1.png",
    ]
    client = MlflowClient(trained["uri"])
    config = json.loads((out / "config.json").read_text())
    assert config["models"][0]["training_run_id"] == trained["result"]["mlflow_run_id"]
    (probe_run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`vitreg.probed_sweep` = 's1'"
    )
    assert probe_run.data.tags[TRAINING_RUN_TAG] == trained["result"]["mlflow_run_id"]
    assert probe_run.data.tags[PARENT_RUN_TAG] == trained["result"]["mlflow_run_id"]  # one training run: linked


def test_sweep_probes_default_to_the_trials_validation_images(tmp_path: Path) -> None:
    """An image-folder data set's `val/`, else the generated set's `images/val/` beside its .beton files."""
    from types import SimpleNamespace

    from analysis.data import DataError
    from analysis.probe_sweep import default_data
    from analysis.runs import Trial

    generated = tmp_path / "generated"
    generate_dataset(generated / "images", num_classes=2, train_per_class=1, val_per_class=2, image_size=16)
    trials = [Trial("a", tmp_path / "a")]
    assert default_data(trials, [SimpleNamespace(config={"data": {"path": str(generated)}})]).root == str(
        generated / "images" / "val"
    )
    assert default_data(trials, [SimpleNamespace(config={"data": {"path": str(generated / "images")}})]).root == str(
        generated / "images" / "val"
    )
    with pytest.raises(DataError, match="pass --images or --dataset"):
        default_data(trials, [SimpleNamespace(config={"data": {"path": str(tmp_path / "none")}})])
