"""The Qwen2.5-VL vision tower loaded from a QTSplus checkpoint (qtsplus_vllm.vision)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from qtsplus_vllm import vision
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


# ----------------------------------------------------------------------------- attention implementations
# transformers' SDPA path runs one attention call per window (and per temporal slice in full-attention
# blocks); the varlen implementations run one call per layer. Small shapes, CPU, fp32.


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    """ViT depth 8: blocks 0-6 attend within windows, block 7 within temporal slices (full attention)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vision-deep") / "model", seed=5, vision_depth=8)


def _counting(monkeypatch, module, attr):
    calls = []
    original = getattr(module, attr)

    def wrapper(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, attr, wrapper)
    return calls


def _reference_varlen(q, k, v, cu, scale):
    """Exact per-sequence attention in float64: what every varlen kernel must compute."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[s:e].double().transpose(0, 1) for x in (q, k, v))  # [H, len, Dh]
        weights = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[s:e] = (weights @ vs).transpose(0, 1).to(q.dtype)
    return out


class FakeTorchVarlen:
    """torch.nn.attention.varlen.varlen_attn's contract (torch >= 2.10: keyword ``scale``)."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        return self._run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)

    def _run(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale):
        assert query.ndim == 3 and query.shape == key.shape == value.shape  # [T, H, Dh]
        assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
        assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
        self.calls.append(query.shape)
        return _reference_varlen(query, key, value, cu_seq_q, scale or query.shape[-1] ** -0.5)


def fake_torch_varlen_without_scale(calls):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert not is_causal
        calls.append(query.shape)
        return _reference_varlen(query, key, value, cu_seq_q, query.shape[-1] ** -0.5)

    return varlen_attn


def fake_flash_varlen(calls):
    """flash_attn_varlen_func's contract (the flash-attn package and vllm.vllm_flash_attn)."""

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False
    ):
        assert not causal and q.ndim == 3 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        assert cu_seqlens_q.dtype == torch.int32
        assert max_seqlen_q == max_seqlen_k == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        calls.append(q.shape)
        return _reference_varlen(q, k, v, cu_seqlens_q, softmax_scale)

    return flash_attn_varlen_func


def test_cpu_default_is_transformers_sdpa(model_dir, monkeypatch):
    monkeypatch.delenv(vision.ATTENTION_ENV, raising=False)
    encoder = VisionEncoder.from_checkpoint(CheckpointReader(model_dir), load_config(model_dir))
    assert encoder.attention == "sdpa" and encoder.vit.config._attn_implementation == "sdpa"
    assert vision.pick_attention("cpu", torch.float32) == "sdpa"
    assert vision.pick_attention("cpu", torch.bfloat16) == "sdpa"


