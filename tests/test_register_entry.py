"""Registers that enter after the frozen prefix (`register_entry="after_frozen"`): equivalence at k=0, a prefix that
never changes and never gets a gradient, a hand-written forward, taps, model files, config errors and the
trainable parameter counts of DeiT-III Small next to the study's Table 8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitreg
from vitreg.models import REGISTER_ENTRIES

TINY = {"patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 32, "num_classes": 5}
# vit_tiny: position embedding covers CLS (PositionFreeRegistersViT); deit3: it does not (no_embed_class).
MODELS = ("vit_tiny_patch16_224", "deit3_small_patch16_224")
REGISTERS = 3


def tiny_model(name: str, frozen_blocks: int, register_entry: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = vitreg.build_model(
        name, registers=REGISTERS, register_init_std=0.5, frozen_blocks=frozen_blocks,
        register_entry=register_entry, **TINY,
    )  # fmt: skip
    with torch.no_grad():  # DeiT-III's LayerScale starts at 1e-6: blocks that barely act would test little
        for module in model.modules():
            if isinstance(getattr(module, "gamma", None), nn.Parameter):
                module.gamma.fill_(0.5)
    return model


def images(seed: int = 1, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss: cross-entropy + 0.1 x the last block's patch-norm penalty (as train/loop.py)."""
    capture = vitreg.BlockOutputCapture(model, -1)
    try:
        logits = model(x)
        return F.cross_entropy(logits, labels) + 0.1 * vitreg.l2_norm_penalty(capture.pop(), model.num_prefix_tokens)
    finally:
        capture.remove()


def hand_forward(model: nn.Module, x: torch.Tensor, entry: int) -> torch.Tensor:
    """The forward written out: positions on [CLS, PATCH], blocks < entry, registers after CLS, the rest, head."""
    batch = x.shape[0]
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)
    cls = model.cls_token.expand(batch, -1, -1)
    if model.no_embed_class:
        tokens = torch.cat([cls, patches + model.pos_embed], dim=1)
    else:
        tokens = torch.cat([cls, patches], dim=1) + model.pos_embed
    for block in model.blocks[:entry]:
        tokens = block(tokens)
    tokens = torch.cat([tokens[:, :1], model.reg_token.expand(batch, -1, -1), tokens[:, 1:]], dim=1)
    for block in model.blocks[entry:]:
        tokens = block(tokens)
    return model.head(model.norm(tokens)[:, 0])


@pytest.mark.parametrize("name", MODELS)
def test_entry_at_block_0_matches_input_registers_with_frozen_embeddings(name):
    """(a) k=0: the same outputs and the same gradients for every parameter that trains in both."""
    reference = tiny_model(name, 0, "input")
    for parameter in (reference.pos_embed, reference.cls_token):
        parameter.requires_grad_(False)  # input-level registers with frozen position embedding and CLS
    late = tiny_model(name, 0, "after_frozen", seed=7)
    late.load_state_dict(reference.state_dict())
    assert vitreg.register_entry_block(late) == 0 and vitreg.register_entry_block(reference) is None
    x, labels = images(), torch.tensor([0, 1, 2, 3])

    torch.testing.assert_close(late(x), reference(x), rtol=0, atol=0)
    loss_of(reference, x, labels).backward()
    loss_of(late, x, labels).backward()
    late_grads = {n: p.grad for n, p in late.named_parameters() if p.requires_grad}
    both = [(n, p.grad) for n, p in reference.named_parameters() if p.requires_grad and n in late_grads]
    # the patch embedding is the only parameter that trains in the reference and not here (part of the prefix)
    assert {n for n, p in reference.named_parameters() if p.requires_grad} - set(late_grads) == {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    }
    assert "reg_token" in late_grads and len(both) == len(late_grads)
    for parameter_name, grad in both:
        assert grad is not None and grad.abs().sum() > 0, parameter_name
        torch.testing.assert_close(late_grads[parameter_name], grad, rtol=1e-5, atol=1e-7, msg=parameter_name)


