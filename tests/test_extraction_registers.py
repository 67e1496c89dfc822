"""The probes' extraction (`analysis.bank.record_batch`, what every probe reads) on a model with registers, against
a forward pass written out from the weights: every array lines up with the right tokens, none is shifted by the
register count, and the planted artifacts are found where they were planted."""

from __future__ import annotations

import numpy as np
import torch
from oracles import explicit_prefix_attention

import vitreg
from analysis.bank import BankContents, record_batch
from analysis.probe_settings import ProbeSettings
from vitreg.synthetic import planted_artifact_vit, planted_images

PLANTED = [(0, 1), (6, 7), (7, 0)]  # (row, col) on the 8 x 8 patch grid


def test_extraction_with_registers_holds_the_explicit_forward_token_for_token() -> None:
    registers = 3
    # std 1: registers that differ from each other and draw attention, so a swapped or shifted slot shows.
    model = vitreg.add_registers(planted_artifact_vit(plant_block=2), registers, init_std=1.0).eval()
    images = planted_images(PLANTED, batch=2)
    ids = np.array([5, 9])
    settings = ProbeSettings(top_tokens=3, random_tokens=4, sample_seed=0)
    contents = BankContents(train=True, samples=True, segmentation=True)
    with torch.inference_mode():
        arrays = record_batch(model, images, ids, contents, settings, block_inputs=False)
        rows, norms, outputs = explicit_prefix_attention(model, images)  # (B, L, 1+R, T), (B, L, T), (B, L, T, C)
        normalised = model.norm(outputs[:, -1])  # (B, T, C)
    prefix, depth = 1 + registers, len(model.blocks)
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    for layer in range(depth):
        close(arrays[f"patch_norms.{layer}"], norms[:, layer, prefix:].numpy())
    close(arrays["cls_norms"], norms[:, :, 0].numpy())  # (B, L)
    close(arrays["register_norms"], norms[:, :, 1:prefix].numpy())  # (B, L, R)
    close(arrays["attention"], rows[:, -1, 0, prefix:].numpy())  # CLS over the patches, last block
    close(arrays["registers"], rows[:, -1, 1:, prefix:].numpy())  # each register over the patches
    close(arrays["cls"], normalised[:, 0].numpy())
    close(arrays["mean_patch"], normalised[:, prefix:].mean(dim=1).numpy())
    close(arrays["seg.patches"], normalised[:, prefix:].half().float().numpy())
    assert "seg.block_inputs" not in arrays  # the last-block + new registers heads are for register-free models

    planted = sorted(row * 8 + col for row, col in PLANTED)
    for layer in range(depth):
        top = arrays[f"sample.{layer}.top_index"]  # (B, 3) patch indices (no prefix offset)
        kept = arrays[f"sample.{layer}.top_features"]
        patches = outputs[:, layer, prefix:]
        for image in range(2):
            close(kept[image], patches[image, top[image]].numpy())
            random = arrays[f"sample.{layer}.random_index"][image]
            close(arrays[f"sample.{layer}.random_features"][image], patches[image, random].numpy())
            assert not set(random) & set(top[image])
        if layer >= 2:  # from the planted block on, the artifacts are the highest-norm patches
            assert all(sorted(top[image]) == planted for image in range(2)), (layer, top)
    assert sorted(np.argsort(arrays[f"patch_norms.{depth - 1}"][0])[-3:]) == planted
