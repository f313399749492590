"""Generated mini-benchmarks in each supported layout: synthetic videos, made-up questions.

For tests and smoke runs of the whole pipeline (a model can only be at chance on them). Each
layout is written as the real benchmark lays it out, with extras a loader must handle: an
open-ended MLVU task and a frame-directory choice record (both skipped), and ``missing`` videos
that are named in the annotations but not written (reported as missing).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .datasets import LETTERS

WORDS = (
    "red",
    "blue",
    "green",
    "square",
    "circle",
    "left",
    "right",
    "fast",
    "slow",
    "two",
    "three",
    "moving",
)


def _options(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.sample(WORDS, 3)) for _ in range(n)]


def write_mini_benchmark(
    root: str | Path,
    layout: str,
    *,
    videos: int = 3,
    questions: int = 2,
    seed: int = 0,
    missing: int = 0,
    frames: int = 8,
    size: tuple[int, int] = (64, 48),
    fps: float = 4.0,
) -> Path:
    """Write a mini-benchmark under ``root``; returns the path to pass as ``--data``.

    ``layout``: ``videomme`` (parquet, needs pyarrow), ``videomme-json``, ``mlvu``,
    ``longvideobench`` or ``choice``. The last ``missing`` videos are not written.
    """
    from qtsplus_vllm.testing import make_video

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def video(path: Path, k: int) -> None:
        if k < videos - missing:
            make_video(path, frames=frames, size=size, fps=fps, seed=seed * 1000 + k)

    if layout in ("videomme", "videomme-json"):
        rows = []
        for v in range(videos):
            video_id, youtube = f"{v + 1:03d}", f"vid{seed}x{v:04d}"
            video(root / "data" / f"{youtube}.mp4", v)
            for q in range(questions):
                rows.append(
                    {
                        "video_id": video_id,
                        "duration": ("short", "medium", "long")[v % 3],
                        "domain": ("Knowledge", "Sports")[v % 2],
                        "sub_category": "Synthetic",
                        "url": f"https://www.youtube.com/watch?v={youtube}",
                        "videoID": youtube,
                        "question_id": f"{video_id}-{q + 1}",
                        "task_type": ("Object Recognition", "Counting Problem")[q % 2],
                        "question": f"Which shapes move in clip {v} (question {q})?",
                        "options": [f"{c}. {o}" for c, o in zip("ABCD", _options(rng, 4), strict=True)],
                        "answer": rng.choice("ABCD"),
                    }
                )
        if layout == "videomme":
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = root / "videomme" / "test-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path)
            return root
        nested: dict[str, dict] = {}
        for row in rows:
            head = {k: row[k] for k in ("video_id", "duration", "domain", "sub_category", "url", "videoID")}
            entry = nested.setdefault(row["video_id"], {**head, "questions": []})
            entry["questions"].append(
                {k: row[k] for k in ("question_id", "task_type", "question", "options", "answer")}
            )
        (root / "videomme.json").write_text(json.dumps(list(nested.values()), indent=1), encoding="utf-8")
        return root

    if layout == "mlvu":
        tasks = ["1_plotQA", "2_needle", "4_count"]
        for v in range(videos):
            task = tasks[v % len(tasks)]
            name = f"clip_{v}.mp4"
            video(root / "video" / task / name, v)
            path = root / "json" / f"{task}.json"
            records = json.loads(path.read_text()) if path.is_file() else []
            for q in range(questions):
                candidates = _options(rng, rng.choice((4, 6)) if task == "4_count" else 4)
                records.append(
                    {
                        "video": name,
                        "duration": 2.0,
                        "question": f"What happens in clip {v} (question {q})?",
                        "candidates": candidates,
                        "answer": rng.choice(candidates),
                        "question_type": task.split("_", 1)[1],
                    }
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, indent=1), encoding="utf-8")
        open_ended = [
            {"video": "clip_0.mp4", "duration": 2.0, "question": "Describe the clip.", "answer": "x"}
        ]
        (root / "json" / "9_summary.json").write_text(json.dumps(open_ended), encoding="utf-8")
        return root

    if layout == "longvideobench":
        records = []
        for v in range(videos):
            name = f"lvb{seed}_{v}.mp4"
            video(root / "videos" / name, v)
            for q in range(questions):
                candidates = _options(rng, rng.choice((4, 5)))
                records.append(
                    {
                        "video_id": f"lvb{seed}_{v}",
                        "question": f"At the start of clip {v}, what is shown (question {q})?",
                        "question_wo_referring_query": "What is shown?",
                        "candidates": candidates,
                        "correct_choice": rng.randrange(len(candidates)),
                        "position": [0, 1],
                        "topic_category": "NP-News-Programs",
                        "question_category": ("S2E", "T3O")[q % 2],
                        "level": "L1-Perception",
                        "id": f"lvb{seed}_{v}_{q}",
                        "video_path": name,
                        "subtitle_path": f"lvb{seed}_{v}_en.json",
                        "duration_group": (15, 60, 600, 3600)[v % 4],
                        "starting_timestamp_for_subtitles": 0,
                        "duration": frames / fps,
                    }
                )
        (root / "lvb_val.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
        return root

    if layout == "choice":
        lines = []
        for v in range(videos):
            video(root / f"sv{seed}_{v}.mp4", v)
            for q in range(questions):
                options = _options(rng, 4)
                lines.append(
                    {
                        "vision_id": f"sv{seed}_{v}.mp4",
                        "question": f"What is the main motion in clip {v} (question {q})?",
                        "options": dict(zip(LETTERS, options, strict=False)),
                        "answer": rng.choice("ABCD"),
                    }
                )
        (root / "frames_only").mkdir(parents=True, exist_ok=True)
        lines.append(
            {"vision_id": "frames_only", "question": "?", "options": {"A": "x", "B": "y"}, "answer": "A"}
        )
        path = root / "choice_eval.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        return path

    raise ValueError(f"unknown layout {layout!r}")
