"""The Qwen2.5-VL vision tower loaded from a QTSplus checkpoint (qtsplus_vllm.vision)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from qtsplus_vllm.checkpoint import CheckpointReader, load_config
from qtsplus_vllm.config import VISION_PREFIX, CheckpointError, resolve_vision_config
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.videos import render_frames
from qtsplus_vllm.video import PreprocessConfig, preprocess_frames
from qtsplus_vllm.vision import VisionEncoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vision") / "model", seed=11)


def _inputs(frames=4, size=(96, 64), seed=0):
    return preprocess_frames(render_frames(frames, size, seed=seed))


def test_output_is_m_rows_of_hidden_size(model_dir):
    config = load_config(model_dir)
    encoder = VisionEncoder.from_checkpoint(CheckpointReader(model_dir), config)
    inputs = _inputs()
    x = encoder(inputs.pixel_values, inputs.grid_thw)
    assert x.shape == (inputs.num_visual_tokens, config.hidden_size)
    assert torch.isfinite(x).all() and x.std() > 0


def test_matches_a_plainly_built_transformers_tower(model_dir):
    """Meta-device construction + assigned weights + rebuilt rotary buffer == an ordinary build."""
    config = load_config(model_dir)
    reader = CheckpointReader(model_dir)
    encoder = VisionEncoder.from_checkpoint(reader, config)
    vision_config = resolve_vision_config(config, reader.shapes(VISION_PREFIX))
    vision_config._attn_implementation = "eager"
    plain = Qwen2_5_VisionTransformerPretrainedModel(vision_config).eval()
    plain.load_state_dict(reader.load_prefix(VISION_PREFIX, dtype=torch.float32))
    inputs = _inputs(frames=6, size=(160, 120), seed=3)  # several attention windows per frame
    with torch.inference_mode():
        expected = plain(inputs.pixel_values, grid_thw=inputs.grid_thw).pooler_output
    torch.testing.assert_close(encoder(inputs.pixel_values, inputs.grid_thw), expected, rtol=1e-4, atol=1e-5)


def test_several_videos_in_one_call_equal_separate_calls(model_dir):
    encoder = VisionEncoder.from_checkpoint(CheckpointReader(model_dir), load_config(model_dir))
    a, b = _inputs(seed=1), _inputs(frames=6, size=(64, 96), seed=2)
    both = encoder(torch.cat([a.pixel_values, b.pixel_values]), torch.cat([a.grid_thw, b.grid_thw]))
    alone = torch.cat([encoder(a.pixel_values, a.grid_thw), encoder(b.pixel_values, b.grid_thw)])
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)


def test_projector_maps_vit_width_to_hidden(model_dir, tmp_path):
    """A checkpoint with model.mm_projector.weight applies it after the merger (no bias)."""
    import shutil

    copy = tmp_path / "with_projector"
    shutil.copytree(model_dir, copy)
    weights = load_file(copy / "model.safetensors")
    d = weights["model.embed_tokens.weight"].shape[1]
    projector = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) / d**0.5
    save_file(
        {**weights, "model.mm_projector.weight": projector},
        copy / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = load_config(copy)
    inputs = _inputs()
    plain = VisionEncoder.from_checkpoint(CheckpointReader(model_dir), config)
    projected = VisionEncoder.from_checkpoint(CheckpointReader(copy), config)
    assert projected.projector is not None
    torch.testing.assert_close(
        projected(inputs.pixel_values, inputs.grid_thw),
        plain(inputs.pixel_values, inputs.grid_thw) @ projector.T,
        rtol=1e-4,
        atol=1e-5,
    )


def test_bf16_tower_runs_in_bf16(model_dir):
    encoder = VisionEncoder.from_checkpoint(
        CheckpointReader(model_dir), load_config(model_dir), dtype=torch.bfloat16
    )
    inputs = preprocess_frames(render_frames(4, (64, 64)), PreprocessConfig(), dtype=torch.bfloat16)
    assert encoder(inputs.pixel_values, inputs.grid_thw).dtype == torch.bfloat16


def test_missing_vision_tensor_is_named(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(model_dir, copy)
    weights = load_file(copy / "model.safetensors")
    del weights["model.vision_tower.blocks.1.attn.proj.bias"]
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.vision_tower\.blocks\.1\.attn\.proj\.bias"):
        VisionEncoder.from_checkpoint(CheckpointReader(copy), load_config(copy))
