"""Fine-tuned models reload as themselves: model files, training states, the study's DeiT-III files, DINOv2 at
any resolution as the official code, and prefix counts after added registers. Known answers throughout."""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import vitreg

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}  # timm architecture overrides of the tiny test models
DEIT3 = "deit3_small_patch16_224.fb_in22k_ft_in1k"
DINOV2 = "vit_small_patch14_dinov2"  # embed-class model: added registers make a PositionFreeRegistersViT


def trained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight a non-trivial value (DeiT-III's 1e-6 layer scales would hide the blocks), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if name.endswith((".gamma", "norm.weight")) else 0.5 * noise)
    return model.eval()


def tiny_finetuned(name: str = DEIT3, registers: int = 4, num_classes: int = 10) -> torch.nn.Module:
    img_size = 56 if "patch14" in name else 48
    model = vitreg.build_model(name, img_size=img_size, registers=registers, num_classes=num_classes, **TINY)
    return trained(model)


def logits_of(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    size = model.patch_embed.img_size
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(images)


def assert_same_model(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    expected, actual = source.state_dict(), loaded.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    assert type(loaded) is type(source)
    assert torch.equal(logits_of(loaded), logits_of(source))


def registers_matter(model: torch.nn.Module) -> None:
    """The known answer is not vacuous: fresh registers change the logits."""
    fresh = type(model).__new__(type(model))
    fresh.__dict__ = {**model.__dict__, "_parameters": dict(model._parameters)}
    fresh._parameters["reg_token"] = torch.nn.Parameter(torch.randn_like(model.reg_token) * 1e-6)
    assert (logits_of(fresh) - logits_of(model)).abs().max() > 1e-2


# --- our model file -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [DEIT3, DINOV2])
def test_model_file_reloads_the_trained_registers_and_head(tmp_path, name):
    source = tiny_finetuned(name)
    registers_matter(source)
    path = tmp_path / "model.safetensors"
    info = vitreg.save_model_file(
        source, path, timm_name=name, frozen_blocks=1, model_kwargs=TINY, training_run_id="abc123",
        training_run_dir=str(tmp_path / "run"), extra={"epoch": 3},
    )  # fmt: skip
    assert vitreg.read_model_file_info(path) == info
    assert (info.registers, info.num_classes, info.frozen_blocks, info.model_kwargs) == (4, 10, 1, TINY)
    assert (info.training_run_id, info.extra, info.token_order) == ("abc123", {"epoch": 3}, "cls,registers,patches")
    state_dict, read_info = vitreg.read_model_file(path)
    assert read_info == info and all(torch.equal(state_dict[k], v) for k, v in source.state_dict().items())

    assert_same_model(vitreg.build_model(checkpoint=path), source)  # everything from the file
    assert_same_model(vitreg.build_model(name.split(".")[0], checkpoint=path, registers=4, num_classes=10), source)
    assert_same_model(vitreg.build_model(name, checkpoint=path, **TINY), source)
    frozen = vitreg.build_model(checkpoint=path, frozen_blocks=2, patch_drop_rate=0.1)  # no weight changes
    assert not any(p.requires_grad for p in frozen.blocks.parameters())
    assert vitreg.prefix_token_counts(frozen) == {"": 5, "patch_drop": 5}

    with pytest.raises(vitreg.ModelBuildError, match=f"{path} holds 4 registers; asked for registers=2"):
        vitreg.build_model(checkpoint=path, registers=2)
    with pytest.raises(vitreg.ModelBuildError, match=f"{path} holds 4 registers; asked for registers=0"):
        vitreg.build_model(checkpoint=path, registers=0)
    with pytest.raises(vitreg.ModelBuildError, match="holds a 10-class head; asked for num_classes=1000"):
        vitreg.build_model(checkpoint=path, num_classes=1000)
    with pytest.raises(vitreg.ModelBuildError, match=f"holds a '{name}' model; asked for 'vit_base_patch16_224'"):
        vitreg.build_model("vit_base_patch16_224", checkpoint=path)
    with pytest.raises(vitreg.ModelBuildError, match="was built with depth=2; asked for depth=3"):
        vitreg.build_model(checkpoint=path, depth=3)
    with pytest.raises(vitreg.ModelBuildError, match="built with qk_norm='<architecture default>'; asked for qk_n"):
        vitreg.build_model(checkpoint=path, qk_norm=True)


def test_model_file_at_another_resolution_resamples_the_position_embedding(tmp_path):
    source = tiny_finetuned(DEIT3)
    path = tmp_path / "model.safetensors"
    vitreg.save_model_file(source, path, timm_name=DEIT3, model_kwargs=TINY)
    resized = vitreg.build_model(checkpoint=path, img_size=96)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [6, 6], [3, 3], num_prefix_tokens=0)
    assert torch.equal(resized.pos_embed.detach(), expected)  # timm's own resampling (DeiT-III: no CLS row)
    assert torch.equal(resized.reg_token, source.reg_token) and logits_of(resized).shape == (2, 10)


def test_save_model_file_refuses_what_would_not_load_back(tmp_path):
    source = tiny_finetuned(DEIT3)
    forgotten = r"does not match 'deit3_small_patch16_224.fb_in22k_ft_in1k' with model_kwargs=\{\}.*blocks.0.attn"
    with pytest.raises(vitreg.ModelBuildError, match=forgotten):
        vitreg.save_model_file(source, tmp_path / "m.safetensors", timm_name=DEIT3)  # model_kwargs forgotten
    with pytest.raises(vitreg.ModelBuildError, match="must end in .safetensors"):
        vitreg.save_model_file(source, tmp_path / "m.pt", timm_name=DEIT3, model_kwargs=TINY)
    assert list(tmp_path.iterdir()) == []


def test_model_file_whose_metadata_disagrees_with_its_tensors_is_refused(tmp_path):
    source = tiny_finetuned(DEIT3)
    path = tmp_path / "model.safetensors"
    info = vitreg.save_model_file(source, path, timm_name=DEIT3, model_kwargs=TINY)
    metadata = {**info.to_metadata(), "registers": "2"}
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path), metadata=metadata)
    with pytest.raises(vitreg.ModelBuildError, match="its metadata says registers=2, its tensors hold registers=4"):
        vitreg.build_model(checkpoint=path)


