"""Smoke tests of benchmarks/bench_taps.py, bench_data.py and gpu.py: their smallest runs, and the numbers they
print checked against known answers (a planted exponent, attention sizes computed by hand, image counts)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

import vitreg

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    if str(BENCHMARKS) not in sys.path:  # as when the script runs: its own folder (benchmarks/output.py) importable
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python benchmarks/<name>.py ARGS`, run in this process (its imports are already paid for here)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    assert load_script(name).main() in (None, 0)


def test_fit_exponent_recovers_planted_exponents():
    fit_exponent = load_script("bench_taps").fit_exponent
    tokens = [261, 581, 1029, 1374, 2309, 4629]
    assert fit_exponent(tokens, [3.0 * n**2 for n in tokens]) == pytest.approx(2.0, abs=1e-9)
    assert fit_exponent(tokens, [0.25 * n for n in tokens]) == pytest.approx(1.0, abs=1e-9)
    assert fit_exponent(tokens, [7e-3 * n**1.5 for n in tokens]) == pytest.approx(1.5, abs=1e-9)
    # a constant term bends the fit below the leading exponent, as a fixed memory overhead does
    assert fit_exponent(tokens, [1e6 + n**2 for n in tokens]) < 1.9
    # non-positive values (no memory measured) are left out; fewer than two points give no exponent
    assert fit_exponent(tokens[:3], [0.0, 4.0 * 581**2, 4.0 * 1029**2]) == pytest.approx(2.0, abs=1e-9)
    assert fit_exponent([261], [5.0]) is None
    assert fit_exponent([261, 581], [0.0, -1.0]) is None


def test_bench_taps_smallest_sweep_keeps_the_hand_computed_attention(monkeypatch):
    """The sweep and its fits, with each point measured in this process (the script's fresh interpreter per point
    costs seconds of imports each; `main`'s command line is the same code around `sweep`)."""
    bench_taps = load_script("bench_taps")
    monkeypatch.setattr(bench_taps, "run_point", bench_taps.measure)
    threads = torch.get_num_threads()  # `measure` sets the process's thread count: leave it as it was
    try:
        results = bench_taps.sweep(
            "vit_small_patch14_reg4_dinov2", [112, 168], ["row_taps", "full_maps"], batch=1, repeats=1,
            threads=threads, max_map_gib=4.0,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    depth, heads, registers = 12, 6, 4  # vit_small_patch14_reg4_dinov2
    for point in results["points"]:
        tokens = (point["img_size"] // 14) ** 2 + 1 + registers
        assert point["tokens"] == tokens
        assert point["seconds"] > 0
        if point["variant"] == "row_taps":  # CLS + register rows, float32, every layer and head
            assert point["attention_mib"] * 2**20 == depth * heads * (1 + registers) * tokens * 4
        else:  # every (T x T) map, float32
            assert point["attention_mib"] * 2**20 == depth * heads * tokens**2 * 4
            assert point["peak_mib"] >= 0.9 * point["attention_mib"]  # the kept maps are resident at the peak
    exponents = results["exponents"]
    assert exponents["row_taps"]["attention_mib"] == pytest.approx(1.0, abs=1e-6)
    assert exponents["full_maps"]["attention_mib"] == pytest.approx(2.0, abs=1e-6)


@pytest.mark.slow
def test_bench_data_smallest_run_times_both_loaders(tmp_path, monkeypatch):
    out = tmp_path / "data.json"
    run_script(
        "bench_data", "--images", "16", "--batch", "8", "--workers", "1", "--epochs", "1",
        "--width", "100", "--height", "75", "--json", str(out), monkeypatch=monkeypatch,
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert [(row["backend"], row["workers"]) for row in results["rows"]] == [("ffcv", 1), ("imagefolder", 1)]
    for row in results["rows"]:
        assert row["images_per_epoch"] == 16  # 2 full batches of 8, checked batch by batch in the script
        assert row["images_per_s"] == pytest.approx(16 / row["epoch_s"])
        assert row["images_per_s_per_worker"] == row["images_per_s"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_script_refuses_to_run_without_cuda(tmp_path, monkeypatch, capsys):
    gpu = load_script("gpu")
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--out", str(tmp_path)])
    assert gpu.main() == 2
    error = capsys.readouterr().err
    assert "no CUDA device" in error and "--allow-cpu --smoke" in error
    assert not (tmp_path / "gpu.json").exists()


def smoke_step_flops_by_hand() -> dict[str, int]:
    """FLOPs per image of one training step of gpu.py's smoke model, counted by hand: matmuls and the patch
    convolution at 2 per multiply-add, forward and backward as autograd runs them (a frozen block still passes
    gradients back to its input when something before it trains), attention's q k^T and attn v left out.

    Smoke model: DeiT-III S layout, 32 px, patch 16 (4 patches), width 64, depth 4, 4 registers, k=2 frozen blocks,
    1000 classes. A block's linear layers (qkv 3D^2, proj D^2, MLP 8D^2) cost 24 D^2 FLOPs per token forward.
    """
    width, patches, registers, classes = 64, 4, 4, 1000
    block = 24 * width**2  # per token, forward
    conv = 2 * patches * (3 * 16 * 16) * width  # forward only: frozen weights, images need no gradient
    head = 2 * width * classes  # forward; backward: weight and input gradients, 2x
    tokens = 1 + registers + patches
    input_entry = block * tokens * (4 + 2 * 2 + 1 * 2) + conv + 3 * head  # 4 forward, 2 trainable, 2 frozen blocks
    after_frozen = block * (tokens - registers) * 2 + block * tokens * 2 * 3 + conv + 3 * head  # prefix: forward only
    return {"input": input_entry, "after_frozen": after_frozen}


@pytest.mark.slow
def test_gpu_script_smoke_on_cpu_runs_every_section(tmp_path, monkeypatch):
    run_script("gpu", "--allow-cpu", "--smoke", "--out", str(tmp_path), "--deadline-s", "600", monkeypatch=monkeypatch)
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert "| register entry |" in (tmp_path / "gpu.md").read_text()
    entry_supported = "register_entry" in inspect.signature(vitreg.build_model).parameters  # issue 9 item 1
    # nothing skipped or failed, except the after_frozen rows while vitreg cannot build them
    assert all(not entry_supported and "register_entry" in note for note in results["notes"])
    rows = {(row["register_entry"], row["compile"]): row for row in results["model"]}
    assert set(rows) == {("input", False), ("after_frozen", False), ("input", True), ("after_frozen", True)}
    if not entry_supported:
        assert "register_entry" in rows[("after_frozen", False)]["skipped"]
        rows = {key: row for key, row in rows.items() if key[0] == "input"}
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["mfu"] is None  # no peak FLOP/s known for a CPU
        assert row["achieved_tflops"] == pytest.approx(row["gflop_per_image"] * row["images_per_s"] / 1000)
    if not torch.cuda.is_available():  # FLOPs counted on CPU against a hand count (CPU's SDPA kernel is not counted)
        hand = smoke_step_flops_by_hand()
        for key, row in rows.items():
            assert row["gflop_per_image"] * 1e9 == pytest.approx(hand[key[0]], rel=1e-9)
            assert row["counted_over_hand"] == pytest.approx(1.0, rel=1e-9)  # gpu.py's own check agrees
    e2e = results["end_to_end"]["eager"]
    assert e2e["end_to_end_images_per_s"] > 0 and e2e["loader_images_per_s"] > 0
    assert e2e["end_to_end_over_target"] == pytest.approx(e2e["end_to_end_images_per_s"] / 6000)
    assert [row["variant"] for row in results["taps"]] == ["plain", "row_taps", "full_maps"]
    assert all(row["seconds"] > 0 for row in results["taps"])
