"""benchmarks/bench_pipeline.py at the tiny shapes on the CPU: result fields, M/n, TTFT sums, KV ratio."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.videos import render_frames
from qtsplus_vllm.video import preprocess_frames

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pipeline.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pipeline"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "result.json"
    argv = ["--model", "tiny", "--device", "cpu", "--minutes", "0.25", "--iters", "1", "--warmup", "0",
            "--decode-steps", "2", "--height", "120", "--width", "214", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_result_records_the_run(result):
    for key in ("command", "git_sha", "machine", "versions", "settings", "shapes", "video", "stages",
                "kv_cache", "derived", "implementations", "layers_timed", "layers_total"):  # fmt: skip
        assert key in result, key
    assert "bench_pipeline.py" in result["command"] and "--minutes 0.25" in result["command"]
    assert {"torch", "transformers", "qtsplus_vllm"} <= set(result["versions"])
    assert result["settings"]["dtype"] == "fp32" and result["settings"]["model"] == "tiny"
    assert (result["layers_timed"], result["layers_total"]) == (2, 2)
    stages = ["decode_sampling", "preprocess", "vit", "selector", "prefill_selected",
              "decode_token_selected", "prefill_all", "decode_token_all"]  # fmt: skip
    assert list(result["stages"]) == stages
    for name in stages:
        stage = result["stages"][name]
        assert stage["median_ms"] > 0 and len(stage["samples_ms"]) == (2 if "decode_token" in name else 1)


def test_visual_token_counts_are_consistent(bench, result):
    video, nmax = result["video"], result["shapes"]["selector"]["nmax"]
    t, h, w = video["grid_thw"]
    assert video["frames_sampled"] == 2 * t == bench.sampled_frames(0.25, 30.0, 1.0)
    assert video["resized_hw"] == [h * 14, w * 14]
    assert video["M"] == t * (h // 2) * (w // 2)
    assert video["rho"] == 0.5 and video["rho_source"] == "forced"
    assert video["n"] == min(nmax, math.ceil(0.5 * video["M"])) and 1 <= video["n"] <= video["M"]
    assert 1 <= video["n_head"] <= min(nmax, video["M"]) and 0.05 <= video["rho_head"] <= 0.5
    prompt = result["settings"]["prompt_tokens"]
    assert result["stages"]["prefill_selected"]["tokens"] == video["n"] + prompt
    assert result["stages"]["prefill_all"]["tokens"] == video["M"] + prompt


def test_ttft_components_sum_up(result):
    ms = {name: stage["median_ms"] for name, stage in result["stages"].items()}
    derived = result["derived"]
    shared = ms["decode_sampling"] + ms["preprocess"] + ms["vit"]
    assert derived["ttft_selected_ms"] == pytest.approx(shared + ms["selector"] + ms["prefill_selected"])
    assert derived["ttft_all_ms"] == pytest.approx(shared + ms["prefill_all"])
    assert derived["followup_selected_ms"] == pytest.approx(ms["selector"] + ms["prefill_selected"])
    assert derived["ttft_ratio_selected_over_all"] == pytest.approx(
        derived["ttft_selected_ms"] / derived["ttft_all_ms"]
    )
    assert derived["followup_over_cold"] == pytest.approx(
        derived["followup_selected_ms"] / derived["ttft_selected_ms"]
    )
    decode = result["stages"]["decode_sampling"]  # a 16 s file (whole 2 s clips) scaled to 15 s
    assert decode["scale"] == pytest.approx(15 / 16)
    assert decode["median_ms"] == pytest.approx(statistics.median(decode["samples_ms"]) * decode["scale"])


def test_kv_bytes_follow_token_counts(result):
    kv, video, lm = result["kv_cache"], result["video"], result["shapes"]["lm"]
    assert kv["bytes_per_token"] == 2 * lm["layers"] * lm["kv_heads"] * (lm["hidden"] // lm["heads"]) * 4
    assert kv["visual_selected"] / kv["visual_all"] == pytest.approx(video["n"] / video["M"])
    assert result["derived"]["kv_ratio_selected_over_all"] == pytest.approx(video["n"] / video["M"])


def test_tiny_shapes_are_the_tiny_checkpoint_defaults(bench):
    defaults = {k: p.default for k, p in inspect.signature(write_tiny_checkpoint).parameters.items()}
    lm, vit = bench.MODELS["tiny"]
    assert (lm.hidden, lm.layers, lm.heads, lm.kv_heads, lm.intermediate) == (
        defaults["hidden"], defaults["layers"], defaults["heads"], defaults["kv_heads"], defaults["intermediate"],
    )  # fmt: skip
    assert (vit["depth"], vit["hidden_size"], vit["intermediate_size"], vit["out_hidden_size"]) == (
        defaults["vision_depth"], defaults["vision_hidden"], defaults["vision_intermediate"], defaults["hidden"],
    )  # fmt: skip


def test_chunked_vit_equals_one_call(bench):
    """Neither window nor full attention crosses temporal groups, so chunking the ViT changes nothing."""
    # a full-attention block between window-attention blocks
    spec = dict(bench.MODELS["tiny"][1], depth=3, fullatt_block_indexes=[1])
    encoder = bench.build_vit(spec, torch.device("cpu"), torch.float32, seed=0)
    inputs = preprocess_frames(render_frames(10, (200, 150), seed=1))  # 5 temporal groups, several windows
    whole = bench.encode_video(encoder, inputs.pixel_values, inputs.grid_thw, 0)
    chunked = bench.encode_video(encoder, inputs.pixel_values, inputs.grid_thw, 2)
    assert whole.shape == (inputs.num_visual_tokens, 128)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lm-layers", "3"], "--lm-layers must be in [1, 2]"),
        (["--rho", "1.5"], "--rho must be"),
        (["--minutes", "0"], "--minutes must be a positive number"),
        (["--decode-minutes", "2", "--minutes", "1"], "exceeds --minutes"),
        (["--width", "641"], "must be even"),
    ],
)
def test_bad_arguments_are_rejected_with_their_values(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "tiny", "--device", "cpu", *argv])
    assert message in capsys.readouterr().err
