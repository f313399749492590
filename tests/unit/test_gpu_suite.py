"""benchmarks/gpu_suite.py (CPU dry run of every step) and scripts/fetch_gpu_wheels.py (budget, no network)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "scripts")]

import fetch_gpu_wheels  # noqa: E402
import gpu_suite  # noqa: E402

RAN = ("kernel_tests", "selector", "score_topk", "vit_attention", "pipeline", "proportional")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The real command at tiny sizes on the CPU: every step runs its real code (~1 min on 2 cores)."""
    out = tmp_path_factory.mktemp("suite")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "QTSPLUS_VIT_ATTENTION")}
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def record(out: Path, step: str) -> dict:
    """A step's full record, as suite.json holds it."""
    return json.loads((out / "suite.json").read_text())["results"][step]


def test_dry_run_runs_every_step_and_writes_at_most_eight_files(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= gpu_suite.MAX_FILES
    assert {"suite.json", "suite.png"} == set(files)  # every step's record is folded into suite.json
    summary = json.loads((out / "suite.json").read_text())
    assert summary["quick"] and summary["machine"]["device"] == "cpu"
    assert list(summary["results"]) == list(gpu_suite.STEPS)
    for step in RAN:
        assert summary["steps"][step]["status"] == "ok", (step, record(out, step))
    # benchmarks/bench_media.py exists: the media step runs it (a 15-second 640x360 video on the CPU)
    media = record(out, "media")
    assert summary["steps"]["media"]["status"] == "ok", media
    streaming = media["result"]["paths"]["streaming"]
    assert streaming["status"] == "ok" and streaming["follow_up"]["cache_hit"], streaming
    nvdec = summary["steps"]["nvdec"]  # GPU-only: recorded as skipped with the reason
    assert nvdec["status"] == "skipped" and "CUDA" in nvdec["reason"], nvdec
    assert "step" in proc.stdout and "targets:" in proc.stdout and "vit_attention" in proc.stdout
    assert [c["verdict"].split(":")[0] for c in summary["target_checks"]] == ["n/a"] * 3  # no GPU figures


def test_dry_run_step_contents(dry_run):
    _, out = dry_run
    kernels = record(out, "kernel_tests")
    assert kernels["counts"]["passed"] >= 1 and kernels["counts"]["failed"] == 0
    assert kernels["cuda_only"]["skipped"] == 5  # the CUDA-only cases a GPU run executes (CUDA_ONLY_TESTS)
    selector = record(out, "selector")
    assert [r["agrees"] for r in selector["rows"] if "agrees" in r] == [True]  # Triton (interpreter) == torch
    gate = record(out, "score_topk")
    assert gate["result"]["rows"] and gate["targets"]["checked"] is False
    vit = {r["attention"]: r for r in record(out, "vit_attention")["rows"]}
    assert vit["sdpa"]["status"] == vit["sdpa_padded"]["status"] == "ok"
    assert vit["sdpa_padded"]["rel_error"] <= 1e-5 and vit["sdpa"]["auto_choice"]
    assert all(
        vit[k]["status"] == "skipped" and "CUDA" in vit[k]["reason"] for k in ("torch_varlen", "flash_attn")
    )
    pipeline = record(out, "pipeline")
    assert pipeline["result"]["derived"]["ttft_all_ms"] > 0 and pipeline["targets"]["checked"] is False


def test_dry_run_proportional_fields(dry_run):
    _, out = dry_run
    prop = record(out, "proportional")
    assert prop["status"] == "ok" and prop["dtype"] == "float32" and prop["targets"]["checked"] is False
    assert list(prop["models"]) == ["tiny"] and "measured_ratio" in prop["definition"]
    rec = prop["models"]["tiny"]
    assert rec["status"] == "ok" and rec["vit_ms_per_merged_token"] > 0 and rec["vit_attention"] == "sdpa"
    assert rec["layers_timed"] == rec["layers_total"] == 2 and not rec["scaled_by_layers"]
    assert rec["kv_bytes_per_token"] == 2 * 2 * 64 * 4  # 2 layers, K and V, 2 KV heads of 32, fp32
    assert rec["vit_merged_tokens"] == 60 and rec["vit_grid"] == [1, 12, 20]
    assert [(c["minutes"], c["context"]) for c in rec["contexts"]] == [
        (m, k) for m in (1, 5, 10) for k in ("selected", "all")
    ]
    for c in rec["contexts"]:
        assert c["status"] == "ok" and c["real_flop_ratio"] > 0 and c["lm_ms"] > 0, c
        assert c["measured_ratio"] == pytest.approx(c["lm_ms_per_token"] / rec["vit_ms_per_merged_token"])
        assert c["measured_over_real"] == pytest.approx(c["measured_ratio"] / c["real_flop_ratio"])
        assert c["kv_bytes"] == c["tokens"] * rec["kv_bytes_per_token"]
    assert [c["tokens"] for c in rec["contexts"] if c["context"] == "all"] == [76, 316, 616]  # M + 16
    removes = rec["selection_removes"]
    assert [r["minutes"] for r in removes] == [1, 5, 10] and all(r["prefill_all_s"] > 0 for r in removes)
    assert all(r["removed_s"] == pytest.approx(r["prefill_all_s"] - r["prefill_selected_s"]) for r in removes)


def test_proportional_skips_prompts_past_the_deadline(tmp_path):
    """A prompt whose projected time ends past the step's time box is recorded as skipped, not run."""
    import time

    import torch

    cases, _ = gpu_suite.proportional_cases(quick=True)
    model, contexts, grid = cases["tiny"]
    saved = []
    rec = gpu_suite.measure_proportional(model, contexts, grid, "cpu", torch.float32, (0, 1), None, "sdpa",
                                         time.monotonic(), saved.append)  # fmt: skip
    status = [p["status"] for p in rec["prompts"]]
    assert status[0] == "ok" and set(status[1:]) == {"skipped"}, rec["prompts"]
    assert "time box" in rec["prompts"][1]["reason"] and saved and rec["selection_removes"] == []


def test_proportional_cases_are_the_real_models():
    from qtsplus_vllm.testing import proportional as prop

    cases, source = gpu_suite.proportional_cases(quick=False)
    assert list(cases) == ["7B", "3B"] and "benchmark_contexts" in source
    for label, (model, contexts, grid) in cases.items():
        assert model is prop.REAL[label] and grid == (30, 20, 36)
        assert [c["s_all"] for c in contexts] == [5464, 27064, 54064]
        assert {c["s_selected"] for c in contexts} == {576}
    assert gpu_suite.vit_spec(prop.REAL["7B"].vit) == gpu_suite.QWEN25_VIT_7B


def test_budget_spent_and_timeouts_are_recorded_not_fatal(tmp_path, monkeypatch):
    assert (
        gpu_suite.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(tmp_path / "a")]) == 0
    )
    summary = json.loads((tmp_path / "a" / "suite.json").read_text())
    assert all(
        s["status"] == "skipped" and "budget" in s["reason"]
        for k, s in summary["steps"].items()
        if k != "setup"
    )

    monkeypatch.setitem(
        gpu_suite.TIME_BOX, "kernel_tests", (1, 1)
    )  # cannot even import pytest + torch in 1 s
    out = tmp_path / "b"
    assert (
        gpu_suite.main(["--device", "cpu", "--quick", "--steps", "kernel_tests,media", "--out", str(out)])
        == 1
    )
    step = record(out, "kernel_tests")
    assert step["status"] == "failed" and "timed out" in step["reason"]
    assert record(out, "media")["status"] == "ok"  # the next step still ran


