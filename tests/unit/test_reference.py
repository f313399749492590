"""The eager oracle pipeline on a tiny checkpoint and generated videos."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from qtsplus_vllm.config import CheckpointError
from qtsplus_vllm.reference import ReferencePipeline, main
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.video import VideoDecodeError

QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    model = write_tiny_checkpoint(root / "model", seed=3)
    video = make_video(root / "clip.mp4", frames=12, size=(96, 64), fps=4.0, seed=5)
    return model, video


@pytest.fixture(scope="module")
def pipeline(tiny):
    return ReferencePipeline(tiny[0])


def test_answers_are_deterministic(tiny, pipeline):
    first = pipeline.answer(tiny[1], QUESTION, max_new_tokens=12)
    again = pipeline.answer(tiny[1], QUESTION, max_new_tokens=12)
    fresh = ReferencePipeline(tiny[0]).answer(tiny[1], QUESTION, max_new_tokens=12)
    assert first.token_ids == again.token_ids == fresh.token_ids
    assert len(first.token_ids) > 0
    assert torch.equal(first.selection.indices, fresh.selection.indices)


def test_splice_expands_the_placeholder_to_exactly_n_rows(tiny, pipeline):
    result = pipeline.answer(tiny[1], QUESTION, max_new_tokens=2)
    template = pipeline.prompt_ids(QUESTION)
    n = result.selection.n
    assert 1 <= n <= result.num_visual_tokens
    assert result.prompt_ids.count(pipeline.video_pad_id) == n
    assert len(result.prompt_ids) == len(template) - 1 + n
    assert result.positions == list(range(len(result.prompt_ids)))
    # the question is different => the selection (and usually n) may change, never the layout rule
    other = pipeline.answer(tiny[1], "Which colour is the background?", max_new_tokens=2)
    assert other.prompt_ids.count(pipeline.video_pad_id) == other.selection.n


def test_spliced_embeddings_are_the_selected_rows(tiny, pipeline):
    result = pipeline.answer(tiny[1], QUESTION, max_new_tokens=1)
    ids, embeds = pipeline.splice(pipeline.prompt_ids(QUESTION), result.selection.embeds)
    at = ids.index(pipeline.video_pad_id)
    n = result.selection.n
    torch.testing.assert_close(embeds[at : at + n], result.selection.embeds, rtol=0, atol=0)
    text_rows = torch.tensor(ids[:at] + ids[at + n :])
    torch.testing.assert_close(
        torch.cat([embeds[:at], embeds[at + n :]]), pipeline.lm.embed_tokens(text_rows), rtol=0, atol=0
    )


def test_sequential_positions_equal_a_plain_qwen2_decoder(tiny, pipeline):
    """M-RoPE with three equal axes is ordinary 1-D RoPE: a Qwen2 decoder on the same weights agrees."""
    result = pipeline.answer(tiny[1], QUESTION, max_new_tokens=6)
    cfg = json.loads((tiny[0] / "config.json").read_text())
    qwen2 = Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    model = Qwen2ForCausalLM(qwen2).eval()
    weights = {}
    for f in sorted(tiny[0].glob("*.safetensors")):
        weights.update(load_file(f))
    lm_weights = {
        k: v.float()
        for k, v in weights.items()
        if k.startswith(("model.layers", "model.norm", "model.embed", "lm_head"))
    }
    missing, unexpected = model.load_state_dict(lm_weights, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    _, embeds = pipeline.splice(pipeline.prompt_ids(QUESTION), result.selection.embeds)
    with torch.inference_mode():
        tokens, seq = [], embeds[None]
        for _ in range(len(result.token_ids)):
            logits = model(inputs_embeds=seq).logits[0, -1]
            tokens.append(int(logits.argmax()))
            seq = torch.cat([seq, model.model.embed_tokens(torch.tensor([[tokens[-1]]]))], dim=1)
    assert tokens == result.token_ids


def test_frames_input_equals_file_input(tiny, pipeline):
    from qtsplus_vllm.video import SamplingConfig, decode_video

    frames = decode_video(tiny[1], SamplingConfig()).frames
    a = pipeline.answer(frames, QUESTION, max_new_tokens=4)
    b = pipeline.answer(tiny[1], QUESTION, max_new_tokens=4)
    assert a.token_ids == b.token_ids and a.num_frames == b.num_frames


def test_empty_question_is_rejected(tiny, pipeline):
    with pytest.raises(ValueError, match="empty question"):
        pipeline.answer(tiny[1], "   ")


def test_undecodable_and_frameless_videos_are_rejected(tmp_path, pipeline):
    with pytest.raises(VideoDecodeError):
        pipeline.answer(b"\x00\x01 this is not a video" * 50, QUESTION)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError):
        pipeline.answer(str(empty), QUESTION)


def test_checkpoint_with_a_missing_tensor_is_rejected(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "broken", seed=1)
    weights = load_file(model / "model.safetensors")
    del weights["model.qts_plus.selector.budget.mlp.2.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.qts_plus\.selector\.budget\.mlp\.2\.weight"):
        ReferencePipeline(model)


def test_cli_prints_answer_and_counts(tiny, capsys):
    code = main(
        ["--model", str(tiny[0]), "--video", str(tiny[1]), "--question", QUESTION, "--max-new-tokens", "3"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("answer: ")
    assert " M=" in out and " n=" in out


def test_cli_reports_bad_video_without_traceback(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 100)
    code = main(["--model", str(tiny[0]), "--video", str(bad), "--question", QUESTION])
    assert code == 2
    assert "error:" in capsys.readouterr().err


def test_demo_eager_mode_prints_the_oracle_answer(capsys):
    from qtsplus_vllm.demo import main as demo

    assert demo(["--eager", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "oracle:" in out and " M=" in out and " n=" in out
