"""Cost-proportional benchmark presets (issue 22, item 1): the FLOP arithmetic, the presets, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtsplus_vllm.checkpoint import CheckpointReader, load_config
from qtsplus_vllm.config import VISION_PREFIX, resolve_vision_config
from qtsplus_vllm.testing import proportional as prop
from qtsplus_vllm.testing.tiny_checkpoint import main as writer_main
from qtsplus_vllm.testing.tiny_checkpoint import write_tiny_checkpoint

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "proportional"


def test_lm_flops_of_the_released_models_by_hand():
    # 7B, one layer: q and o 3584² each, k and v 3584 × 512 each, SwiGLU 3 × 3584 × 18944 (MACs)
    layer_7b = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944
    assert layer_7b == 233_046_016
    flops = prop.lm_prefill_flops(prop.REAL["7B"].lm, 1000)["flops"]
    assert flops["linear"] == 2 * 1000 * 28 * 233_046_016
    assert flops["attention"] == 2 * 28 * 2 * 3584 * (1000 * 1001 // 2)  # token t attends to t keys
    assert flops["lm_head"] == 2 * 3584 * 152064
    # 3B: 36 layers, 2048 wide, 2 KV heads of 128, MLP 11008: ≈ 5.55 GFLOP per token before attention
    layer_3b = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 11008
    assert prop.lm_prefill_flops(prop.REAL["3B"].lm, 1)["flops"]["linear"] == 2 * 36 * layer_3b
    assert 5.5e9 < 2 * 36 * layer_3b < 5.6e9
    # at 54k tokens attention costs about as much again as the matmuls (7B)
    per_token = prop.lm_prefill_flops(prop.REAL["7B"].lm, 54_064)["flops"]
    assert 0.8 < per_token["attention"] / per_token["linear"] < 0.9


def test_vit_flops_of_the_released_tower_by_hand():
    # one minute of 720p at the defaults: 30 temporal patches of 20 × 36 patches = 10 × 18 merged tokens
    assert prop.video_grid(1) == (30, 20, 36)
    # windows of 4 × 4 merged tokens on the 10 × 18 grid: 8 full (64 patches), 6 of 32, 1 of 16
    assert sorted(prop.window_sizes(20, 36, prop.REAL["7B"].vit)) == [16] + [32] * 6 + [64] * 8
    vit = prop.vit_flops(prop.REAL["7B"].vit, 30, 20, 36)
    per_patch = 32 * (4 * 1280 * 1280 + 3 * 1280 * 3420) + 1176 * 1280
    window = 28 * 2 * (8 * 64**2 + 6 * 32**2 + 16**2) * 1280 / 180  # per merged token
    full = 4 * 2 * 720**2 * 1280 / 180
    merger = 5120 * 5120 + 5120 * 3584
    assert vit["per_merged_token"] == pytest.approx(2 * (4 * per_patch + window + full + merger))
    assert 5.2e9 < vit["per_merged_token"] < 5.3e9  # the "≈ 4 patches × 2 × 0.67 GFLOP"


def test_kv_bytes_and_contexts():
    assert prop.REAL["7B"].lm.kv_bytes_per_token(prop.BF16) == 57_344
    assert prop.REAL["3B"].lm.kv_bytes_per_token(prop.BF16) == 36_864
    rows = prop.benchmark_contexts(prop.TRAINING_SELECTOR, text_tokens=64)
    assert [r["m"] for r in rows] == [5400, 27000, 54000]
    # nmax 512 (training script): ρ_min·M = 270 at 1 minute, the cap from 5 minutes on
    assert [(r["n_rho_min"], r["n_rho_max"]) for r in rows] == [(270, 512), (512, 512), (512, 512)]
    assert [r["s_all"] for r in rows] == [5464, 27064, 54064]
    assert {r["s_selected"] for r in rows} == {576}


def test_pinned_grids_are_the_sizing_rule():
    """The GPU suite's bare image has no PyAV / qwen-vl-utils: it passes the pinned grids instead."""
    from qtsplus_vllm.sizing import TEXT_TOKENS

    assert prop.GRIDS_720P == {minutes: prop.video_grid(minutes) for minutes in prop.MINUTES}
    pinned = prop.benchmark_contexts(prop.TRAINING_SELECTOR, text_tokens=TEXT_TOKENS, grids=prop.GRIDS_720P)
    assert pinned == prop.benchmark_contexts(prop.TRAINING_SELECTOR)


