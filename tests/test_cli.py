"""The entry scripts' command line: `--help` lists every config field with its default and allowed values (and they
agree with what `TrainConfig` accepts), `--dry-run` validates and prints without starting anything, bad values
exit non-zero with the config's message, and the flags are spelled the same everywhere. In-process, no Ray."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path
from unittest import mock

import pytest

import analysis.probe_sweep
import analysis.run_probes
import sweeps.finetune_grid
import sweeps.scratch
import train.finetune
import train.scratch
from train import cli
from train.config import (
    EVAL_PREPROCESSING,
    LR_SCHEDULE_UNITS,
    PRECISIONS,
    REGISTER_ENTRIES,
    TrackingConfig,
    TrainConfig,
    merge,
)
from train.data import DataConfig
from train.data.config import BACKENDS
from train.data.eval_transform import EVAL_INTERPOLATIONS
from train.experiments import training_values
from vitreg.schedules import SCHEDULES

TRAIN_MAINS = [train.finetune.main, train.scratch.main]
SWEEP_MAINS = [sweeps.finetune_grid.main, sweeps.scratch.main]
CLASSES = ("cat", "dog", "eel")
# What the validation checks each fixed-choice field against (written out here, not taken from train/cli.py).
VALIDATION_CONSTANTS = {
    "register_entry": REGISTER_ENTRIES,
    "lambda_schedule": SCHEDULES,
    "lr_schedule_unit": LR_SCHEDULE_UNITS,
    "precision": PRECISIONS,
    "eval_preprocessing": EVAL_PREPROCESSING,
    "data.backend": BACKENDS,
    "data.eval_interpolation": EVAL_INTERPOLATIONS,
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder data set with 3 (empty) classes: all validation reads is the list of classes."""
    root = tmp_path_factory.mktemp("images")
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
    return root


def run_main(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str, str]:
    """(exit code or return value, stdout, stderr) of an entry script's `main(argv)`."""
    try:
        result = main(argv)
    except SystemExit as exit_:
        result = exit_.code
    out, err = capsys.readouterr()
    return result, out, err


def expected_rows() -> list[tuple[str, object]]:
    """Every key --set takes, with its class default, straight from the dataclasses."""
    rows = []
    for spec in fields(TrainConfig):
        nested = {"data": DataConfig, "tracking": TrackingConfig}.get(spec.name)
        if nested is None:
            rows.append((spec.name, spec.default if spec.default is not MISSING else spec.default_factory()))
        else:
            for inner in fields(nested):
                default = inner.default if inner.default is not MISSING else inner.default_factory()
                rows.append((f"{spec.name}.{inner.name}", default))
    return rows


@pytest.mark.parametrize("main", TRAIN_MAINS + SWEEP_MAINS, ids=lambda m: m.__module__)
def test_help_lists_every_config_field_with_its_default_and_allowed_values(main, capsys):
    code, out, _ = run_main(main, ["--help"], capsys)
    assert code == 0
    listed = {}
    for line in out.splitlines():
        if line.startswith("  ") and " = " in line and not line.startswith("   "):
            key, _, rest = line.strip().partition(" = ")
            listed[key] = rest
    rows = expected_rows()
    assert len(rows) == len(fields(TrainConfig)) - 2 + len(fields(DataConfig)) + len(fields(TrackingConfig))
    assert set(listed) == {key for key, _ in rows}
    for key, default in rows:
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        allowed = VALIDATION_CONSTANTS.get(key)
        assert listed[key] == (f"{shown}  {{{', '.join(allowed)}}}" if allowed else shown), key
    # A few by hand, so that a wrong default cannot hide behind the same reading of the dataclasses.
    assert listed["precision"] == '"bf16"  {bf16, fp16, fp32}'
    assert listed["betas"] == "[0.9, 0.999]" and listed["data.path"] == "null" and listed["tracking.retries"] == "3"
    assert "freeze the patch embedding and this many first blocks" in out  # the docstring's text of frozen_blocks


def test_allowed_values_are_the_validation_constants():
    assert dict(cli.ALLOWED_VALUES) == VALIDATION_CONSTANTS
    assert all(cli.ALLOWED_VALUES[key] is constant for key, constant in VALIDATION_CONSTANTS.items())


@pytest.mark.parametrize("key", sorted(VALIDATION_CONSTANTS))
def test_help_and_validation_agree(key, image_folder):
    """Every value the help lists is accepted by TrainConfig; one outside them is rejected, naming the field."""
    # The tiny preset, as a DeiT-III (ImageNet normalisation, which eval_preprocessing='timm' needs).
    values = {"model": "deit3_small_patch16_224", "warmup_epochs": 1, "data": {"path": str(image_folder)}}
    base = merge(training_values("tiny"), values)
    base["data"]["backend"] = "imagefolder"

    def build(value: object) -> None:
        section, _, name = key.rpartition(".")
        TrainConfig.from_dict(merge(base, {section: {name: value}} if section else {name: value}))

    for value in cli.ALLOWED_VALUES[key]:
        try:
            build(value)
        except ValueError as error:  # ffcv reads .beton files this folder lacks: a data error, not this field's
            assert not str(error).startswith(f"{key}="), error
    with pytest.raises(ValueError, match=rf"^{key}='fp8': .*{cli.ALLOWED_VALUES[key][0]}"):
        build("fp8")


