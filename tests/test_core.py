"""vitreg core: known answers for models, registers, freezing, taps, penalty, schedules, artifacts."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import Attention

import vitreg
from vitreg.artifacts import ArtifactRemoval, neighbourhood_minimum
from vitreg.synthetic import planted_artifact_vit, planted_images

PLANTED = [(0, 1), (6, 7), (7, 0)]  # (row, col) on the 8x8 patch grid, all on the flat background


@pytest.fixture(scope="module")
def planted() -> tuple[torch.nn.Module, torch.Tensor]:
    return planted_artifact_vit(plant_block=2), planted_images(PLANTED, batch=2)


def planted_mask(batch: int = 2) -> torch.Tensor:
    mask = torch.zeros(batch, 8, 8, dtype=torch.bool)
    for row, col in PLANTED:
        mask[:, row, col] = True
    return mask


# --- artifacts: a planted artifact is found ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("auto", {}), ("threshold", {"threshold": 20.0}), ("top_percent", {"top_percent": 100 * 3 / 64})],
)
def test_planted_artifacts_are_found_at_their_positions(planted, method, kwargs):
    model, images = planted
    taps = vitreg.run_taps(model, images, layers=[2, 5])
    for layer in (2, 5):
        report = vitreg.detect_artifacts(taps.patch_norm_map(layer), method=method, **kwargs)
        assert torch.equal(report.mask, planted_mask())
        assert sorted(report.positions) == sorted((b, r, c) for b in range(2) for r, c in PLANTED)
        assert report.outlier_fraction == pytest.approx(3 / 64)
        assert report.max_median_ratio > 10


def test_auto_detection_finds_nothing_before_the_plant_and_on_plain_spreads(planted):
    model, images = planted
    taps = vitreg.run_taps(model, images, layers=None, attention_layers=())
    found = [vitreg.detect_artifacts(taps.patch_norm_map(layer)).count > 0 for layer in taps.layers]
    assert found == [False, False, True, True, True, True]  # outliers appear exactly at the plant block
    generator = torch.Generator().manual_seed(0)
    flat_with_texture = torch.ones(4, 256)  # a flat background: any textured patch is many deviations away
    flat_with_texture[:, :20] = 1.8
    spreads = (torch.rand(4, 256, generator=generator) + 1, torch.randn(4, 256, generator=generator).exp())
    for spread in (*spreads, flat_with_texture):
        report = vitreg.detect_artifacts(spread, method="auto")
        assert report.count == 0 and math.isnan(report.threshold)


def test_planted_artifacts_take_the_cls_attention(planted):
    model, images = planted
    taps = vitreg.run_taps(model, images, attention_layers=[3, 5])
    for layer in (3, 5):
        top = taps.cls_attention_map(layer).flatten(1).topk(3, dim=1).indices.sort(dim=1).values
        assert top.tolist() == [sorted(r * 8 + c for r, c in PLANTED)] * 2


def test_detection_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown detection method 'otsu'.*auto"):
        vitreg.detect_artifacts(torch.ones(1, 4), method="otsu")
    with pytest.raises(ValueError, match="top_percent=0"):
        vitreg.detect_artifacts(torch.ones(1, 4), method="top_percent", top_percent=0)
    with pytest.raises(ValueError, match="norms must be"):
        vitreg.detect_artifacts(torch.ones(4))


# --- artifact removal --------------------------------------------------------------------------------------------


def test_neighbourhood_minimum_takes_the_elementwise_minimum_of_clean_neighbours():
    grid = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1).repeat(1, 1, 2)  # (1, 9, 2) on a 3x3 grid
    grid[0, :, 1] = -grid[0, :, 1]
    replace = torch.zeros(1, 9, dtype=torch.bool)
    replace[0, 4] = True  # centre
    replace[0, 0] = True  # corner: its clean neighbours are 1 and 3 (and 4 is flagged, so skipped)
    out = neighbourhood_minimum(grid, (3, 3), replace, connectivity=8)
    assert out[0, 4].tolist() == [1.0, -8.0]  # min over 0..8 without 0 and 4, per channel
    assert out[0, 0].tolist() == [1.0, -3.0]
    out4 = neighbourhood_minimum(grid, (3, 3), replace, connectivity=4)
    assert out4[0, 4].tolist() == [1.0, -7.0]  # edge neighbours 1, 3, 5, 7
    assert torch.equal(out[0, [1, 2, 3, 5, 6, 7, 8]], grid[0, [1, 2, 3, 5, 6, 7, 8]])


def test_artifact_removal_replaces_planted_tokens_and_runs_every_later_block(planted):
    model, images = planted
    removal = ArtifactRemoval(layers=[3], norm_percent=100 * 3 / 64, attention_percent=100 * 3 / 64)
    taps = vitreg.run_taps(model, images, layers=[3, 5], token_edit=removal)
    assert torch.equal(removal.removed[3], planted_mask().flatten(1))
    # The artifacts do not come back: the plant only fires in block 2.
    assert vitreg.detect_artifacts(taps.patch_norm_map(5)).count == 0

    # Same result by hand: blocks 0..3, edit, then blocks 4 and 5 (the study's loop skipped these).
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        for block in model.blocks[:4]:
            x = block(x)
        replaced = neighbourhood_minimum(x[:, 1:], (8, 8), planted_mask().flatten(1))
        x = torch.cat([x[:, :1], replaced], dim=1)
        for block in model.blocks[4:]:
            x = block(x)
        expected = model.forward_head(model.norm(x))
    torch.testing.assert_close(taps.logits, expected)
    assert not torch.allclose(taps.logits, model(images))


# --- taps --------------------------------------------------------------------------------------------------------


def explicit_attention(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every block's full attention from timm's explicit softmax(QK^T/sqrt(d)) path."""
    maps: list[torch.Tensor] = []
    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach())))
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for block, hook in zip(model.blocks, hooks, strict=True):
            block.attn.fused_attn = True
            hook.remove()
    return logits, maps


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "deit3_small_patch16_224"])
def test_tapped_attention_matches_explicit_softmax_and_keeps_the_output(name):
    torch.manual_seed(0)
    model = vitreg.build_model(name, img_size=56 if "14" in name else 64, num_classes=5, registers=4).eval()
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    explicit_logits, explicit_maps = explicit_attention(model, images)
    with torch.no_grad():
        fused_logits = model(images)
    taps = vitreg.run_taps(model, images, layers=None, attention_layers=None, full_attention_layers=[3])

    torch.testing.assert_close(fused_logits, explicit_logits, atol=1e-5, rtol=1e-5)  # fused == explicit
    torch.testing.assert_close(taps.logits, fused_logits, atol=1e-6, rtol=1e-6)  # taps leave the output alone
    assert all(type(block.attn) is Attention for block in model.blocks)  # fused attention restored
    tokens = explicit_maps[0].shape[-1]
    assert taps.cls_attention.shape == (len(model.blocks), 2, model.blocks[0].attn.num_heads, tokens)
    assert taps.register_attention.shape == (len(model.blocks), 2, 4, model.blocks[0].attn.num_heads, tokens)
    for layer, full in enumerate(explicit_maps):
        torch.testing.assert_close(taps.cls_attention[layer], full[:, :, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            taps.register_attention[layer], full[:, :, 1:5].transpose(1, 2), atol=1e-5, rtol=1e-4
        )
    torch.testing.assert_close(taps.full_attention[3], explicit_maps[3], atol=1e-5, rtol=1e-4)
    assert 3 not in taps.full_attention or len(taps.full_attention) == 1


def test_taps_name_tokens_and_norms_match_block_outputs():
    torch.manual_seed(0)
    model = vitreg.build_model("vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3).eval()
    images = torch.randn(2, 3, 56, 56)
    taps = vitreg.run_taps(model, images, layers=[-1, 0], keep_block_outputs=[-1], keep_patch_embedding=True)
    assert taps.layers == [0, 11] and taps.grid == (4, 4) and taps.num_registers == 4
    last = taps.block_outputs[11]  # (B, 1 + 4 + 16, C)
    norms = last.norm(dim=-1)
    torch.testing.assert_close(taps.cls_norms[1], norms[:, 0])
    torch.testing.assert_close(taps.register_norms[1], norms[:, 1:5])
    torch.testing.assert_close(taps.patch_norms[1], norms[:, 5:])
    assert taps.patch_embedding.shape == (2, 16, model.embed_dim)
    assert taps.cls_attention_map(11).shape == (2, 4, 4)
    torch.testing.assert_close(
        taps.cls_attention_map(11).sum(dim=(1, 2)) + taps.cls_attention[0, :, :, :5].mean(1).sum(-1), torch.ones(2)
    )
    with pytest.raises(vitreg.TapError, match="layer 0 was not tapped"):
        taps.cls_attention_map(0)
    with pytest.raises(vitreg.TapError, match="layer 12 out of range.*depth 12"):
        vitreg.run_taps(model, images, layers=[12])


def test_cls_and_register_rows_only_are_stored():
    """Memory for tapped rows is O(layers x heads x tokens): no (T x T) map unless asked for."""
    model = vitreg.build_model("vit_small_patch14_reg4_dinov2", img_size=112).eval()
    taps = vitreg.run_taps(model, torch.randn(1, 3, 112, 112), attention_layers=None)
    tokens = 1 + 4 + 64
    assert taps.cls_attention.numel() == 12 * 1 * 6 * tokens
    assert taps.register_attention.numel() == 12 * 1 * 4 * 6 * tokens
    assert taps.full_attention == {}


# --- models and registers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch16_224.dino"])
def test_added_registers_leave_every_pretrained_weight_bit_identical(name):
    torch.manual_seed(0)
    plain = vitreg.build_model(name, img_size=64)
    with_registers = vitreg.add_registers(timm.create_model(name, img_size=64), 4, init_std=0.02)
    with_registers.load_state_dict(plain.state_dict(), strict=False)
    before, after = plain.state_dict(), with_registers.state_dict()
    assert set(after) - set(before) == {"reg_token"}
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert vitreg.count_registers(with_registers) == 4 and with_registers.num_prefix_tokens == 5
    assert with_registers.reg_token.std().item() == pytest.approx(0.02, rel=0.3)

    # Token order [CLS, REG..., PATCH...]: registers carry no position embedding, the rest keep theirs.
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = with_registers._pos_embed(with_registers.patch_embed(images))
        reference = plain._pos_embed(plain.patch_embed(images))
        torch.testing.assert_close(tokens[:, 1:5], with_registers.reg_token.expand(2, -1, -1))
        torch.testing.assert_close(tokens[:, [0, *range(5, 21)]], reference)
        assert with_registers(images).shape == plain(images).shape


def test_build_model_reports_and_checks_existing_registers():
    model = vitreg.build_model("vit_small_patch14_reg4_dinov2", img_size=56)
    assert vitreg.count_registers(model) == 4
    assert vitreg.count_registers(vitreg.build_model("vit_small_patch14_dinov2", img_size=56)) == 0
    with pytest.raises(vitreg.ModelBuildError, match="already has 4 registers; asked for registers=2"):
        vitreg.build_model("vit_small_patch14_reg4_dinov2", img_size=56, registers=2)
    with pytest.raises(vitreg.ModelBuildError, match="registers=-1"):
        vitreg.build_model("deit3_small_patch16_224", img_size=64, registers=-1)


# The study's Table 8 'Parameters' column for DeiT-III Small.
TABLE_8 = {(11, 0): 2_236_648, (11, 4): 2_238_184, (10, 0): 4_011_880, (10, 4): 4_013_416,
           (9, 0): 5_787_112, (9, 4): 5_788_648, (8, 0): 7_562_344, (8, 4): 7_563_880}  # fmt: skip


def test_trainable_parameters_match_the_studys_table_8():
    model = vitreg.build_model("deit3_small_patch16_224")
    for registers in (0, 4):
        candidate = vitreg.add_registers(timm.create_model("deit3_small_patch16_224"), registers)
        for frozen in (8, 9, 10, 11):
            vitreg.freeze_blocks(candidate, frozen)
            assert vitreg.trainable_parameters(candidate) == TABLE_8[(frozen, registers)]
    vitreg.freeze_blocks(model, 11)
    names = vitreg.trainable_parameter_names(model)
    assert {"pos_embed", "cls_token", "norm.weight", "head.weight", "blocks.11.attn.qkv.weight"} <= set(names)
    assert not any(name.startswith(("patch_embed", "blocks.0.", "blocks.10.")) for name in names)
    assert vitreg.trainable_parameters(vitreg.freeze_blocks(model, 0)) == sum(p.numel() for p in model.parameters())
    assert vitreg.trainable_parameters(vitreg.freeze_blocks(model, 12)) == 768 + 385_000 + 75_264 + 384
    with pytest.raises(vitreg.ModelBuildError, match=r"frozen_blocks=13: must be in 0\.\.12"):
        vitreg.freeze_blocks(model, 13)
    with pytest.raises(vitreg.ModelBuildError, match=r"frozen_blocks=-1"):
        vitreg.build_model("deit3_small_patch16_224", img_size=64, frozen_blocks=-1)


# --- loading local checkpoints -----------------------------------------------------------------------------------


def deit3_original_layout(model: torch.nn.Module) -> dict:
    """A state dict as the DeiT-III repo saves it: {'model': ...} with gamma_1/gamma_2 layer scales."""
    state = {}
    for key, value in model.state_dict().items():
        state[key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value
    return {"model": state}


def dinov2_reg_original_layout(model: torch.nn.Module) -> dict:
    """A state dict as the DINOv2 repo saves a register model: register_tokens, mask_token, pos_embed with CLS."""
    state = dict(model.state_dict())
    state["register_tokens"] = state.pop("reg_token")
    cls_position = torch.zeros_like(state["cls_token"])
    state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    return state


def test_loads_a_deit3_checkpoint_in_its_original_layout(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("deit3_small_patch16_224")
    path = tmp_path / "deit_3_small_224_21k.pth"
    torch.save(deit3_original_layout(source), path)
    loaded = vitreg.build_model("deit3_small_patch16_224", checkpoint=path, registers=4, frozen_blocks=10)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert vitreg.trainable_parameters(loaded) == TABLE_8[(10, 4)]

    resized = vitreg.build_model("deit3_small_patch16_224", checkpoint=path, img_size=384)
    assert resized.pos_embed.shape == (1, 576, 384)  # resampled from 14x14 to 24x24
    assert resized(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_loads_a_dinov2_register_checkpoint_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0)
    path = tmp_path / "dinov2_vits14_reg4.safetensors"
    save_file({k: v.contiguous() for k, v in dinov2_reg_original_layout(source).items()}, str(path))
    loaded = vitreg.build_model("vit_small_patch14_reg4_dinov2", checkpoint=path, num_classes=0)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert vitreg.count_registers(loaded) == 4


def test_bad_model_and_checkpoint_requests_name_the_model_and_file(tmp_path, monkeypatch):
    with pytest.raises(vitreg.ModelBuildError, match="unknown model 'deit3_smol_patch16_224'"):
        vitreg.build_model("deit3_smol_patch16_224")
    missing = tmp_path / "nope.pth"
    with pytest.raises(
        vitreg.ModelBuildError, match=f"checkpoint for model 'deit3_small_patch16_224' not found: {missing}"
    ):
        vitreg.build_model("deit3_small_patch16_224", checkpoint=missing)
    other = tmp_path / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), other)
    with pytest.raises(
        vitreg.ModelBuildError, match=f"checkpoint {other} does not fit model 'deit3_small_patch16_224'"
    ):
        vitreg.build_model("deit3_small_patch16_224", checkpoint=other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(vitreg.ModelBuildError, match=f"cannot read checkpoint {garbage}"):
        vitreg.build_model("deit3_small_patch16_224", checkpoint=garbage)
    # No network, as on this machine: huggingface_hub reads HF_HUB_OFFLINE at import, so set its constant too
    # (otherwise each file is retried for ~45 s before the same error).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(vitreg.ModelBuildError, match="pretrained weights for 'deit3_small_patch16_224'.*checkpoint="):
        vitreg.build_model("deit3_small_patch16_224", pretrained=True)


# --- penalty and schedules ---------------------------------------------------------------------------------------


def test_l2_norm_penalty_is_the_mean_patch_norm_without_prefix_tokens():
    tokens = torch.zeros(2, 4, 2)
    tokens[:, 0] = 100.0  # CLS and a register: excluded
    tokens[:, 1] = 50.0
    tokens[0, 2:] = torch.tensor([3.0, 4.0])  # norm 5
    tokens[1, 2:] = torch.tensor([6.0, 8.0])  # norm 10
    assert vitreg.l2_norm_penalty(tokens, num_prefix_tokens=2).item() == pytest.approx(7.5)


def test_block_output_capture_sees_the_pre_norm_tokens_with_gradients(planted):
    model, images = planted
    capture = vitreg.BlockOutputCapture(model, block=-1)
    model(images).sum().backward()
    output = capture.pop()
    assert output.requires_grad
    with pytest.raises(RuntimeError, match="no output since the last pop"):
        capture.pop()
    capture.remove()
    taps = vitreg.run_taps(model, images, layers=[-1])
    torch.testing.assert_close(output.detach().norm(dim=-1)[:, 1:], taps.patch_norms[0])
    with pytest.raises(ValueError, match="penalty block 6 out of range"):
        vitreg.BlockOutputCapture(model, block=6)


@pytest.mark.parametrize(
    ("name", "initial", "epoch", "expected"),
    [
        ("constant", 0.01, 37, 0.01),
        ("harmonic", 0.1, 0, 0.1),
        ("harmonic", 0.1, 4, 0.02),
        ("exp_hard", 0.1, 9, 0.1),
        ("exp_hard", 0.1, 10, 0.01),
        ("exp_hard", 0.1, 25, 0.001),
        ("exp_soft", 0.1, 5, 0.1**1.5),
        ("exp_soft", 0.01, 10, 0.0001),
        ("step", 0.01, 9, 0.01),
        ("step", 0.01, 10, 0.0),
    ],
)
def test_lambda_schedules_at_chosen_epochs(name, initial, epoch, expected):
    assert vitreg.LambdaSchedule(name, initial)(epoch) == pytest.approx(expected)


def test_cosine_and_period_and_bad_schedules():
    cosine = vitreg.LambdaSchedule("cosine", 0.1, total_epochs=10)
    assert [cosine(e) for e in (0, 5, 10)] == pytest.approx([0.1, 0.05, 0.0])
    assert vitreg.LambdaSchedule("step", 0.1, period=3)(3) == 0.0
    with pytest.raises(ValueError, match="unknown lambda schedule 'linear'; allowed: constant, harmonic"):
        vitreg.LambdaSchedule("linear", 0.1)
    with pytest.raises(ValueError, match="lambda=-0.1: must be"):
        vitreg.LambdaSchedule("constant", -0.1)
    with pytest.raises(ValueError, match="cosine' needs total_epochs"):
        vitreg.LambdaSchedule("cosine", 0.1)
    with pytest.raises(ValueError, match="period=0"):
        vitreg.LambdaSchedule("step", 0.1, period=0)


def test_architecture_overrides_build_tiny_models_with_registers():
    model = vitreg.build_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=2,
        registers=2,
        num_classes=7,
    )
    assert vitreg.depth(model) == 2 and model.embed_dim == 48 and vitreg.count_registers(model) == 2
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(TypeError):
        vitreg.build_model("vit_tiny_patch16_224", not_an_argument=1)


STUDY_MODELS = [
    "deit3_small_patch16_224",
    "deit3_base_patch16_224",
    "deit3_small_patch16_384",
    "vit_small_patch16_224.dino",
    "vit_base_patch16_224.dino",
    *(f"vit_{size}_patch14_{kind}dinov2" for size in ("small", "base", "large", "giant") for kind in ("", "reg4_")),
]


@pytest.mark.parametrize("name", STUDY_MODELS)
def test_every_study_architecture_builds_takes_registers_and_freezes(name):
    with torch.device("meta"):  # shapes only: the giant model would need 4 GB of real weights
        model = vitreg.build_model(name, registers=None if "reg4" in name else 2, frozen_blocks=2)
    registers = 4 if "reg4" in name else 2
    assert vitreg.count_registers(model) == registers and model.num_prefix_tokens == 1 + registers
    names = vitreg.trainable_parameter_names(model)
    assert "reg_token" in names and "blocks.2.attn.qkv.weight" in names and "blocks.1.mlp.fc1.weight" not in names
    expected_depth = {"giant": 40, "large": 24}.get(name.split("_")[1], 12)
    assert vitreg.depth(model) == expected_depth