def test_real_ratios():
    r7 = prop.ratios(prop.REAL["7B"])
    by_context = {(c["minutes"], c["context"]): c["lm_vit_ratio"] for c in r7["contexts"]}
    assert 2.4 < by_context[(1, "selected")] < 2.6  # 13.2 GFLOP per token / 5.23 per merged token
    assert 4.4 < by_context[(10, "all")] < 4.7
    assert r7["kv_vit_ratio"] == pytest.approx(57_344 / r7["vit_flops_per_merged_token"])
    assert r7["selector_share_of_vit_10min"] < 0.005


def test_training_selector_settings():
    assert prop.TRAINING_SELECTOR == dict(
        nmax=512, rho_min=0.05, rho_max=0.5, tau_s=0.5, scoring_layers=1, reencode_layers=2
    )


@pytest.mark.parametrize("name", sorted(prop.PRESETS))
def test_preset_checkpoint(name, tmp_path):
    kw = prop.PRESETS[name]
    out = write_tiny_checkpoint(tmp_path / name, **kw)
    config = load_config(out)
    assert (config.hidden_size, config.num_hidden_layers) == (kw["hidden"], kw["layers"])
    assert (config.num_attention_heads, config.num_key_value_heads) == (kw["heads"], kw["kv_heads"])
    assert config.intermediate_size == kw["intermediate"]
    assert config.hidden_size // config.num_attention_heads in (32, 64, 128)  # vLLM CPU attention sizes
    assert (config.qts_plus_nmax, config.qts_plus_rho_min, config.qts_plus_rho_max) == (512, 0.05, 0.5)
    assert (config.qts_plus_tau_s, config.qts_plus_scoring_layers, config.qts_plus_reencode_layers) == (
        0.5,
        1,
        2,
    )
    assert config.max_position_embeddings >= 54_064 + 128  # a 10-minute video with every token
    vision = resolve_vision_config(config, CheckpointReader(out).shapes(VISION_PREFIX))
    assert (vision.depth, vision.hidden_size, vision.intermediate_size) == (
        kw["vision_depth"], kw["vision_hidden"], kw["vision_intermediate"]
    )  # fmt: skip
    assert list(vision.fullatt_block_indexes) == [int(i) for i in kw["vision_fullatt"].split(",")]
    model = prop.preset_model(name)
    assert model.vit.fullatt_blocks == tuple(vision.fullatt_block_indexes)
    # small enough for 8 concurrent 10-minute requests with every token on a 24 GiB CPU machine
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert weights < 1 << 30
    assert 8 * 54_200 * model.lm.kv_bytes_per_token(prop.FP32) < 1 << 30


@pytest.mark.parametrize("name", sorted(prop.PRESETS))
def test_preset_kv_bytes_are_proportional(name):
    """KV bytes per token over ViT FLOPs per merged token: within ±20 % of the released model's (counted)."""
    real = prop.ratios(prop.REAL[name.split("-")[0].upper()])
    preset = prop.ratios(prop.preset_model(name))
    assert abs(preset["kv_vit_ratio"] / real["kv_vit_ratio"] - 1) <= 0.2


@pytest.mark.parametrize("name", sorted(prop.PRESETS))
def test_committed_measurement_describes_the_preset(name):
    """The committed measurement was taken on the preset as it is now, and met the ±20 % target."""
    files = sorted(RESULTS.glob(f"{name}-*.json"))
    assert files, (
        f"no measurement of {name} under {RESULTS}: run benchmarks/bench_proportional.py --preset {name}"
    )
    result = json.loads(files[-1].read_text())
    assert result["preset_kwargs"] == json.loads(json.dumps(prop.PRESETS[name]))
    assert {(r["minutes"], r["context"]) for r in result["contexts"]} == {
        (m, c) for m in prop.MINUTES for c in ("selected", "all")
    }
    for row in result["contexts"]:
        assert row["within_tolerance"] == (abs(row["measured_ratio"] / row["real_flop_ratio"] - 1) <= 0.2)
    assert result["all_within_tolerance"]


