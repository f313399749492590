"""The main job, end to end on any machine: serve a QTSplus model with vLLM and ask about a video.

With no arguments it writes a tiny random QTSplus checkpoint (the released format) and a generated
video, starts ``vllm serve`` on it (the plugin does the rest), asks the question through the OpenAI
API with and without selection, and checks the served answer against the eager oracle pipeline.
With --model/--video it uses a real checkpoint and file; --eager skips the server.

    python -m qtsplus_vllm.demo [--model DIR] [--video FILE] [--question TEXT] [--eager]
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


def ask_server(model: str, video: Path, question: str, max_tokens: int) -> dict:
    """Start ``vllm serve`` on ``model`` and ask with selection on and off."""
    from .testing.server import RemoteServer, cpu_serve_args

    args = cpu_serve_args(max_model_len=8192, in_process_worker=False, prefix_caching=True)
    args += ["--allowed-local-media-path", str(video.parent), "--trust-request-mm-kwargs"]
    clock = time.perf_counter()
    with RemoteServer(model, args) as server:
        started = time.perf_counter() - clock
        client = server.get_client()
        out = {"startup_s": started}
        for name, select in (("selected", True), ("all_tokens", False)):
            clock = time.perf_counter()
            reply = client.chat.completions.create(
                model=server.served_model_name or model,
                messages=[{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                    {"type": "text", "text": question},
                ]}],
                temperature=0,
                max_tokens=max_tokens,
                extra_body={"return_token_ids": True, "mm_processor_kwargs": {"qtsplus_select": select}},
            )  # fmt: skip
            out[name] = {
                "text": reply.choices[0].message.content,
                "token_ids": reply.choices[0].token_ids,
                "prompt_tokens": reply.usage.prompt_tokens,
                "seconds": time.perf_counter() - clock,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="QTSplus checkpoint directory (default: a generated tiny one)")
    parser.add_argument("--video", help="video file (default: a generated 16-second clip)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--eager", action="store_true", help="only the eager oracle pipeline, no server")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qtsplus-demo-") as tmp:
        model = args.model or str(write_tiny_checkpoint(Path(tmp) / "tiny-qtsplus"))
        video = Path(args.video or make_video(Path(tmp) / "clip.mp4", frames=64, size=(160, 120), fps=4.0))
        oracle = ReferencePipeline(model).answer(video, args.question, max_new_tokens=args.max_new_tokens)
        served = (
            None if args.eager else ask_server(model, video.resolve(), args.question, args.max_new_tokens)
        )

    print(f"model:    {args.model or 'generated tiny QTSplus checkpoint (random weights)'}")
    print(f"question: {args.question}")
    print(
        f"oracle:   frames={oracle.num_frames} M={oracle.num_visual_tokens} n={oracle.n} "
        f"kept={oracle.n / oracle.num_visual_tokens:.1%} rho={oracle.selection.rho:.3f} answer={oracle.text!r}"
    )
    if served is None:
        return 0
    sel, full = served["selected"], served["all_tokens"]
    same = sel["token_ids"] == oracle.token_ids
    print(
        f"served:   answer={sel['text']!r} ({'equals' if same else 'DIFFERS FROM'} the oracle, token for token)"
    )
    print(
        f"prompt tokens: {sel['prompt_tokens']} with selection vs {full['prompt_tokens']} with all M tokens "
        f"({sel['prompt_tokens'] / full['prompt_tokens']:.2f}x); server start {served['startup_s']:.0f}s"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
