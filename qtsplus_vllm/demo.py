"""The main job, end to end on any machine: answer a question about a video with QTSplus.

With no arguments it writes a tiny random QTSplus checkpoint (the released format) and a generated
video, then runs the eager oracle pipeline and prints the answer with M (visual tokens) and n
(tokens kept for the LM). With --model/--video it runs on a real checkpoint and file.

    python -m qtsplus_vllm.demo [--model DIR] [--video FILE] [--question TEXT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .reference import ReferencePipeline
from .testing import make_video, write_tiny_checkpoint

DEFAULT_QUESTION = "What moves across the screen, and in which direction?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="QTSplus checkpoint directory (default: a generated tiny one)")
    parser.add_argument("--video", help="video file (default: a generated 16-frame clip)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qtsplus-demo-") as tmp:
        model = args.model or str(write_tiny_checkpoint(Path(tmp) / "tiny-qtsplus"))
        video = args.video or str(make_video(Path(tmp) / "clip.mp4", frames=16, size=(160, 120), fps=4.0))
        clock = time.perf_counter()
        pipeline = ReferencePipeline(model)
        result = pipeline.answer(video, args.question, max_new_tokens=args.max_new_tokens)
        elapsed = time.perf_counter() - clock
    print(f"model:    {args.model or 'generated tiny QTSplus checkpoint (random weights)'}")
    print(f"question: {args.question}")
    print(f"answer:   {result.text!r}")
    print(
        f"frames={result.num_frames} M={result.num_visual_tokens} n={result.n} "
        f"kept={result.n / result.num_visual_tokens:.1%} rho={result.selection.rho:.3f} "
        f"prompt_tokens={len(result.prompt_ids)} total={elapsed:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