def test_writer_cli_preset(tmp_path):
    assert writer_main([str(tmp_path / "a"), "--preset", "7b-proportional"]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    kw = prop.PRESETS["7b-proportional"]
    assert config["hidden_size"] == kw["hidden"] and config["intermediate_size"] == kw["intermediate"]
    assert config["qts_plus_nmax"] == 512 and config["qts_plus_tau_s"] == 0.5
    assert config["vision_config"]["fullatt_block_indexes"] == [int(kw["vision_fullatt"])]
    # a flag given explicitly overrides the preset's value
    assert writer_main([str(tmp_path / "b"), "--preset", "7b-proportional", "--nmax", "64"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["qts_plus_nmax"] == 64


def test_writer_vision_fullatt_checks(tmp_path):
    with pytest.raises(ValueError, match="vision_config"):
        write_tiny_checkpoint(tmp_path / "x", vision_depth=2, vision_fullatt="1")
    with pytest.raises(ValueError, match="0..1"):
        write_tiny_checkpoint(tmp_path / "x", vision_depth=2, vision_fullatt="2", vision_config=True)
    out = write_tiny_checkpoint(tmp_path / "y", vision_depth=2, vision_fullatt="none", vision_config=True)
    assert json.loads((out / "config.json").read_text())["vision_config"]["fullatt_block_indexes"] == []


def _load_script(name: str):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_server_monitor_records_the_process_tree():
    """bench_serving's monitor: peak RSS and CPU seconds per process of a server's tree, and a trace."""
    import subprocess
    import sys

    pytest.importorskip("psutil")
    pytest.importorskip("openai")
    bench_serving = _load_script("bench_serving")
    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3)']); time.sleep(3)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        with bench_serving.ServerMonitor(proc.pid, interval=0.1) as monitor:
            proc.wait(timeout=30)
    finally:
        proc.kill()
    summary = monitor.summary()
    assert len(summary["processes"]) == 2  # the server and its child
    assert all(p["peak_rss_gib"] > 0 and "cpu_s" in p for p in summary["processes"])
    assert summary["trace"] and summary["peak_tree_rss_gib"] > 0
    assert summary["killed_for_memory"] is False


def test_bench_proportional_summary_uses_least_cpu_times():
    """The measured ratio: least LM CPU seconds at S over the least ViT CPU seconds of the whole run."""
    pytest.importorskip("psutil")
    bench = _load_script("bench_proportional")

    def sample(lm, vit):
        return dict(lm_cpu_s=lm, vit_cpu_s=vit, lm_wall_s=2 * lm, vit_wall_s=2 * vit,
                    ratio_cpu=(lm / 100) / (vit / 50), ratio_wall=(lm / 100) / (vit / 50))  # fmt: skip

    samples = {100: [sample(3.0, 2.0), sample(2.0, 4.0)], 1000: [sample(40.0, 1.0), sample(50.0, 3.0)]}
    contexts = [
        dict(minutes=1, context="selected", tokens=100, real_flop_ratio=0.5, preset_flop_ratio=0.4),
        dict(minutes=1, context="all", tokens=1000, real_flop_ratio=1.8, preset_flop_ratio=0.9),
    ]
    rows = bench.summarize(contexts, samples, merged=50)
    assert rows[0]["measured_ratio"] == pytest.approx((2.0 / 100) / (1.0 / 50))  # ViT min from the other S
    assert rows[0]["measured_ratio_paired_vit"] == pytest.approx((2.0 / 100) / (2.0 / 50))
    assert rows[1]["measured_ratio"] == pytest.approx((40.0 / 1000) / (1.0 / 50))
    assert rows[0]["within_tolerance"] is False and rows[1]["within_tolerance"] is True


def test_compare_serving_preset_and_chunking_flags(tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("matplotlib")
    compare = _load_script("compare_serving")
    flags = compare.engine_flags(28000, 4096)
    assert flags[flags.index("--max-model-len") + 1] == "28000"
    assert flags[flags.index("--max-num-batched-tokens") + 1] == "4096"
    assert (
        compare.engine_flags(8192)[compare.engine_flags(8192).index("--max-num-batched-tokens") + 1] == "8192"
    )
    with pytest.raises(SystemExit, match="--preset must be one of"):
        compare.main(["--preset", "9b-proportional", "--work-dir", str(tmp_path)])