def test_padded_sdpa_is_one_call_per_layer_and_equals_the_loop(deep_model_dir, monkeypatch):
    monkeypatch.delenv(vision.ATTENTION_ENV, raising=False)
    config = load_config(deep_model_dir)
    encoder = VisionEncoder.from_checkpoint(CheckpointReader(deep_model_dir), config)
    depth = len(encoder.vit.blocks)
    inputs = _inputs(frames=6, size=(200, 150), seed=4)  # windows of several sizes, 3 temporal slices
    calls = _counting(monkeypatch, F, "scaled_dot_product_attention")
    loop = encoder(inputs.pixel_values, inputs.grid_thw)
    loop_calls = len(calls)
    assert loop_calls > 3 * depth  # the per-window loop: many calls per layer

    calls.clear()
    assert encoder.set_attention("sdpa_padded") == "sdpa_padded" and encoder.attention == "sdpa_padded"
    padded = encoder(inputs.pixel_values, inputs.grid_thw)
    assert len(calls) == depth  # one call per layer, window and full-attention blocks alike
    torch.testing.assert_close(padded, loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernel", ["torch_varlen", "torch_varlen_without_scale", "flash_attn", "vllm_flash_attn"]
)
def test_varlen_kernels_are_one_call_per_layer_and_equal_sdpa(deep_model_dir, monkeypatch, kernel):
    """The kernels need CUDA: doubles with their exact contract stand in for them on the CPU."""
    monkeypatch.delenv(vision.ATTENTION_ENV, raising=False)
    name = kernel.removesuffix("_without_scale")
    calls = []
    if kernel == "torch_varlen":
        fake = FakeTorchVarlen()
        calls = fake.calls
    elif kernel == "torch_varlen_without_scale":
        fake = fake_torch_varlen_without_scale(calls)
    else:
        fake = fake_flash_varlen(calls)
    monkeypatch.setitem(vision.FN_GETTERS, name, lambda: fake)
    monkeypatch.setattr(vision, "_probe", lambda n, device, dtype: None)  # "runs here"

    encoder = VisionEncoder.from_checkpoint(CheckpointReader(deep_model_dir), load_config(deep_model_dir))
    inputs = _inputs(frames=6, size=(200, 150), seed=6)
    expected = encoder(inputs.pixel_values, inputs.grid_thw)  # CPU default: SDPA loop
    sdpa_calls = _counting(monkeypatch, F, "scaled_dot_product_attention")
    encoder.set_attention(name)
    out = encoder(inputs.pixel_values, inputs.grid_thw)
    assert len(calls) == len(encoder.vit.blocks) and not sdpa_calls
    assert all(shape == (inputs.pixel_values.shape[0], 2, 80) for shape in calls)  # [T, H, Dh] packed
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_torch_varlen_without_scale_folds_a_custom_scale_into_q(monkeypatch):
    calls = []
    monkeypatch.setitem(vision.FN_GETTERS, "torch_varlen", lambda: fake_torch_varlen_without_scale(calls))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, 2, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    out = vision.RUNNERS["torch_varlen"](q, k, v, cu, 7, 0.3)
    torch.testing.assert_close(out, _reference_varlen(q, k, v, cu, 0.3), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1


def test_padded_sdpa_handles_uneven_and_lopsided_sequences():
    gen = torch.Generator().manual_seed(1)
    for lengths in ([5, 1, 9, 3], [40, 1, 1]):  # the second pads > 4x: the per-sequence loop instead
        t = sum(lengths)
        q, k, v = (torch.randn(t, 3, 8, generator=gen) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        out = vision.RUNNERS["sdpa_padded"](q, k, v, cu, max(lengths), 8**-0.5)
        torch.testing.assert_close(out, _reference_varlen(q, k, v, cu, 8**-0.5), rtol=1e-5, atol=1e-6)


def test_auto_chooses_by_device_and_dtype(monkeypatch):
    """Only fp16/bf16 get the flash kernels (they have no fp32); fp32 on CUDA gets one padded SDPA call."""
    monkeypatch.delenv(vision.ATTENTION_ENV, raising=False)
    installed = {"flash_attn"}  # e.g. flash-attn installed, no vLLM, a torch without varlen

    def probe(name, device, dtype):
        if name in ("sdpa", "sdpa_padded"):
            return None
        if device.type != "cuda" or dtype not in vision.HALF:
            return "not here"
        return None if name in installed else "not installed"

    monkeypatch.setattr(vision, "_probe", probe)
    assert vision.pick_attention("cuda", torch.bfloat16) == "flash_attn"
    assert vision.pick_attention("cuda", torch.float16) == "flash_attn"
    assert vision.pick_attention("cuda", torch.float32) == "sdpa_padded"
    assert vision.pick_attention("cpu", torch.bfloat16) == "sdpa"
    installed.update({"torch_varlen", "vllm_flash_attn"})
    assert vision.pick_attention("cuda", torch.bfloat16) == "vllm_flash_attn"
    installed.discard("vllm_flash_attn"), installed.discard("flash_attn")
    assert vision.pick_attention("cuda", torch.bfloat16) == "torch_varlen"
    installed.clear()
    assert vision.pick_attention("cuda", torch.bfloat16) == "sdpa_padded"


def test_flash_kernels_refuse_fp32_without_touching_cuda():
    for name in vision.VARLEN_KERNELS:
        assert "fp16/bf16 only" in vision._probe.__wrapped__(name, torch.device("cuda", 0), torch.float32)
        assert "needs CUDA" in vision._probe.__wrapped__(name, torch.device("cpu"), torch.bfloat16)


def test_forcing_an_attention_that_cannot_run_is_an_error(model_dir, monkeypatch):
    reader, config = CheckpointReader(model_dir), load_config(model_dir)
    monkeypatch.setenv(vision.ATTENTION_ENV, "torch_varlen")
    with pytest.raises(ValueError, match="torch_varlen.*needs CUDA"):
        VisionEncoder.from_checkpoint(reader, config)
    monkeypatch.setenv(vision.ATTENTION_ENV, "magic")
    with pytest.raises(
        ValueError, match=r"QTSPLUS_VIT_ATTENTION='magic': must be one of auto, vllm_flash_attn"
    ):
        VisionEncoder.from_checkpoint(reader, config)
    monkeypatch.setenv(vision.ATTENTION_ENV, "sdpa_padded")
    assert VisionEncoder.from_checkpoint(reader, config).attention == "sdpa_padded"


def test_selection_with_padded_attention_equals_the_oracle_in_fp32(model_dir, monkeypatch):
    """The selection (n and indices) through the one-call ViT path is the oracle's (SDPA loop) in fp32."""
    from qtsplus_vllm.options import SelectionOptions
    from qtsplus_vllm.reference import ReferencePipeline
    from qtsplus_vllm.runtime import SelectionRuntime

    monkeypatch.delenv(vision.ATTENTION_ENV, raising=False)
    oracle = ReferencePipeline(model_dir)
    assert oracle.vision.attention == "sdpa"
    frames = render_frames(8, (200, 150), seed=9)
    question = "Which way does the square move?"
    expected = oracle.answer(frames, question, max_new_tokens=1).selection
    monkeypatch.setenv(vision.ATTENTION_ENV, "sdpa_padded")
    runtime = SelectionRuntime(model_dir, torch.float32, "cpu")
    result = runtime.select(frames, oracle.question_ids(question), SelectionOptions())
    if hasattr(runtime, "vision"):
        assert runtime.vision.attention == "sdpa_padded"
    assert result.n == expected.n and result.rho == pytest.approx(expected.rho)
    assert torch.equal(result.indices, expected.indices.cpu())
    torch.testing.assert_close(result.embeds, expected.embeds.cpu(), rtol=1e-5, atol=1e-5)
    assert math.isfinite(result.rho)