# --- a training state.pt ------------------------------------------------------------------------------------------


def training_state(model: torch.nn.Module, registers: int | None, num_classes: int | None) -> dict:
    """What train/loop.py's save_checkpoint writes (keys of TrainConfig.to_dict in "config")."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 48, 48)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = {
        "model": DEIT3, "pretrained": True, "checkpoint": None, "model_kwargs": dict(TINY), "img_size": 48,
        "num_classes": num_classes, "registers": registers, "register_init_std": 1e-6, "frozen_blocks": 1,
        "drop_path_rate": 0.0, "penalty_lambda": 0.01, "lambda_schedule": "constant", "lambda_period": 10,
        "penalty_block": -1, "epochs": 2, "batch_size": 8, "lr": 5e-5, "min_lr": 1e-6, "warmup_epochs": 1.0,
        "weight_decay": 0.05, "betas": [0.9, 0.999], "label_smoothing": 0.1, "grad_clip_norm": None,
        "precision": "bf16", "data": {"backend": "imagefolder", "path": "/data/x", "img_size": 48, "batch_size": 4},
        "num_workers": 2, "use_gpu": False, "cpus_per_worker": 1.0, "resources_per_worker": {}, "seed": 0,
        "max_failures": 3, "keep_checkpoints": 2, "artifact_images": 8, "figure_images": 4, "fail_at_epoch": None,
        "tracking": {"enabled": True, "tracking_uri": None, "experiment": "vitreg"},
    }  # fmt: skip
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "epoch": 2,
        "history": [{"epoch": 0, "val/top1": 0.5}, {"epoch": 1, "val/top1": 0.6}],
        "elapsed_s": 12.5,
        "rng": {"torch": torch.get_rng_state(), "seed": 0},
        "config": config,
    }


@pytest.mark.parametrize(("config_registers", "config_classes"), [(4, 10), (None, None)])
def test_training_state_reloads_the_trained_registers_and_head(tmp_path, config_registers, config_classes):
    source = tiny_finetuned(DEIT3)
    path = tmp_path / "state.pt"
    torch.save(training_state(source, config_registers, config_classes), path)
    source.eval()
    # The call that silently gave fresh registers before:
    assert_same_model(vitreg.build_model(DEIT3, checkpoint=path, registers=4, num_classes=10), source)
    assert_same_model(vitreg.build_model(checkpoint=path), source)
    with pytest.raises(vitreg.ModelBuildError, match="holds 4 registers; asked for registers=2"):
        vitreg.build_model(DEIT3, checkpoint=path, registers=2)
    with pytest.raises(vitreg.ModelBuildError, match="holds a 10-class head; asked for num_classes=5"):
        vitreg.build_model(DEIT3, checkpoint=path, num_classes=5)
    with pytest.raises(vitreg.ModelBuildError, match="holds a 'deit3_small_patch16_224.fb_in22k_ft_in1k' model"):
        vitreg.build_model("vit_small_patch16_224", checkpoint=path)


def test_training_state_whose_config_disagrees_with_its_tensors_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(training_state(tiny_finetuned(DEIT3), registers=2, num_classes=10), path)
    with pytest.raises(vitreg.ModelBuildError, match="its config says registers=2, its tensors hold registers=4"):
        vitreg.build_model(checkpoint=path)


# --- the study's fine-tuned DeiT-III files ------------------------------------------------------------------------


def study_checkpoint(model: torch.nn.Module) -> dict:
    """As vit-reg/vit-reg DEIT-III/main.py saves a fine-tune: original DeiT-III keys, register_tokens (R, D)."""
    weights = {}
    for key, value in model.state_dict().items():
        if key == "reg_token":
            weights["register_tokens"] = value[0].clone()  # (R, D)
        else:
            weights[key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value
    args = argparse.Namespace(model="deit_small_patch16_LS_reg", num_registers=4, input_size=48, lr=5e-4)
    return {
        "model": weights, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"base_values": [5e-4]},
        "epoch": 9, "model_ema": dict(weights), "scaler": {"scale": 65536.0}, "args": args,
    }  # fmt: skip


def study_forward(model: torch.nn.Module, register_tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The study's vit_models.forward: patches + positions, registers appended after them, then CLS in front."""
    batch = images.shape[0]
    x = model.patch_embed(images) + model.pos_embed  # (B, N, D)
    x = torch.cat([x, register_tokens.expand(batch, -1, -1)], dim=1)  # (B, N + R, D): [PATCH, REG]
    x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1)  # (B, 1 + N + R, D): [CLS, PATCH, REG]
    for block in model.blocks:
        x = block(x)
    return model.head(model.norm(x)[:, 0])