def test_train_dry_run_prints_the_validated_config_and_starts_nothing(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would show here
    # Nothing starts: connecting to Ray or fitting would fail here (a test before may have left Ray running).
    ray = pytest.importorskip("ray")
    from ray.train.torch import TorchTrainer

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run started Ray or a training run")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(TorchTrainer, "fit", started)
    storage = tmp_path / "runs"
    argv = ["--data", str(image_folder), "--set", "data.backend=imagefolder", "--set", "lr=0.0002"]
    result, out, _ = run_main(train.finetune.main, [*argv, "--storage", str(storage), "--dry-run"], capsys)
    printed = json.loads(out)
    want = {"lr": 0.0002, "data": {"backend": "imagefolder", "path": str(image_folder)}}
    assert printed == TrainConfig.from_preset("finetune", want).to_dict() == result["config"]
    assert printed["num_classes"] == len(CLASSES) and printed["data"]["path"] == str(image_folder.resolve())
    assert printed["frozen_blocks"] == 10 and printed["model"] == "deit3_small_patch16_224.fb_in22k_ft_in1k"
    assert list(tmp_path.iterdir()) == []  # no storage, no outputs/mlflow.db, no run directory

    # train/scratch.py: the same with its own preset; --set data.path= still works, --data wins over it.
    _, out, _ = run_main(train.scratch.main, ["--set", f"data.path={image_folder}", *argv[2:], "--dry-run"], capsys)
    assert json.loads(out)["frozen_blocks"] == 0 and json.loads(out)["data"]["path"] == str(image_folder.resolve())
    other = tmp_path / "elsewhere"
    _, out, _ = run_main(train.scratch.main, ["--set", f"data.path={other}", *argv, "--dry-run"], capsys)
    assert json.loads(out)["data"]["path"] == str(image_folder.resolve())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "precision=fp8"], "precision='fp8': allowed: bf16, fp16, fp32"),
        (["--set", "frozen_blocks=13"], "frozen_blocks=13: must be in 0..12"),
        (["--set", "data.eval_interpolation=nearest"], "data.eval_interpolation='nearest': allowed bicubic, bilinear"),
        (["--set", "lr"], "override 'lr': expected key=value"),
        (["--set", "epoch=3"], "unknown TrainConfig field(s) epoch"),
    ],
)
@pytest.mark.parametrize("main", [train.finetune.main, sweeps.finetune_grid.main], ids=["train", "sweep"])
def test_bad_values_exit_2_with_the_config_message(main, flags, message, image_folder, capsys):
    argv = ["--data", str(image_folder), "--set", "data.backend=imagefolder", *flags, "--dry-run"]
    if main is sweeps.finetune_grid.main:
        argv += ["--preset", "paper"]
    code, out, err = run_main(main, argv, capsys)
    assert code == 2 and message in err and out == ""


def test_a_sweep_without_data_fails_naming_data_path(capsys):
    code, out, err = run_main(sweeps.finetune_grid.main, ["--preset", "paper", "--dry-run"], capsys)
    assert code == 2 and "data.path=None: required, the data directory" in err and out == ""


# Table 8's trainable parameters (1000 classes; tests/test_sweeps.py builds them), here with a 3-class head instead:
# the head holds 384 x classes weights + classes biases.
TABLE_8 = {(11, 0): 2_236_648, (11, 4): 2_238_184, (10, 0): 4_011_880, (10, 4): 4_013_416, (9, 0): 5_787_112,
           (9, 4): 5_788_648, (8, 0): 7_562_344, (8, 4): 7_563_880}  # fmt: skip


def head(classes: int) -> int:
    return 384 * classes + classes