@pytest.mark.parametrize("name", MODELS)
def test_prefix_is_frozen_and_unchanged_by_training(name):
    """(b) k=2: the prefix's output (block 1) is bit-identical after optimiser steps; its parameters get no .grad."""
    entry = 2
    model = tiny_model(name, entry, "after_frozen")
    prefix_names = ["patch_embed.", "pos_embed", "cls_token", "norm_pre", "blocks.0.", "blocks.1."]
    prefix = {n: p for n, p in model.named_parameters() if any(n.startswith(s) for s in prefix_names)}
    assert prefix and not any(p.requires_grad for p in prefix.values())
    trainable = vitreg.trainable_parameter_names(model)
    assert "reg_token" in trainable and "head.weight" in trainable and "blocks.2.attn.qkv.weight" in trainable
    assert set(trainable) | set(prefix) == {n for n, _ in model.named_parameters()}

    outputs: list[torch.Tensor] = []
    hook = model.blocks[entry - 1].register_forward_hook(lambda module, args, out: outputs.append(out))
    probe = images(seed=5)
    model.eval()
    with torch.no_grad():
        model(probe)
    before = outputs.pop()
    before_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, images(seed=10 + step), torch.tensor([0, 1, 2, 3]))
        assert not outputs.pop().requires_grad  # the prefix ran without autograd, in training too
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in prefix.values())
    model.eval()
    with torch.no_grad():
        model(probe)
    hook.remove()
    assert torch.equal(outputs.pop(), before)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before_weights[n])}
    assert "reg_token" in changed and "blocks.3.mlp.fc2.weight" in changed and not changed & set(prefix)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("entry", [0, 1, 3])
def test_forward_equals_a_hand_written_forward(name, entry):
    """(c) the model's forward is: positions on [CLS, PATCH], blocks < k, registers inserted after CLS, the rest."""
    model = tiny_model(name, entry, "after_frozen").eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hand_forward(model, x, entry), rtol=1e-5, atol=1e-6)
        # and it differs from the same weights with registers at the input (k > 0): the entry is not a no-op
        if entry:
            plain = vitreg.set_register_entry_block(tiny_model(name, entry, "after_frozen"), None).eval()
            late, input_level = model.forward_features(x), plain.forward_features(x)
            assert (late - input_level).abs().max() > 1e-2 * late.abs().max()