def test_the_studys_finetuned_deit3_file_loads_with_its_registers(tmp_path):
    source = tiny_finetuned(DEIT3)
    registers_matter(source)
    path = tmp_path / "checkpoint.pth"
    torch.save(study_checkpoint(source), path)
    loaded = vitreg.build_model("deit3_small_patch16_224", checkpoint=path, **TINY)
    assert_same_model(loaded, source)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = study_forward(source, source.reg_token[0:1, :, :], images)
    torch.testing.assert_close(logits_of(loaded), expected, atol=1e-6, rtol=1e-6)
    assert vitreg.build_model(DEIT3, checkpoint=path, registers=4, num_classes=10, **TINY).num_prefix_tokens == 5
    with pytest.raises(vitreg.ModelBuildError, match="holds 4 registers; asked for registers=1"):
        vitreg.build_model(DEIT3, checkpoint=path, registers=1, **TINY)
    with pytest.raises(vitreg.ModelBuildError, match="does not name its model; pass the timm name"):
        vitreg.build_model(checkpoint=path)


def test_a_bare_state_dict_with_added_registers_loads_them(tmp_path):
    source = tiny_finetuned(DINOV2)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    assert_same_model(vitreg.build_model(DINOV2, checkpoint=path, **TINY), source)
    with pytest.raises(vitreg.ModelBuildError, match="holds a 10-class head; asked for num_classes=3"):
        vitreg.build_model(DINOV2, checkpoint=path, num_classes=3, **TINY)


