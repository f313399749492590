"""Convert a QTSplus checkpoint into a plain Qwen2.5-VL checkpoint: the stock-vLLM baseline.

The latency benchmark (DESIGN §8) serves the same weights twice: through our plugin (ViT → QTS+
selector → n tokens) and through stock vLLM's ``Qwen2_5_VLForConditionalGeneration`` (ViT → all M
tokens). This module writes the second form:

    python -m qtsplus_vllm.convert QTSplus-7B qwen2_5_vl-7B      # or convert_to_qwen2_5_vl(src, out)
    vllm serve qwen2_5_vl-7B --media-io-kwargs '{"video": {"video_backend": "qtsplus_frames"}}'

What the output holds:

- ``config.json``: ``model_type`` ``qwen2_5_vl``, architecture ``Qwen2_5_VLForConditionalGeneration``,
  in the flat layout Qwen/Qwen2.5-VL-*-Instruct ship (text fields at the top level; transformers 5
  builds ``text_config`` from them, vLLM reads that). A full ``vision_config`` (resolved from the
  source's ``vision_config`` or its weight shapes; ``tokens_per_second`` 2 as released unless the
  source says otherwise) and the four vision token ids read from the source tokenizer. Every QTS+
  field (``qts_plus_*``, ``lambda_*``, ``vision_tower``, ``auto_map`` …) is dropped.
- weights: the LM tensors unchanged; ``model.vision_tower.X`` → ``visual.X`` (the released
  Qwen2.5-VL names: vLLM's ``hf_to_vllm_mapper`` and transformers' conversion mapping both load
  them); the selector dropped. A source with ``model.mm_projector.weight`` has no stock Qwen2.5-VL
  form (its merger output is not the LM width) and is refused. Written tensor by tensor (one tensor
  in memory at a time) in the source's sharding (single file, or the same shard files + index),
  always as safetensors: a ``pytorch_model.bin`` source (read weights-only, memory-mapped) becomes
  ``model.safetensors``, its shards ``pytorch_model-0000i-of-0000n.bin`` ``model-0000i-of-0000n.safetensors``.
- tokenizer files, chat template and ``generation_config.json`` copied; ``preprocessor_config.json``
  (images: the source's, as released) and ``video_preprocessor_config.json`` written so that
  transformers' ``Qwen2VLVideoProcessor`` resizes video frames like our plugin (below).

Equal M. Given the same decoded frames (serve with our loader, ``video_backend`` ``qtsplus_frames``, so both
servers keep the same frames), the stock processor's ``video_grid_thw`` equals ours, so its number of
video placeholders equals the plugin's M with ``{"qtsplus_select": false}`` (tests/e2e/
test_convert_serve.py: M = 420, 840 and 360 on three tiny videos, the prompt ids identical).
Why: our rule (qtsplus_vllm.video.target_size, qwen-vl-utils) resizes each of the T frames with
``smart_resize(min_pixels=min, max_pixels=min(max, max(min(768·28², P·2/T), ⌊1.05·min⌋)))``,
P = 0.9·128000·28². transformers 5.19's ``Qwen2VLVideoProcessor`` with ``cap_pixels_per_frame`` and
``max_video_tokens`` 128000 bounds frames by ``max(min(longest_edge, ⌊P·2/T⌋), ⌊1.05·shortest_edge⌋)``.
With ``shortest_edge = min`` and ``longest_edge = min(max, 768·28²)`` the bounds are equal whenever
``⌊1.05·min⌋ ≤ max`` (other settings are refused), except for the floor of P·2/T. That term only
binds for T > P·2/max frames (1194 at the default max 360·420, so never within the default 768-frame
limit; our loader allows up to 2048); there the bound is < 1 pixel lower in transformers, which
changes the size only when a scaled side is (within ~3e-6 of) a multiple of 28: e.g. 640×384 frames
at T = 1500 become 448×252 here and 420×252 in transformers (1 of 7632 (size, T) pairs swept,
T ∈ {2, 4, 768, 1200, 1500, 2048}). The two ``smart_resize`` copies also differ for frames under
14 px on a side with a tiny ``min_pixels``, and for aspect ratios above max/784 (193:1 at the
default), where qwen-vl-utils yields a zero-sized side and fails. Pixels nearly match: both resize
uint8 frames bicubic with antialiasing, but transformers runs torchvision v2's uint8 kernel and
qwen-vl-utils (and we) v1's float path: 1-10 % of the values differ by a level or two of 255, a
few pixels at sharp edges by up to 8.

Where the stock baseline differs from QTSplus beyond selection (the benchmark compares costs, not
answers):

- positions: stock vLLM gives video tokens Qwen2.5-VL's (t, h, w) M-RoPE positions (the temporal
  index scaled by ``second_per_grid_ts · tokens_per_second``) and text after a video continues from
  the largest of them; QTSplus uses plain sequential 1-D positions for every token (DESIGN §2.8).
  So the same prompt gets different logits: compare prompt tokens, latency and KV use, not text.
- ``second_per_grid_ts``: stock computes it per video as ``temporal_patch_size / sampled_fps``
  (sampled_fps = kept frames / source frames · source fps, from our loader's metadata); QTSplus
  ignores time entirely.
- rows: stock runs vLLM's own ViT implementation (tensor-parallel layers, its attention backend) in
  the engine; QTSplus runs transformers' ViT in the API server. Same weights, same maths, different
  kernels (and devices), so the rows agree to float tolerance, not bit for bit.
- the vision RMSNorm eps: vLLM's stock ViT uses the config's top-level ``rms_norm_eps`` when there
  is one (transformers always 1e-6); the released checkpoints use 1e-6 for both.
- EVS (``--video-pruning-rate``) crashes vLLM 0.32's CPU engine (tests/e2e/test_convert_serve.py
  says why); on CUDA it prunes the stock model's video tokens query-blind.
- frames: only with our loader. vLLM's default loader keeps 32 frames, so a stock server without
  ``video_backend`` ``qtsplus_frames`` sees different frames and a different M.
- settings: our per-request ``max_pixels``/``min_pixels`` and the stock processor's
  ``mm_processor_kwargs`` size keys differ in spelling and defaults; convert with the same bounds
  (``--max-pixels``/``--min-pixels``) instead of changing them per request.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .checkpoint import BIN_INDEX_FILE, INDEX_FILE, SINGLE_FILE, CheckpointReader, load_config
from .config import PROJECTOR_KEY, SELECTOR_PREFIX, VISION_PREFIX, CheckpointError, resolve_vision_config
from .video import CLIP_MEAN, CLIP_STD, PreprocessConfig, qwen_vl

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"
STOCK_VISION_PREFIX = "visual."
TOKENS_PER_SECOND = 2  # Qwen2.5-VL's released vision_config value

# Source prefix -> target prefix (None: drop). Checked in order; a key matching none is an error.
KEY_RULES: tuple[tuple[str, str | None], ...] = (
    (VISION_PREFIX, STOCK_VISION_PREFIX),
    (SELECTOR_PREFIX, None),
    ("model.layers.", "model.layers."),
    ("model.embed_tokens.", "model.embed_tokens."),
    ("model.norm.", "model.norm."),
    ("lm_head.", "lm_head."),
)

# config.json fields of a Qwen2.5-VL text model that pass through unchanged (everything else, the
# QTS+ fields included, is dropped).
TEXT_FIELDS = (
    "attention_dropout", "bos_token_id", "dtype", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "layer_types", "max_position_embeddings",
    "max_window_layers", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "pad_token_id", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta", "sliding_window",
    "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache", "use_sliding_window",
    "vocab_size",
)  # fmt: skip
VISION_FIELDS = (
    "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size",
    "spatial_merge_size", "temporal_patch_size", "tokens_per_second", "window_size", "out_hidden_size",
    "fullatt_block_indexes", "initializer_range",
)  # fmt: skip
TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
IMAGE_PREPROCESSOR_DEFAULTS = {  # Qwen2.5-VL's released preprocessor_config.json
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}  # fmt: skip
VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"
ITEM_SIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


def rename_key(name: str) -> str | None:
    """The stock Qwen2.5-VL name of a QTSplus tensor, or None when it is dropped."""
    if name == PROJECTOR_KEY:
        raise CheckpointError(
            f"{PROJECTOR_KEY} maps the ViT output to the LM width: a checkpoint with a projector has no "
            "stock Qwen2.5-VL form (its merger must output hidden_size directly)"
        )
    for source, target in KEY_RULES:
        if name.startswith(source):
            return None if target is None else target + name[len(source) :]
    raise CheckpointError(f"tensor {name!r} is neither LM, vision tower nor selector: cannot convert it")


def read_token_ids(src: Path) -> dict[str, int]:
    """``image_token_id`` … ``vision_end_token_id`` (and ``vision_token_id``) from the source tokenizer."""
    vocab = AutoTokenizer.from_pretrained(str(src)).get_vocab()
    missing = [token for token in TOKEN_FIELDS.values() if token not in vocab]
    if missing:
        raise CheckpointError(f"the tokenizer in {src} lacks the Qwen2.5-VL tokens {missing}")
    ids = {field: vocab[token] for field, token in TOKEN_FIELDS.items()}
    if "<|vision_pad|>" in vocab:  # released configs carry it; nothing reads it
        ids["vision_token_id"] = vocab["<|vision_pad|>"]
    return ids


def stock_config(src: Path, reader: CheckpointReader) -> dict:
    """config.json of the converted checkpoint (flat Qwen2.5-VL layout, see the module docstring)."""
    raw = json.loads((src / "config.json").read_text())
    config = load_config(src)
    vision = resolve_vision_config(config, reader.shapes(VISION_PREFIX))
    if vision.out_hidden_size != config.hidden_size:
        raise CheckpointError(
            f"vision tower output size {vision.out_hidden_size} ({VISION_PREFIX}merger.mlp.2.weight) differs "
            f"from hidden_size={config.hidden_size}: stock Qwen2.5-VL cannot splice it"
        )
    vision_config = {key: getattr(vision, key) for key in VISION_FIELDS}
    vision_config["fullatt_block_indexes"] = list(vision.fullatt_block_indexes)
    vision_config["tokens_per_second"] = (config.vision_config or {}).get(
        "tokens_per_second", TOKENS_PER_SECOND
    )
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **{key: raw[key] for key in TEXT_FIELDS if key in raw},
        "tie_word_embeddings": "lm_head.weight" not in reader,
        **read_token_ids(src),
        "vision_config": vision_config,
    }


def video_preprocessor_config(vision_config: dict, preprocess: PreprocessConfig) -> dict:
    """transformers' ``Qwen2VLVideoProcessor`` settings that resize like ``qtsplus_vllm.video``.

    ``cap_pixels_per_frame`` with ``max_video_tokens`` = qwen-vl-utils' MODEL_SEQ_LEN reproduces the
    total-pixel share; ``longest_edge`` also takes qwen-vl-utils' 768-token per-frame cap.
    """
    factor = vision_config["patch_size"] * vision_config["spatial_merge_size"]
    longest = min(preprocess.max_pixels, qwen_vl.VIDEO_MAX_TOKEN_NUM * factor * factor)
    if int(preprocess.min_pixels * 1.05) > longest:
        raise ValueError(
            f"max_pixels={preprocess.max_pixels} is below 1.05 * min_pixels={preprocess.min_pixels}: there "
            "transformers' video processor and qwen-vl-utils bound frames differently (M would differ)"
        )
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "size": {"shortest_edge": preprocess.min_pixels, "longest_edge": longest},
        "cap_pixels_per_frame": True,
        "max_video_tokens": qwen_vl.MODEL_SEQ_LEN,
        "patch_size": vision_config["patch_size"],
        "temporal_patch_size": vision_config["temporal_patch_size"],
        "merge_size": vision_config["spatial_merge_size"],
        "do_resize": True,
        "resample": 3,  # bicubic, as qtsplus_vllm.video.resize_frames
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess.image_mean),
        "image_std": list(preprocess.image_std),
        "do_convert_rgb": True,
        "do_sample_frames": False,  # the video loader has sampled them (ours: qwen-vl-utils' rule)
        "min_frames": qwen_vl.FPS_MIN_FRAMES,
        "max_frames": qwen_vl.FPS_MAX_FRAMES,
    }


def image_preprocessor_config(src: Path) -> dict:
    """The source's preprocessor_config.json (Qwen2.5-VL's) naming the stock processor class."""
    path = src / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.is_file() else dict(IMAGE_PREPROCESSOR_DEFAULTS)
    config["processor_class"] = "Qwen2_5_VLProcessor"
    config.setdefault("image_processor_type", "Qwen2VLImageProcessor")
    return config


def output_file(source_file: str) -> str:
    """The safetensors file a source weight file is written to (``pytorch_model*.bin`` renamed)."""
    if not source_file.endswith(".bin"):
        return source_file
    stem = source_file.removesuffix(".bin")
    return (
        SINGLE_FILE if stem == "pytorch_model" else stem.replace("pytorch_model", "model", 1) + ".safetensors"
    )


def shard_plan(reader: CheckpointReader) -> dict[str, list[tuple[str, str]]]:
    """Output file -> [(source name, target name)], keeping the source's file of every tensor."""
    file_of = reader.files()
    plan: dict[str, list[tuple[str, str]]] = {}
    for name in sorted(file_of):
        target = rename_key(name)
        if target is not None:
            plan.setdefault(output_file(file_of[name]), []).append((name, target))
    return plan


