"""Eager oracle pipeline: video + question -> greedy answer, one request at a time.

Built from transformers' Qwen2.5-VL vision tower and text decoder, our selector, a splice written
here, and explicit sequential 1-D positions (DESIGN §2.8). It is the oracle the vLLM path is
compared with, so it deliberately shares none of the serving path's splicing or position code.

    python -m qtsplus_vllm.reference --model DIR --video FILE --question TEXT
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

from .checkpoint import DTYPES, CheckpointReader, load_config, validate_checkpoint
from .config import SELECTOR_PREFIX, VISION_PREFIX
from .selector import QTSplusSelector, Selection
from .video import PreprocessConfig, SamplingConfig, decode_video, preprocess_frames
from .vision import VisionEncoder


@dataclass
class ReferenceAnswer:
    """What the oracle produced for one (video, question).

    prompt_ids: the prompt as the LM saw it, with the video placeholder expanded to n tokens.
    positions:  [S] the 1-D positions given to the LM for the prompt (0..S-1).
    """

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    positions: list[int]
    selection: Selection  # the first visual item's
    num_visual_tokens: int  # M of the first visual item
    num_frames: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    selections: list[Selection] = field(default_factory=list)  # one per visual item, in prompt order

    @property
    def n(self) -> int:
        return self.selection.n


class ReferencePipeline:
    """Loads a QTSplus checkpoint directory and answers questions about videos greedily."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.config = load_config(model_dir)
        reader = CheckpointReader(model_dir)
        validate_checkpoint(self.config, reader)
        self.dtype = dtype or reader.dtype()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.generation_config = GenerationConfig.from_pretrained(str(model_dir))
        self.video_pad_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

        self.vision = VisionEncoder.from_checkpoint(reader, self.config, device=self.device, dtype=self.dtype)
        self.selector = QTSplusSelector.from_config(self.config).to(device=self.device, dtype=self.dtype)
        self.selector.load_state_dict(
            reader.load_prefix(SELECTOR_PREFIX, dtype=self.dtype, device=self.device)
        )
        self.selector.eval()
        self.lm, self.lm_head = self._load_language_model(reader)

    def _load_language_model(self, reader: CheckpointReader) -> tuple[Qwen2_5_VLTextModel, torch.Tensor]:
        config = self.config
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            lm = Qwen2_5_VLTextModel(config)
        names = [k for k in reader.keys() if k.startswith("model.")]
        names = [
            k for k in names if not k.startswith((VISION_PREFIX, "model.qts_plus.", "model.mm_projector"))
        ]
        weights = reader.load(names, dtype=self.dtype, device=self.device)
        lm.load_state_dict({k[len("model.") :]: v for k, v in weights.items()}, strict=True, assign=True)
        # non-persistent rotary buffers were created on the meta device: rebuild them for real
        with torch.device(self.device):
            lm.rotary_emb = type(lm.rotary_emb)(config=config)
        head_key = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
        lm_head = reader.load([head_key], dtype=self.dtype, device=self.device)[head_key]
        return lm.eval(), lm_head

    # ------------------------------------------------------------------ steps

    def question_ids(self, question: str) -> list[int]:
        """Token ids of the question text only, without special tokens (DESIGN §2.3)."""
        if not question or not question.strip():
            raise ValueError("empty question: QTSplus selects visual tokens for a question; give one")
        return self.tokenizer(question, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question: str) -> list[int]:
        """The chat prompt with one video placeholder before the question (the reference demo's layout)."""
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.video_pad_id) != 1:
            raise ValueError(
                f"chat template produced {ids.count(self.video_pad_id)} video placeholders, expected 1"
            )
        return ids

    def splice(self, prompt_ids: list[int], rows: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Replace the single <|video_pad|> by the n selected rows.

        Returns the expanded ids (n placeholders) and input embeddings [S, D].
        """
        return self.splice_items(prompt_ids, [rows])

    def items_prompt_ids(self, kinds: list[str], question: str) -> list[int]:
        """The chat prompt with one placeholder per visual item (``"video"``/``"image"``), then the question."""
        content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def splice_items(self, prompt_ids: list[int], rows: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        """Replace the k-th visual placeholder (video or image pad) by the k-th item's rows."""
        pads = {self.video_pad_id, self.image_pad_id}
        at = [i for i, token in enumerate(prompt_ids) if token in pads]
        if len(at) != len(rows):
            raise ValueError(f"the prompt has {len(at)} visual placeholders for {len(rows)} items")
        embed = self.lm.embed_tokens
        ids: list[int] = []
        parts: list[torch.Tensor] = []
        start = 0
        for where, item_rows in zip(at, rows, strict=True):
            parts.append(embed(torch.tensor(prompt_ids[start:where], device=self.device, dtype=torch.long)))
            parts.append(item_rows.to(parts[-1].dtype))
            ids += prompt_ids[start:where] + [prompt_ids[where]] * item_rows.shape[0]
            start = where + 1
        parts.append(embed(torch.tensor(prompt_ids[start:], device=self.device, dtype=torch.long)))
        ids += prompt_ids[start:]
        return ids, torch.cat(parts, dim=0)

    def logits(self, embeds: torch.Tensor, positions: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        """One LM forward over embeds [T, D] at 1-D positions [T]; returns last-token logits [V]."""
        out = self.lm(
            inputs_embeds=embeds[None],
            position_ids=positions[None],  # [1, T]: the text model repeats it on all three M-RoPE axes
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state[0, -1] @ self.lm_head.T, out.past_key_values

    def generate(self, embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy decoding from prompt embeddings [S, D] with positions 0..S-1, S, S+1, ..."""
        eos = self.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        s = embeds.shape[0]
        logits, cache = self.logits(embeds, torch.arange(s, device=self.device), None)
        tokens: list[int] = []
        for step in range(max_new_tokens):
            token = int(torch.argmax(logits.float()))
            tokens.append(token)
            if token in eos:
                break
            nxt = self.lm.embed_tokens(torch.tensor([token], device=self.device))
            logits, cache = self.logits(nxt, torch.tensor([s + step], device=self.device), cache)
        return tokens

    @torch.inference_mode()
    def answer(
        self,
        video: str | os.PathLike | bytes | np.ndarray,
        question: str,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
        preprocess: PreprocessConfig | None = None,
    ) -> ReferenceAnswer:
        """Answer ``question`` about ``video`` (a file, mp4 bytes, or uint8 frames [T, H, W, 3])."""
        return self.answer_items([("video", video)], question, max_new_tokens, sampling, preprocess)

    @torch.inference_mode()
    def answer_items(
        self,
        items: list[tuple[str, str | os.PathLike | bytes | np.ndarray]],
        question: str,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
        preprocess: PreprocessConfig | None = None,
    ) -> ReferenceAnswer:
        """Answer about several visual items: ``("video", file/bytes/frames)`` or ``("image", [H, W, 3])``.

        Each item is selected on its own against the same question (an image is a one-frame video,
        its frame repeated to fill the temporal patch) and spliced at its own placeholder.
        """
        timings = dict.fromkeys(("decode", "vit", "selector", "generate"), 0.0)
        q_ids = self.question_ids(question)
        q_embeds = self.lm.embed_tokens(torch.tensor(q_ids, device=self.device))  # [L, D]
        selections, frame_counts, token_counts = [], [], []
        for kind, item in items:
            clock = time.perf_counter()
            if kind == "image":
                frames = np.asarray(item)[None]
            elif isinstance(item, np.ndarray):
                frames = item
            else:
                frames = decode_video(item, sampling or SamplingConfig()).frames
            timings["decode"] += (time.perf_counter() - clock) * 1e3

            clock = time.perf_counter()
            inputs = preprocess_frames(
                frames, preprocess or PreprocessConfig(), device=self.device, dtype=self.dtype
            )
            visual = self.vision(inputs.pixel_values, inputs.grid_thw)  # [M, D]
            timings["vit"] += (time.perf_counter() - clock) * 1e3

            clock = time.perf_counter()
            selections.append(self.selector.select(visual, q_embeds))
            timings["selector"] += (time.perf_counter() - clock) * 1e3
            frame_counts.append(int(frames.shape[0]))
            token_counts.append(visual.shape[0])

        clock = time.perf_counter()
        prompt = self.items_prompt_ids([kind for kind, _ in items], question)
        ids, embeds = self.splice_items(prompt, [selection.embeds for selection in selections])
        tokens = self.generate(embeds, max_new_tokens)
        timings["generate"] = (time.perf_counter() - clock) * 1e3
        return ReferenceAnswer(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            token_ids=tokens,
            prompt_ids=ids,
            positions=list(range(len(ids))),
            selection=selections[0],
            num_visual_tokens=token_counts[0],
            num_frames=frame_counts[0],
            timings_ms=timings,
            selections=selections,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Answer a question about a video with the eager QTSplus oracle"
    )
    parser.add_argument("--model", required=True, help="QTSplus checkpoint directory")
    parser.add_argument("--video", required=True, help="video file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--fps", type=float, default=SamplingConfig.fps)
    parser.add_argument("--max-frames", type=int, default=SamplingConfig.max_frames)
    parser.add_argument("--max-pixels", type=int, default=PreprocessConfig.max_pixels)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype"
    )
    args = parser.parse_args(argv)
    try:
        pipeline = ReferencePipeline(args.model, device=args.device, dtype=DTYPES.get(args.dtype))
        result = pipeline.answer(
            args.video,
            args.question,
            max_new_tokens=args.max_new_tokens,
            sampling=SamplingConfig(fps=args.fps, max_frames=args.max_frames),
            preprocess=PreprocessConfig(max_pixels=args.max_pixels),
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sel = result.selection
    print(f"answer: {result.text}")
    print(
        f"frames={result.num_frames} M={result.num_visual_tokens} n={sel.n} rho={sel.rho:.4f} "
        + " ".join(f"{k}_ms={v:.1f}" for k, v in result.timings_ms.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