@pytest.mark.parametrize("name", MODELS)
def test_taps_follow_the_late_entry(name):
    """(d) run_taps: patch norms at every layer equal the forward's own block outputs; CLS norms too; registers
    are NaN before the entry and finite after; attention columns stay aligned (checked against a hand softmax)."""
    entry = 2
    model = tiny_model(name, entry, "after_frozen").eval()
    x = images()
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in model.blocks]
    attention_inputs: dict[int, torch.Tensor] = {}
    for layer in (1, 3):  # the input of the attention (after norm1)
        keep = lambda m, a, out, layer=layer: attention_inputs.update({layer: out})
        hooks.append(model.blocks[layer].norm1.register_forward_hook(keep))
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    taps = vitreg.run_taps(model, x, attention_layers=None, full_attention_layers=[1], keep_block_outputs=[0, 3])

    torch.testing.assert_close(taps.logits, logits)
    assert taps.register_entry_block == entry and taps.patch_norms.shape == (4, 4, 16)
    for layer, out in enumerate(outputs):
        prefix = 1 if layer < entry else 1 + REGISTERS
        torch.testing.assert_close(taps.patch_norms[layer], out[:, prefix:].norm(dim=-1))
        torch.testing.assert_close(taps.cls_norms[layer], out[:, 0].norm(dim=-1))
        registers = taps.register_norms[layer]
        assert registers.isnan().all() if layer < entry else registers.isfinite().all()
    torch.testing.assert_close(taps.block_outputs[3], outputs[3])
    assert taps.block_outputs[0][:, 1 : 1 + REGISTERS].isnan().all()
    torch.testing.assert_close(taps.block_outputs[0][:, 1 + REGISTERS :], outputs[0][:, 1:])

    for layer in (1, 3):  # before and after the entry: CLS attention over patches from the block's own input
        attn = model.blocks[layer].attn
        tokens = attention_inputs[layer]
        qkv = attn.qkv(tokens).reshape(4, tokens.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        weights = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(dim=-1)  # (B, H, T', T')
        prefix = 1 if layer < entry else 1 + REGISTERS
        cls_row = taps.cls_attention[layer]  # (B, H, T)
        torch.testing.assert_close(cls_row[..., 1 + REGISTERS :], weights[:, :, 0, prefix:])
        assert cls_row[..., 1 : 1 + REGISTERS].isnan().all() == (layer < entry)
        assert taps.register_attention[layer].isnan().all() == (layer < entry)
    full = taps.full_attention[1]  # (B, H, T, T), before the entry
    assert full[:, :, 1 : 1 + REGISTERS].isnan().all() and full[:, :, :, 1 : 1 + REGISTERS].isnan().all()
    torch.testing.assert_close(full[:, :, 1 + REGISTERS :, 1 + REGISTERS :], weights_at(model, attention_inputs, 1))

    # query_attention: patch queries (in the model's order) before and after the entry, a register query -> NaN
    queries = torch.tensor([[0, 1, 1 + REGISTERS, 9]] * 4)
    rows = vitreg.query_attention(model, x, [1, 3], queries)  # (L, B, H, Q, T)
    torch.testing.assert_close(rows[0][:, :, [0, 2, 3]], full[:, :, [0, 1 + REGISTERS, 9]], equal_nan=True)
    assert rows[0][:, :, 1].isnan().all() and rows[1].isfinite().all()


def weights_at(model: nn.Module, attention_inputs: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
    """Patch-to-patch attention of block `layer` (before the entry: no registers) from its input, by hand."""
    attn, tokens = model.blocks[layer].attn, attention_inputs[layer]
    qkv = attn.qkv(tokens).reshape(*tokens.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(dim=-1)[:, :, 1:, 1:]


@pytest.mark.parametrize("name", MODELS)
def test_model_file_round_trip_rebuilds_the_entry(name, tmp_path):
    """(e) a model file (and a training state.pt) carries the entry block; the reload is the same model."""
    model = tiny_model(name, 2, "after_frozen")
    with torch.no_grad():
        model.reg_token.add_(1.0)  # something no fresh build has
    path = tmp_path / "model.safetensors"
    kwargs = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}
    info = vitreg.save_model_file(model, path, timm_name=name, frozen_blocks=2, model_kwargs=kwargs)
    assert info.register_entry_block == 2
    read = vitreg.read_model_file_info(path)
    assert read.register_entry_block == 2 and read.format_version == 2
    reloaded = vitreg.build_model(checkpoint=path)
    assert vitreg.register_entry_block(reloaded) == 2 and type(reloaded) is type(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    # the prefix stays frozen whatever is asked to freeze; more frozen blocks may be asked for
    assert not reloaded.blocks[1].attn.qkv.weight.requires_grad and reloaded.blocks[2].attn.qkv.weight.requires_grad
    assert vitreg.build_model(checkpoint=path, register_entry="after_frozen", frozen_blocks=2) is not None
    with pytest.raises(vitreg.ModelBuildError, match="entering at block 2.*register_entry='input'"):
        vitreg.build_model(checkpoint=path, register_entry="input")
    with pytest.raises(vitreg.ModelBuildError, match="entering at block 2"):
        vitreg.build_model(checkpoint=path, register_entry="after_frozen", frozen_blocks=1)

    # registers at the input: no entry block, and the file stays version 1 (readable by older vitreg)
    plain_path = tmp_path / "plain.safetensors"
    vitreg.save_model_file(tiny_model(name, 2, "input"), plain_path, timm_name=name, model_kwargs=kwargs)
    plain = vitreg.read_model_file_info(plain_path)
    assert plain.register_entry_block is None and plain.format_version == 1
    assert vitreg.register_entry_block(vitreg.build_model(checkpoint=plain_path)) is None

    # a training state.pt: its config's register_entry and frozen_blocks say where the registers enter
    config = {"model": name, "model_kwargs": kwargs, "frozen_blocks": 2, "register_entry": "after_frozen"}
    state = {"model": model.state_dict(), "config": config}
    torch.save(state, tmp_path / "state.pt")
    from_state = vitreg.build_model(checkpoint=tmp_path / "state.pt")
    assert vitreg.register_entry_block(from_state) == 2
    with torch.no_grad():
        torch.testing.assert_close(from_state.eval()(x), model(x), rtol=0, atol=0)


def test_penalty_before_the_entry_is_refused():
    model = tiny_model(MODELS[1], 2, "after_frozen")
    with pytest.raises(ValueError, match="penalty block 1 .*before block 2, where the registers enter"):
        vitreg.BlockOutputCapture(model, 1)
    vitreg.BlockOutputCapture(model, 2).remove()


def test_bad_entry_blocks_are_refused():
    model = tiny_model(MODELS[0], 0, "input")
    for block in (-1, 4, True):
        with pytest.raises(vitreg.ModelBuildError, match="register entry block .* must be in 0..3"):
            vitreg.set_register_entry_block(model, block)
    with pytest.raises(vitreg.ModelBuildError, match="register_entry='middle': allowed: input, after_frozen"):
        vitreg.build_model(MODELS[0], register_entry="middle", **TINY)


def test_config_validation_names_the_field_and_allowed_values(tiny):
    """(f) TrainConfig: an unknown mode, an entry past the last block, a penalty on the prefix."""
    assert REGISTER_ENTRIES == ("input", "after_frozen")
    assert tiny().register_entry == "input"
    assert tiny(register_entry="after_frozen").register_entry == "after_frozen"
    assert tiny(register_entry="after_frozen", frozen_blocks=0).frozen_blocks == 0  # allowed: embeddings frozen
    with pytest.raises(ValueError, match=r"^register_entry='late': allowed: input, after_frozen$"):
        tiny(register_entry="late")
    with pytest.raises(ValueError, match=r"^register_entry='after_frozen': .*frozen_blocks=4.*blocks 0..3"):
        tiny(register_entry="after_frozen", frozen_blocks=4)
    with pytest.raises(ValueError, match=r"^penalty_block=1: .*must be a block >= frozen_blocks=2"):
        tiny(register_entry="after_frozen", penalty_block=1)
    assert tiny(register_entry="input", penalty_block=1).penalty_block == 1  # the study's way: allowed


def test_config_refuses_to_contradict_a_model_file(tiny, tmp_path):
    name = tiny().model
    kwargs = tiny().model_kwargs
    torch.manual_seed(0)
    model = vitreg.build_model(name, registers=4, frozen_blocks=2, register_entry="after_frozen", img_size=32,
                               num_classes=3, **kwargs)  # fmt: skip
    path = tmp_path / "late.safetensors"
    vitreg.save_model_file(model, path, timm_name=name, model_kwargs=kwargs)
    base = {"checkpoint": str(path), "pretrained": False, "model_kwargs": {}}
    assert tiny(**base, register_entry="after_frozen").register_entry == "after_frozen"
    with pytest.raises(ValueError, match=r"^register_entry='input': checkpoint .* entering at block 2"):
        tiny(**base)


# DeiT-III Small (D=384, 12 blocks, MLP 1536, 16 px patches, 196 positions, 1000 classes), counted by hand.
D = 384
BLOCK = 12 * D * D + 15 * D  # qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, two LayerNorms 4D, two LayerScales 2D
HEAD_AND_NORM = D * 1000 + 1000 + 2 * D
POS_AND_CLS = 196 * D + D
# The study's Table 8 "Parameters" (its trainable set: registers at the input), (frozen blocks, registers) -> count.
TABLE_8 = {(11, 0): 2_236_648, (11, 4): 2_238_184, (10, 0): 4_011_880, (10, 4): 4_013_416, (8, 0): 7_562_344,
           (8, 4): 7_563_880}  # fmt: skip


@pytest.mark.parametrize("frozen", [0, 8, 10, 11])
@pytest.mark.parametrize("registers", [0, 4])
def test_trainable_counts_of_deit3_small(frozen, registers):
    """(g) trainable parameters on the meta device against a hand count, both modes."""
    counts = {}
    for entry in REGISTER_ENTRIES:
        with torch.device("meta"):
            model = vitreg.build_model(
                "deit3_small_patch16_224", registers=registers, frozen_blocks=frozen, register_entry=entry
            )
        counts[entry] = vitreg.trainable_parameters(model)
    patch_embed = 3 * 16 * 16 * D + D
    late = (12 - frozen) * BLOCK + HEAD_AND_NORM + registers * D
    assert counts["after_frozen"] == late
    assert counts["input"] == late + POS_AND_CLS + (patch_embed if frozen == 0 else 0)
    if (frozen, registers) in TABLE_8:
        assert counts["input"] == TABLE_8[frozen, registers]