def table_rows(out: str) -> dict[str, list[str]]:
    """cell -> [epochs, trainable parameters, GPU-hours] from a sweep dry run's table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) == 4 and parts[0] != "cell":
            rows[parts[0]] = parts[1:]
    return rows


def test_sweep_dry_run_lists_cells_parameters_and_gpu_hours(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "paper", "--data", str(image_folder), "--set", "data.backend=imagefolder", "--dry-run"]
    code, out, _ = run_main(sweeps.finetune_grid.main, [*argv, "--storage", str(tmp_path / "s")], capsys)
    assert code == 0
    rows = table_rows(out)
    cells = {name: values for name, values in rows.items() if name.startswith("frozen")}
    assert len(cells) == 33
    for (frozen, registers), parameters in TABLE_8.items():
        for lam in ("0.01", "0.1"):
            epochs, trainable, hours = cells[f"frozen{frozen}-reg{registers}-lam{lam}"]
            assert int(trainable.replace(",", "")) == parameters - head(1000) + head(len(CLASSES))
            assert (int(epochs), float(hours)) == (10, 2.0)  # 10 epochs x 0.2 GPU-h (the study's ~2 h per fine-tune)
    assert cells["frozen12-reg0-lam0-ep0"][:1] == ["0"]  # the "no fine-tuning" row: evaluation only
    assert "expected GPU-hours: 64.0" in out  # 32 fine-tunes x 2 GPU-h: the study's 64 h
    assert "Expected run time: about 2 GPU-hours per trial" in out
    assert list(tmp_path.iterdir()) == []

    code, out, _ = run_main(sweeps.scratch.main, argv[2:], capsys)  # 2 runs x 150 epochs x 25 h x 2 GPUs / 150
    assert code == 0 and "expected GPU-hours: 100.0" in out
    assert table_rows(out)["reg0"][0] == "150" and set(table_rows(out)) >= {"reg0", "reg4"}


def test_local_dry_run_generates_only_where_the_preset_keeps_its_data(image_folder, tmp_path, monkeypatch, capsys):
    """A folder the user names gets nothing written; the preset's own data folder is generated (and the dry run
    says so) because validation reads its class list."""
    before = sorted(image_folder.rglob("*"))
    code, out, err = run_main(sweeps.scratch.main, ["--local", "--data", str(image_folder), "--dry-run"], capsys)
    assert sorted(image_folder.rglob("*")) == before
    assert "holds no generated data set; none written" in err
    assert code == 2 and "backend 'ffcv' needs train.beton and val.beton" in err  # the local preset reads ffcv

    missing = tmp_path / "missing"
    code, out, err = run_main(sweeps.scratch.main, ["--local", "--data", str(missing), "--dry-run"], capsys)
    assert code == 2 and "no such directory" in err and not missing.exists()

    monkeypatch.chdir(tmp_path)  # the tiny base's data path, outputs/data/generated, is relative to it
    code, out, err = run_main(sweeps.scratch.main, ["--local", "--dry-run"], capsys)
    own = tmp_path / "outputs" / "data" / "generated"
    assert code == 0 and f"dry run: wrote {own / 'train.beton'}, {own / 'val.beton'}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"] and sorted(table_rows(out)) == ["reg0", "reg4"]
    assert "expected GPU-hours: 0.0" in out  # a CPU run
    code, out, err = run_main(sweeps.scratch.main, ["--local", "--dry-run"], capsys)
    assert code == 0 and "wrote" not in err  # the second time there is nothing to write


def test_the_same_flag_names_everywhere():
    """--data, --mlflow-uri and --set (and --dry-run) are spelled the same in the training, sweep and analysis
    scripts (analysis has no config fields to --set)."""
    for main in TRAIN_MAINS + SWEEP_MAINS:
        assert {"--data", "--mlflow-uri", "--set", "--dry-run"} <= _flags(lambda main=main: main([])), main.__module__
    for module in (analysis.run_probes, analysis.probe_sweep):
        flags = _flags(module.parse_args)
        assert {"--data", "--data-root", "--mlflow-uri"} <= flags, module.__name__


def _flags(build_and_parse) -> set[str]:
    """The option strings of the parser that `build_and_parse()` builds (stopped at its parse_args)."""
    captured: list[argparse.ArgumentParser] = []

    def grab(self, *args, **kwargs):
        captured.append(self)
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab), pytest.raises(SystemExit):
        build_and_parse()
    return {flag for action in captured[0]._actions for flag in action.option_strings}


def test_a_folder_the_user_named_is_never_filled_with_generated_images(tmp_path: Path) -> None:
    """`--preset tiny --data DIR` on a real run (not only a dry run): no generated image or .beton lands in DIR;
    the config names what is missing there. The preset's own folder, or one holding a generated set, is filled."""
    from train.data import generated_home

    user = tmp_path / "my-imagenet"
    user.mkdir()
    with pytest.raises(SystemExit):
        train.finetune.main(["--preset", "tiny", "--data", str(user), "--storage", str(tmp_path / "runs")])
    assert list(user.iterdir()) == []
    assert generated_home(tmp_path / "own", tmp_path / "own") and not generated_home(user, tmp_path / "own")
    (user / "images").mkdir()
    (user / "images" / "generated.json").write_text("{}")
    assert generated_home(user, tmp_path / "own")


def test_a_local_sweep_pointed_at_a_users_folder_generates_nothing_there(tmp_path: Path) -> None:
    from train.experiments import FINETUNE_SWEEPS, get_experiment

    experiment = get_experiment("local", FINETUNE_SWEEPS)
    user = tmp_path / "mine"
    user.mkdir()
    _, data = sweeps.finetune_grid.prepare_local(experiment, str(user), planted_base=True)
    assert data == str(user.resolve()) and list(user.iterdir()) == []