def test_original_layout_never_loads_partially(tmp_path):
    source = trained(timm.create_model("deit3_small_patch16_224", img_size=48, num_classes=10, **TINY))
    weights = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
               for k, v in source.state_dict().items()}  # fmt: skip
    path = tmp_path / "deit3.pth"
    torch.save({"model": {**weights, "blocks.0.extra": torch.zeros(3)}}, path)
    # A new head used to make timm load non-strictly, dropping whatever else did not fit, silently.
    with pytest.raises(vitreg.ModelBuildError, match=r"unexpected keys \['blocks.0.extra'\]"):
        vitreg.build_model("deit3_small_patch16_224", checkpoint=path, num_classes=5, img_size=48, **TINY)
    torch.save({"model": weights}, path)
    new_head = vitreg.build_model("deit3_small_patch16_224", checkpoint=path, num_classes=5, img_size=48, **TINY)
    assert new_head.head.out_features == 5
    assert all(torch.equal(new_head.state_dict()[k], v) for k, v in source.state_dict().items() if "head" not in k)
    # num_classes=None: the file's 10-class head, not the architecture's 1000
    assert_same_model(vitreg.build_model("deit3_small_patch16_224", checkpoint=path, img_size=48, **TINY), source)


# --- unreadable and unsafe files ----------------------------------------------------------------------------------