def tensor_metadata(
    reader: CheckpointReader, plan: dict[str, list[tuple[str, str]]]
) -> dict[str, tuple[str, list[int]]]:
    """Source name -> (safetensors dtype, shape) of every planned tensor, without reading their data."""
    shapes, codes = reader.shapes(strip=False), reader.dtype_codes(strip=False)
    meta = {name: (codes[name], shapes[name]) for entries in plan.values() for name, _ in entries}
    unsupported = sorted(f"{name} ({dtype})" for name, (dtype, _) in meta.items() if dtype not in ITEM_SIZE)
    if unsupported:
        raise CheckpointError(f"tensors with non-float dtypes cannot be converted: {unsupported}")
    return meta


def write_safetensors(
    path: Path,
    reader: CheckpointReader,
    entries: list[tuple[str, str]],
    meta: dict[str, tuple[str, list[int]]],
) -> int:
    """Write ``entries`` [(source name, target name)] as one safetensors file, one tensor at a time.

    The header (dtypes, shapes, offsets) comes from the source metadata (``meta``), so it is written
    first and each tensor's bytes are written at their offset as they are read (each source file is
    opened once). Larger dtypes first keeps every offset aligned to its element size, as safetensors'
    own writer does. Returns the bytes of tensor data.
    """
    entries = sorted(entries, key=lambda e: (-ITEM_SIZE[meta[e[0]][0]], e[1]))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, target in entries:
        dtype, shape = meta[name]
        size = ITEM_SIZE[dtype] * math.prod(shape)
        header[target] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    target_of = dict(entries)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        data_start = out.tell()
        for name, tensor in reader.iter_tensors(name for name, _ in entries):
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            start, end = header[target_of[name]]["data_offsets"]
            if len(data) != end - start:
                raise CheckpointError(f"{name}: read {len(data)} bytes, the source header says {end - start}")
            out.seek(data_start + start)
            out.write(data)
            del tensor, data
        out.truncate(data_start + offset)
    path.chmod(0o644)  # like the tiny checkpoints: a server running as another user must read it
    return offset


