"""qtsplus_vllm.convert: a tiny QTSplus checkpoint becomes a stock Qwen2.5-VL checkpoint that
transformers loads without missing or unexpected keys, with the same LM, the same ViT output and a
video processor that gives our grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from qtsplus_vllm.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader, load_config
from qtsplus_vllm.config import CheckpointError
from qtsplus_vllm.convert import convert_to_qwen2_5_vl, main
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.videos import render_frames
from qtsplus_vllm.video import CLIP_STD, preprocess_frames
from qtsplus_vllm.vision import VisionEncoder

LAYOUTS = {"single": dict(sharded=False, tied=False), "sharded-tied": dict(sharded=True, tied=True)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = write_tiny_checkpoint(root / "src", seed=5, **LAYOUTS[request.param])
    assert main([str(src), str(root / "out")]) == 0
    return src, root / "out"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "src", seed=5)


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in path.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def test_config_is_a_qwen2_5_vl_config_with_the_source_text_model(converted):
    src, out = converted
    source = load_config(src)
    config = AutoConfig.from_pretrained(out)
    assert type(config).__name__ == "Qwen2_5_VLConfig"
    assert config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    text = config.get_text_config()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings"):  # fmt: skip
        assert getattr(text, key) == getattr(source, key), key
    assert text.rope_parameters["mrope_section"] == source.rope_parameters["mrope_section"]
    assert config.tie_word_embeddings == source.tie_word_embeddings
    vocab = AutoTokenizer.from_pretrained(src).get_vocab()
    assert (config.image_token_id, config.video_token_id) == (vocab["<|image_pad|>"], vocab["<|video_pad|>"])
    assert config.vision_start_token_id == vocab["<|vision_start|>"]
    assert config.vision_end_token_id == vocab["<|vision_end|>"]
    assert config.vision_config.tokens_per_second == 2
    raw = json.loads((out / "config.json").read_text())
    leaked = [k for k in raw if k.startswith(("qts_plus", "lambda_")) or k in ("vision_tower", "auto_map")]
    assert not leaked
    # tokenizer, chat template and generation config travel unchanged
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_weights_are_renamed_unchanged_and_keep_the_sharding(converted):
    src, out = converted
    source, result = tensors(src), tensors(out)
    expected = {}
    for name, tensor in source.items():
        if name.startswith("model.vision_tower."):
            expected["visual." + name[len("model.vision_tower.") :]] = tensor
        elif not name.startswith("model.qts_plus."):
            expected[name] = tensor
    assert sorted(result) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(result[name], tensor), name
    if (src / INDEX_FILE).is_file():
        weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
        assert set(weight_map) == set(expected)
        source_map = json.loads((src / INDEX_FILE).read_text())["weight_map"]
        for name, file in weight_map.items():
            original = "model.vision_tower." + name[7:] if name.startswith("visual.") else name
            assert source_map[original] == file
            with safe_open(out / file, framework="pt") as f:
                assert name in f.keys()
    else:
        assert [p.name for p in out.glob("*.safetensors")] == [SINGLE_FILE]
        assert not (out / INDEX_FILE).exists()


def test_transformers_loads_it_and_its_vit_equals_ours(converted):
    src, out = converted
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="sdpa"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    source = tensors(src)
    lm = model.model.language_model.state_dict()
    assert all(torch.equal(v, source["model." + k]) for k, v in lm.items())
    head = source.get("lm_head.weight", source["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, head)

    inputs = preprocess_frames(render_frames(6, (96, 64), seed=1))
    ours = VisionEncoder.from_checkpoint(CheckpointReader(src), load_config(src))
    with torch.inference_mode():
        theirs = model.eval().model.visual(inputs.pixel_values, grid_thw=inputs.grid_thw).pooler_output
        torch.testing.assert_close(theirs, ours(inputs.pixel_values, inputs.grid_thw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames, size", [(6, (96, 64)), (4, (640, 360)), (2, (300, 1000))])
def test_stock_video_processor_gives_our_grid(tiny, tmp_path, frames, size):
    out = convert_to_qwen2_5_vl(tiny, tmp_path / "out")
    video = render_frames(frames, size, seed=2)
    ours = preprocess_frames(video)
    theirs = AutoProcessor.from_pretrained(out).video_processor(videos=[video], return_tensors="pt")
    assert theirs["video_grid_thw"].tolist() == ours.grid_thw.tolist()
    # torchvision v2's uint8 bicubic kernel vs v1's float path: a level or two of 255 apart, rarely more
    levels = (theirs["pixel_values_videos"] - ours.pixel_values).abs() * 255 * min(CLIP_STD)
    assert (levels > 2.5).float().mean() < 1e-3


def test_pixel_bounds_follow_the_arguments(tiny, tmp_path):
    out = convert_to_qwen2_5_vl(tiny, tmp_path / "out", max_pixels=20 * 28 * 28, min_pixels=8 * 28 * 28)
    size = json.loads((out / "video_preprocessor_config.json").read_text())["size"]
    assert size == {"shortest_edge": 8 * 28 * 28, "longest_edge": 20 * 28 * 28}
    with pytest.raises(ValueError, match="1.05"):
        convert_to_qwen2_5_vl(tiny, tmp_path / "bad", max_pixels=100 * 28 * 28, min_pixels=100 * 28 * 28)
    assert not (tmp_path / "bad").exists()


def test_source_with_a_projector_is_refused(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "src", with_projector=True, vision_out_hidden=96)
    with pytest.raises(CheckpointError, match="mm_projector"):
        convert_to_qwen2_5_vl(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main([str(src), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_unknown_tensor_and_missing_source_are_errors(tiny, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for file in tiny.iterdir():
        (src / file.name).write_bytes(file.read_bytes())
    weights = load_file(src / SINGLE_FILE)
    save_file({**weights, "model.extra.weight": torch.from_numpy(np.ones(3, np.float32))}, src / SINGLE_FILE)
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        convert_to_qwen2_5_vl(src, tmp_path / "out")
    assert main([str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert "error: " in capsys.readouterr().err