class RunsCodeWhenLoaded:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_truncated_and_code_running_files_are_refused(tmp_path):
    source = tiny_finetuned(DEIT3)
    model_file, state_file = tmp_path / "model.safetensors", tmp_path / "state.pt"
    vitreg.save_model_file(source, model_file, timm_name=DEIT3, model_kwargs=TINY)
    torch.save(training_state(source, 4, 10), state_file)
    for path in (model_file, state_file):
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
        with pytest.raises(vitreg.ModelBuildError, match=f"cannot read (checkpoint|model file) {path}"):
            vitreg.build_model(DEIT3, checkpoint=path, **TINY)

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": RunsCodeWhenLoaded(str(marker)), "config": {"model": DEIT3}}, evil)
    with pytest.raises(vitreg.ModelBuildError, match=f"cannot read checkpoint {evil}.*Weights only load failed"):
        vitreg.build_model(DEIT3, checkpoint=evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


# --- DINOv2 at other resolutions, as the official code ------------------------------------------------------------


def official_interpolate_pos_encoding(pos_embed: torch.Tensor, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """facebookresearch/dinov2 DinoVisionTransformer.interpolate_pos_encoding, patch size 14, offset 0.1."""
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0, h0 = w // 14, h // 14
    M = int(math.sqrt(N))
    sx, sy = float(w0 + 0.1) / M, float(h0 + 0.1) / M
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
        scale_factor=(sx, sy),
    )  # fmt: skip
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def official_dinov2_features(original: dict, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The official forward_features' x_norm from original-layout weights (blocks: the same timm modules)."""
    _, _, w, h = images.shape
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, N, D)
    x = torch.cat((original["cls_token"].expand(x.shape[0], -1, -1), x), dim=1)
    x = x + official_interpolate_pos_encoding(original["pos_embed"], x, w, h)
    if "register_tokens" in original:
        x = torch.cat((x[:, :1], original["register_tokens"].expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def dinov2_original_layout(model: torch.nn.Module) -> dict:
    """As the DINOv2 repo saves it: pos_embed with a CLS row, register_tokens, mask_token."""
    state = dict(model.state_dict())
    if "reg_token" in state:  # timm folds the CLS position into cls_token on register models: a zero CLS row
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([torch.zeros_like(state["cls_token"]), state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    return state


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_features_match_the_official_interpolation_at_any_size(tmp_path, name):
    torch.manual_seed(0)
    source = trained(timm.create_model(name, num_classes=0, **TINY))  # native 518 px: a 37 x 37 grid
    with torch.no_grad():
        source.pos_embed.normal_()  # a rough grid: resampling methods differ visibly
    original = dinov2_original_layout(source)
    checkpoint = tmp_path / "dinov2_original.pth"
    torch.save(original, checkpoint)
    hub_file = tmp_path / "dinov2_timm.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(hub_file))
    model_file = tmp_path / "dinov2_ours.safetensors"
    vitreg.save_model_file(source, model_file, timm_name=name, model_kwargs=TINY)
    prefix = 0 if source.no_embed_class else 1

    for img_size in (224, 448, 518):
        images = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(img_size))
        with torch.no_grad():
            expected = official_dinov2_features(original, source, images)
        loaded = {
            "checkpoint": vitreg.build_model(name, checkpoint=checkpoint, img_size=img_size, **TINY),
            "hub": vitreg.build_model(
                name, pretrained=True, img_size=img_size, pretrained_cfg_overlay={"file": str(hub_file)}, **TINY
            ),
            "model file": vitreg.build_model(checkpoint=model_file, img_size=img_size),
        }
        for how, model in loaded.items():
            with torch.no_grad():
                features = model.eval().forward_features(images)
            if img_size == 518:  # the native size: nothing is resampled
                assert torch.equal(model.pos_embed, source.pos_embed), how
                assert torch.equal(features, source.forward_features(images)), how
            torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5, msg=how)
        if img_size != 518:  # the known answer is not timm's resampling
            grid = [img_size // 14] * 2
            timm_way = resample_abs_pos_embed(source.pos_embed.detach(), grid, num_prefix_tokens=prefix)
            assert (timm_way - loaded["checkpoint"].pos_embed).abs().max() > 1e-2


# --- prefix counts after added registers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [DEIT3, DINOV2])
def test_patch_dropout_never_drops_a_register_or_cls(name):
    torch.manual_seed(0)
    img_size = 56 if "patch14" in name else 64
    model = vitreg.build_model(name, img_size=img_size, registers=3, patch_drop_rate=0.5, **TINY).train()
    assert vitreg.prefix_token_counts(model) == {"": 4, "patch_drop": 4}
    images = torch.randn(2, 3, img_size, img_size)
    tokens = model._pos_embed(model.patch_embed(images))  # (B, 1 + 3 + 16, D)
    for _ in range(5):
        kept = model.patch_drop(tokens)
        assert kept.shape[1] == 4 + 8
        assert torch.equal(kept[:, :4], tokens[:, :4])  # CLS and the three registers, in place
        for batch in range(2):  # every other kept token is a patch token
            matches = (kept[batch, 4:, None] == tokens[batch, None, 4:]).all(-1)  # (8, 16)
            assert matches.sum(1).tolist() == [1] * 8
    assert model(images).shape[0] == 2  # the forward runs with the dropped tokens


def test_average_pooling_excludes_the_registers():
    model = vitreg.build_model("deit3_small_patch16_224", img_size=64, registers=4, global_pool="avg", **TINY)
    x = torch.randn(2, 5 + 16, 32)
    torch.testing.assert_close(model.pool(x), x[:, 5:].mean(1))