def convert_to_qwen2_5_vl(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    max_pixels: int = PreprocessConfig.max_pixels,
    min_pixels: int = PreprocessConfig.min_pixels,
) -> Path:
    """Write the stock Qwen2.5-VL form of the QTSplus checkpoint ``src_dir`` into ``out_dir``.

    ``max_pixels`` / ``min_pixels``: the per-frame bounds the plugin resizes with (defaults: its own);
    the video preprocessor config reproduces them. Raises CheckpointError (a ValueError) for a source
    that cannot be converted, before writing anything. Returns the output directory.
    """
    src, out = Path(src_dir), Path(out_dir)
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"the output directory must differ from the source: {out}")
    reader = CheckpointReader(src)
    plan = shard_plan(reader)
    config = stock_config(src, reader)
    meta = tensor_metadata(reader, plan)
    video_config = video_preprocessor_config(
        config["vision_config"], PreprocessConfig(max_pixels=max_pixels, min_pixels=min_pixels)
    )

    out.mkdir(parents=True, exist_ok=True)
    # vLLM globs *.safetensors, and would read stale .bin files of a stock checkpoint without them
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE, *out.glob("pytorch_model*.bin")]:
        stale.unlink(missing_ok=True)
    (out / BIN_INDEX_FILE).unlink(missing_ok=True)
    weight_map, total = {}, 0
    for file, entries in plan.items():
        total += write_safetensors(out / file, reader, entries, meta)
        weight_map.update({target: file for _, target in entries})
    if reader.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / INDEX_FILE, index)

    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", image_preprocessor_config(src))
    _write_json(out / VIDEO_PREPROCESSOR_FILE, video_config)
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m qtsplus_vllm.convert SRC OUT [--max-pixels N] [--min-pixels N]``."""
    parser = argparse.ArgumentParser(
        description="Convert a QTSplus checkpoint into a stock Qwen2.5-VL checkpoint (all visual tokens)"
    )
    parser.add_argument("src", help="QTSplus checkpoint directory")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--max-pixels", type=int, default=PreprocessConfig.max_pixels)
    parser.add_argument("--min-pixels", type=int, default=PreprocessConfig.min_pixels)
    args = parser.parse_args(argv)
    try:
        print(
            convert_to_qwen2_5_vl(args.src, args.out, max_pixels=args.max_pixels, min_pixels=args.min_pixels)
        )
    except (ValueError, OSError) as err:  # CheckpointError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