def _fake_wheel(folder: Path, name: str = "qtsplusfake", version: str = "0.1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{info}/RECORD", "".join(f"{arc},,\n" for arc in [*files, f"{info}/RECORD"]))
    return path


def test_setup_installs_carried_wheels_for_the_steps(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    monkeypatch.setattr(gpu_suite, "missing_modules", lambda: ["qtsplusfake"])
    args = gpu_suite.argparse.Namespace(wheels=wheels, site=tmp_path / "site", quick=True)
    env = {"PATH": os.environ["PATH"]}
    record = gpu_suite.setup(args, env)
    assert (
        record["status"] == "skipped" and "fetch_gpu_wheels" in record["reason"] and "PYTHONPATH" not in env
    )

    _fake_wheel(wheels)
    record = gpu_suite.setup(args, env)
    assert record["status"] == "ok" and record["wheels"] == ["qtsplusfake-0.1-py3-none-any.whl"]
    got = subprocess.run([sys.executable, "-c", "import qtsplusfake; print(qtsplusfake.VALUE)"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert got.stdout.strip() == "42", got.stderr


def test_suite_imports_need_only_the_image_and_the_pinned_wheels():
    """vLLM, blake3 and flash-attn are not on the GPU image: nothing the suite runs may import them."""
    manifest = fetch_gpu_wheels.load_manifest()
    pinned = {w["filename"].split("-")[0].lower() for w in manifest["wheels"]}
    assert pinned == set(gpu_suite.WHEEL_MODULES)
    assert set(gpu_suite.missing_modules.__defaults__[0]) == set(gpu_suite.WHEEL_MODULES.values())
    code = (
        "import sys\n"
        "for name in ('vllm', 'blake3', 'flash_attn'): sys.modules[name] = None\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'benchmarks')!r}]\n"
        "import gpu_suite; gpu_suite.bootstrap('cpu')\n"
        "import bench_pipeline, bench_score_topk, qtsplus_vllm.vision, qtsplus_vllm.kernels.score_topk\n"
        "import torch\n"
        "from qtsplus_vllm.vision import pick_attention\n"
        "assert pick_attention('cpu', torch.float32) == 'sdpa'\n"
        "print('ok')\n"
    )
    got = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert got.stdout.strip().endswith("ok"), got.stderr[-3000:]


# ----------------------------------------------------------------------------- the wheel helper


def test_wheel_dry_run_is_within_budget_without_network(monkeypatch, capsys):
    monkeypatch.setattr(fetch_gpu_wheels, "download", lambda *a: pytest.fail("--dry-run must not download"))
    assert fetch_gpu_wheels.main(["--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = fetch_gpu_wheels.load_manifest()
    assert report["wheel_bytes"] == sum(w["size"] for w in manifest["wheels"])
    assert report["within_budget"] and report["limit_bytes"] == 64 * 2**20 and not report["problems"]
    assert 0 < report["tree_bytes"] < 16 * 2**20


def _git_repo(root: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("wheels/\nbig.bin\n")
    (root / "tracked.txt").write_bytes(b"x" * 300_000)
    subprocess.run(["git", "-C", str(root), "add", "tracked.txt", ".gitignore"], check=True)
    (root / "untracked.txt").write_bytes(b"y" * 200_000)  # travels too
    (root / "big.bin").write_bytes(b"z" * 5_000_000)  # ignored: does not travel
    return root


def _manifest(path: Path, wheels: list[Path], budget: int) -> Path:
    entries = [
        {"requirement": w.name.split("-")[0] + "==0.1", "filename": w.name, "size": w.stat().st_size,
         "sha256": hashlib.sha256(w.read_bytes()).hexdigest()}
        for w in wheels
    ]  # fmt: skip
    path.write_text(
        json.dumps({"python_version": "3.12", "platforms": [], "budget_bytes": budget, "wheels": entries})
    )
    return path


def test_wheel_check_counts_tree_and_wheels_against_the_budget(tmp_path, capsys):
    repo = _git_repo(tmp_path / "repo")
    dest = repo / "wheels"
    wheel = _fake_wheel(dest)
    with open(wheel, "ab") as f:  # a wheel of ~1 MiB
        f.write(os.urandom(2**20))
    tree = fetch_gpu_wheels.tree_bytes(repo)
    assert tree == 300_000 + 200_000 + len("wheels/\nbig.bin\n")
    common = ["--check", "--repo", str(repo), "--dest", str(dest), "--margin-mib", "0", "--json"]

    fits = _manifest(tmp_path / "m1.json", [wheel], budget=tree + wheel.stat().st_size)
    assert fetch_gpu_wheels.main([*common, "--manifest", str(fits)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_bytes"] == tree + wheel.stat().st_size and report["within_budget"]

    over = _manifest(tmp_path / "m2.json", [wheel], budget=tree + wheel.stat().st_size - 1)
    assert fetch_gpu_wheels.main([*common, "--manifest", str(over)]) == 1
    assert not json.loads(capsys.readouterr().out)["within_budget"]

    stray = _fake_wheel(dest, "other", "2.0")
    assert fetch_gpu_wheels.main([*common, "--manifest", str(fits)]) == 1
    assert any("stray wheel" in p for p in json.loads(capsys.readouterr().out)["problems"])
    stray.unlink()

    wheel.write_bytes(b"tampered")
    assert fetch_gpu_wheels.main([*common, "--manifest", str(fits)]) == 1
    assert any("not the pinned file" in p for p in json.loads(capsys.readouterr().out)["problems"])


def test_wheel_folder_must_be_git_ignored(tmp_path, capsys):
    repo = _git_repo(tmp_path / "repo")
    dest = repo / "carried"  # not in .gitignore
    manifest = _manifest(tmp_path / "m.json", [], budget=64 * 2**20)
    args = ["--dry-run", "--repo", str(repo), "--dest", str(dest), "--manifest", str(manifest), "--json"]
    assert fetch_gpu_wheels.main(args) == 1
    assert any("not git-ignored" in p for p in json.loads(capsys.readouterr().out)["problems"])
    assert fetch_gpu_wheels.is_ignored(REPO / "benchmarks" / "wheels", REPO)


def test_replot_draws_a_saved_h200_run_again(tmp_path):
    """--replot renders suite.png from a committed suite.json (TTFT stages keep one colour each)."""
    saved = REPO / "benchmarks" / "results" / "gpu-h200" / "suite-full-ba1eb1f.json"
    copy = tmp_path / "suite.json"
    copy.write_text(saved.read_text())
    assert gpu_suite.main(["--replot", str(copy)]) == 0
    png = tmp_path / "suite.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
