"""Write a tiny random-weight QTSplus checkpoint in exactly the released format (DESIGN §3).

Tests, benchmarks and users without the real weights load and serve these directories through the
same code paths as AlpachinoNLP/QTSplus-*: a Qwen2.5-VL *text* config plus the QTS+ fields (and, like
the release, no ``vision_config`` unless asked), safetensors with the released key names, a byte-level
BPE tokenizer carrying every Qwen2.5-VL added token, a Qwen2.5-VL-style chat template and the
Qwen2.5-VL preprocessor config. Nothing is downloaded; the same seed gives byte-identical files
(safetensors; ``torch.save`` files differ only by the random serialization id torch writes).

The weights can also be written as the reference trainer's ``torch.save`` pickles
(``pytorch_model.bin``, or shards ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``):
``weight_format="bin"``.

    python -m qtsplus_vllm.testing.tiny_checkpoint OUT_DIR [--seed 0] [--sharded] [--tied] [--weight-format bin]
        [--layout ours|trainer|trainer-safetensors|published] [--architecture NAME|none]
        [--video-processor-type NAME|none] [--lora] [--preset 3b-proportional|7b-proportional]

``--preset`` starts from a cost-proportional benchmark preset (:mod:`qtsplus_vllm.testing.proportional`):
a ViT and an LM scaled down from the released 3B/7B so that their measured cost ratios on a CPU are the
real model's, with the reference training script's selector settings.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLTextModel,
)

from ..checkpoint import BIN_FILE, BIN_INDEX_FILE, DTYPES, INDEX_FILE, SINGLE_FILE
from ..config import (
    ARCHITECTURE,
    MODEL_TYPE,
    PROJECTOR_KEY,
    SELECTOR_PREFIX,
    VISION_PREFIX,
    VIT_DEFAULTS,
    VIT_HEAD_DIM,
    QTSplusConfig,
)
from ..selector import QTSplusSelector
from .layouts import IMPORTED_SENTINEL, LAYOUTS, UNPICKLED_SENTINEL, write_layout

# Files a layout may add, removed before any write so that a rewrite leaves no file of another layout
LAYOUT_FILES = (
    "training_args.bin", "video_preprocessor_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", UNPICKLED_SENTINEL, IMPORTED_SENTINEL,
)  # fmt: skip

# Qwen2.5-VL's added tokens in their real order (ids follow the BPE vocabulary here, not 151643+).
# As in Qwen's tokenizer_config.json, the tool-call / fill-in-the-middle tokens are added but not
# "special", so skip_special_tokens keeps them in decoded text (tool parsers need that).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
NON_SPECIAL_ADDED = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
BPE_VOCAB = 448  # 256 byte symbols + up to 192 merges

# A few lines of our own English prose: the BPE merges only need to be plausible and deterministic.
CORPUS = """\
What is moving in the video? A red square slides from the left edge to the right edge.
The camera stays still while a small blue circle bounces near the bottom of the frame.
Describe what happens at the start, in the middle and at the end of the clip.
Which colour is the background, and does it change over time?
How many objects can you see, and in which direction are they moving?
The person in the kitchen opens the door, picks up a cup and walks out of the room.
A green car drives along the road; later a white truck passes it on the other side.
Answer the question about the video with a short sentence.
Is the ball moving faster at the beginning or at the end of the video?
The weather is sunny, the sky is clear and the trees move slowly in the wind.
"""

# Written for this project; renders exactly what Qwen2.5-VL's template renders.
CHAT_TEMPLATE = (
    "{%- set count = namespace(image=0, video=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}"
    "{%- set count.image = count.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ count.image ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] in ('video', 'video_url') or 'video' in part -%}"
    "{%- set count.video = count.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ count.video ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

PREPROCESSOR_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}  # fmt: skip


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained on :data:`CORPUS`.

    The pipeline (NFC, Qwen2's split regex, byte-level without regex) is the one transformers 5's
    ``Qwen2Tokenizer`` rebuilds from the vocab and merges, so tokenizer.json and transformers agree.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED])
    return tok


def added_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of Qwen2.5-VL's added tokens in this tokenizer (small numbers, after the BPE vocabulary)."""
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + NON_SPECIAL_ADDED}


def write_tokenizer(out: Path, tok: Tokenizer, max_len: int) -> None:
    """tokenizer.json, tokenizer_config.json (as Qwen2.5-VL ships it) and chat_template.jinja."""
    tok.save(str(out / "tokenizer.json"))
    decoder = {
        str(i): dict(
            content=t,
            lstrip=False,
            normalized=False,
            rstrip=False,
            single_word=False,
            special=t in SPECIAL_TOKENS,
        )
        for t, i in added_token_ids(tok).items()
    }
    config = dict(
        add_bos_token=False, add_prefix_space=False, added_tokens_decoder=decoder,
        additional_special_tokens=SPECIAL_TOKENS[1:], bos_token=None, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
        model_max_length=max_len, pad_token="<|endoftext|>", split_special_tokens=False,
        tokenizer_class="Qwen2Tokenizer", unk_token=None,
    )  # fmt: skip
    _write_json(out / "tokenizer_config.json", config)
    # transformers 5 prefers chat_template.jinja over the tokenizer_config entry; vLLM reads it via
    # the processor. Both hold the same template.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def text_config(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    max_positions: int = 32768,
) -> dict:
    """The Qwen2.5-VL text-model part of config.json, with the released field names."""
    half = hidden // heads // 2  # rotary frequencies per head; M-RoPE splits them (t, h, w)
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    return dict(
        attention_dropout=0.0, hidden_act="silu", hidden_size=hidden, initializer_range=0.02,
        intermediate_size=intermediate, max_position_embeddings=max_positions, max_window_layers=layers,
        num_attention_heads=heads, num_hidden_layers=layers, num_key_value_heads=kv_heads,
        rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_theta=1000000.0,
        sliding_window=max_positions, use_cache=True, use_sliding_window=False, vocab_size=vocab,
    )  # fmt: skip


def vision_hyperparams(
    depth: int, hidden: int, intermediate: int, heads: int | None, out_hidden: int,
    fullatt: list[int] | None = None,
) -> dict:  # fmt: skip
    """The ViT's hyper-parameters: those a reader infers from weight shapes, Qwen2.5-VL defaults otherwise.

    ``fullatt``: the full-attention blocks (None: Qwen2.5-VL's 7/15/23/31 that exist at this depth,
    which is what a reader infers without a ``vision_config``).
    """
    if heads is None:
        if hidden % VIT_HEAD_DIM:
            raise ValueError(
                f"vision_hidden={hidden} is not a multiple of the Qwen2.5-VL head dim {VIT_HEAD_DIM}: "
                "pass vision_heads (and vision_config=True, since readers cannot infer the heads)"
            )
        heads = hidden // VIT_HEAD_DIM
    return {
        **VIT_DEFAULTS,
        "depth": depth,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_heads": heads,
        "out_hidden_size": out_hidden,
        "tokens_per_second": 2,
        # as inferred for a config without vision_config, so both forms compute the same thing
        "fullatt_block_indexes": (
            [i for i in VIT_DEFAULTS["fullatt_block_indexes"] if i < depth]
            if fullatt is None
            else list(fullatt)
        ),
    }


def init_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Seeded fp32 values for one parameter: norms ~1, biases small, weights ~ N(0, 1/fan_in).

    Weights scaled by fan-in keep activations near unit size through every layer, so attention
    scores, the relevance r and the budget logit are varied instead of saturated. Each tensor has its
    own generator (seed, name): its values do not depend on which other tensors are written.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=gen)
    if "norm" in name or "ln_q" in name:
        return 1.0 + 0.1 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    if name.endswith("embed_tokens.weight"):
        return noise  # unit-scale question embeddings, as the selector's q_norm expects
    return noise / math.sqrt(math.prod(shape[1:]))


def parameter_shapes(config: QTSplusConfig, vision: dict, tied: bool, projector: bool) -> dict:
    """Every tensor of the checkpoint (full key names) with its shape, from the real module classes.

    Built on the meta device (no memory, no init). Parameters only: buffers such as rotary
    frequencies are not in the released files.
    """
    fields = set(getattr(Qwen2_5_VLVisionConfig, "__dataclass_fields__", vision))
    with torch.device("meta"):
        parts = [
            ("model.", Qwen2_5_VLTextModel(config)),
            (VISION_PREFIX, Qwen2_5_VisionTransformerPretrainedModel(
                Qwen2_5_VLVisionConfig(**{k: v for k, v in vision.items() if k in fields}))),
            (SELECTOR_PREFIX, QTSplusSelector.from_config(config)),
        ]  # fmt: skip
        shapes = {p + k: v.shape for p, module in parts for k, v in module.named_parameters()}
    if not tied:
        shapes["lm_head.weight"] = torch.Size([config.vocab_size, config.hidden_size])
    if projector:
        shapes[PROJECTOR_KEY] = torch.Size([config.hidden_size, vision["out_hidden_size"]])
    return shapes


WEIGHT_FORMATS = ("safetensors", "bin")


def weight_files(out: Path) -> list[Path]:
    """The weight files and indexes of either format in ``out`` (what a rewrite must remove first)."""
    return [
        *out.glob("model*.safetensors"),
        *out.glob("pytorch_model*.bin"),
        out / INDEX_FILE,
        out / BIN_INDEX_FILE,
    ]


def save_weights(
    out: Path,
    tensors: dict[str, torch.Tensor],
    sharded: bool,
    num_shards: int = 3,
    weight_format: str = "safetensors",
) -> None:
    """model.safetensors / pytorch_model.bin, or shards + index, with Hugging Face's file names.

    Shards take the sorted keys round-robin, so the LM, the vision tower and the selector each span
    every shard: readers must then follow the index for any prefix. ``bin`` files are ``torch.save``
    of a plain {name: tensor} dict, as the reference trainer saves (zip format, so readers can mmap).
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    single, index, pattern = {
        "safetensors": (SINGLE_FILE, INDEX_FILE, "model-{:05d}-of-{:05d}.safetensors"),
        "bin": (BIN_FILE, BIN_INDEX_FILE, "pytorch_model-{:05d}-of-{:05d}.bin"),
    }[weight_format]
    names = sorted(tensors)
    if not sharded:
        weight_map = {name: single for name in names}
    else:
        files = [pattern.format(i + 1, num_shards) for i in range(num_shards)]
        weight_map = {name: files[i % num_shards] for i, name in enumerate(names)}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(out / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for file in sorted(set(weight_map.values())):
        part = {k: tensors[k] for k in names if weight_map[k] == file}
        if weight_format == "safetensors":
            save_file(part, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(part, out / file)
        # safetensors creates files 0600: a server running as another user (Docker) could not read them
        (out / file).chmod(0o644)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    vision_depth: int = 2,
    vision_hidden: int = 160,
    vision_intermediate: int = 96,
    vision_heads: int | None = None,
    vision_out_hidden: int | None = None,
    vision_fullatt: str = "",
    sharded: bool = False,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    vision_config: bool = False,
    nmax: int = 256,
    rho_min: float = 0.05,
    rho_max: float = 0.5,
    tau_s: float = 0.1,
    scoring_layers: int = 1,
    reencode_layers: int = 1,
    reencode: bool = True,
    with_projector: bool = False,
    weight_format: str = "safetensors",
    layout: str = "ours",
    architecture: str = "",
    video_processor_type: str = "",
    lora: bool = False,
    max_position_embeddings: int = 32768,
) -> Path:
    """Write a random-weight QTSplus checkpoint directory (released format) and return its path.

    Defaults: LM D=64, 2 layers, H=4, Hkv=2 (Dh=16), FFN 128, vocab 512 (470 tokens), untied;
    ViT depth 2, hidden 160 (2 heads of 80), MLP 96, merger 640 -> 128; selector 1 scoring + 1
    re-encode layer. About 1.2M parameters (4.7 MB in fp32), mostly the ViT.

    ``hidden``/``layers``/``heads``/``kv_heads``/``intermediate`` size the LM (D, H, Hkv);
    ``vision_*`` size the ViT (its head dim is 80 unless ``vision_heads`` is given, which then needs
    ``vision_config=True``: readers infer heads as hidden / 80). The merger outputs
    ``vision_out_hidden`` (default D); a value other than D needs ``with_projector`` (writes
    ``model.mm_projector.weight`` [D, vision_out_hidden]). ``nmax`` defaults to 256, not the release's
    2560, so tiny servers profile quickly and the cap can bind in tests. ``weight_format`` ``"bin"``
    writes ``torch.save`` pickles (``pytorch_model.bin`` / ``pytorch_model-*.bin`` + index) instead of
    safetensors, as the reference trainer does.

    ``layout`` writes the files of another producer (:mod:`qtsplus_vllm.testing.layouts`): ``"trainer"``
    (the reference trainer's output, file for file; ``sharded`` and ``weight_format`` do not apply),
    ``"trainer-safetensors"`` (the same after the reference demo's conversion) or ``"published"`` (a
    remote-code Hub repository: sharded safetensors, ``auto_map`` and ``*.py`` files).
    ``architecture``: the name config.json gives ("" = the layout's, ``"none"`` = no
    ``architectures`` key); ``video_processor_type``: the name ``video_preprocessor_config.json``
    gives ("" = the layout's: none for ``ours``, ``Qwen2VLVideoProcessor`` for the others; ``"none"``
    = no such file); ``lora``: a trainer's PEFT state dict with unmerged LoRA adapters.
    ``vision_fullatt``: the ViT's full-attention blocks, comma-separated ("" = Qwen2.5-VL's 7/15/23/31
    below ``vision_depth``, as readers infer; ``"none"`` = window attention only); another choice than
    the default needs ``vision_config`` (readers cannot infer it). ``tau_s`` (training only) and
    ``max_position_embeddings`` are written to config.json. The cost-proportional benchmark presets
    (:data:`qtsplus_vllm.testing.proportional.PRESETS`) are sets of these keywords.
    Raises ValueError / CheckpointError for inconsistent sizes, before writing anything.
    """
    out_hidden = hidden if vision_out_hidden is None else vision_out_hidden
    if out_hidden != hidden and not with_projector:
        raise ValueError(f"vision_out_hidden={out_hidden} differs from hidden={hidden}: set with_projector")
    if vision_heads is not None and not vision_config:
        raise ValueError(
            "vision_heads cannot be inferred from weights by readers: also set vision_config=True"
        )
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if lora and not layout.startswith("trainer"):
        raise ValueError(
            "lora is what the reference trainer writes: use layout 'trainer' or 'trainer-safetensors'"
        )
    fullatt = None
    if vision_fullatt:
        try:
            fullatt = [] if vision_fullatt == "none" else sorted({int(i) for i in vision_fullatt.split(",")})
        except ValueError:
            raise ValueError(
                f"vision_fullatt must be block numbers like '3,7' or 'none', got {vision_fullatt!r}"
            ) from None
        if any(not 0 <= i < vision_depth for i in fullatt):
            raise ValueError(f"vision_fullatt={vision_fullatt!r}: blocks must be in 0..{vision_depth - 1}")
        default = [i for i in VIT_DEFAULTS["fullatt_block_indexes"] if i < vision_depth]
        if fullatt != default and not vision_config:
            raise ValueError(
                "vision_fullatt cannot be inferred from weights by readers: also set vision_config=True"
            )
    vision = vision_hyperparams(
        vision_depth, vision_hidden, vision_intermediate, vision_heads, out_hidden, fullatt
    )
    tok = build_tokenizer()
    ids = added_token_ids(tok)
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    vocab = -(-tok.get_vocab_size() // 64) * 64  # rounded up like the real 151936 / 152064
    config_dict = {
        **text_config(hidden, layers, heads, kv_heads, intermediate, vocab, max_position_embeddings),
        "architectures": [ARCHITECTURE],
        # the released repo points at remote code; it must never be needed (our config is registered)
        "auto_map": {
            "AutoConfig": "qts_plus_qwen2_5_lm.QTSplusQwen2_5_VL_CausalLM_Config",
            "AutoModelForCausalLM": "qts_plus_qwen2_5_lm.QTSplusQwen2_5_VLTextForCausalLM",
        },
        "bos_token_id": eot,
        "eos_token_id": im_end,
        "model_type": MODEL_TYPE,
        "tie_word_embeddings": tied,
        "dtype": next(k for k, v in DTYPES.items() if v == dtype),  # transformers >= 4.56 spelling
        "transformers_version": "4.57.1",
        # QTS+ fields (DESIGN §3); lambda_*, tau_s and block_dropout are training-only
        "vision_tower": "qwen2_5_vl_vision", "pretrain_vision_model": "/home/trainer/Qwen2.5-VL-3B-Instruct",
        "enable_qts_plus": True, "embedding_dim": hidden, "project_text_if_needed": False,
        "vision_embed_size": hidden, "vision_tower_embed_size": out_hidden, "qts_plus_n_heads": heads,
        "qts_plus_nmax": nmax, "qts_plus_rho_min": rho_min, "qts_plus_rho_max": rho_max,
        "qts_plus_scoring_layers": scoring_layers, "qts_plus_reencode": reencode,
        "qts_plus_reencode_layers": reencode_layers, "qts_plus_tau_s": tau_s, "qts_plus_block_dropout": 0.0,
        "lambda_t": 1.0, "lambda_m": 1.7, "lambda_s": 0.05,
    }  # fmt: skip
    if vision_config:
        config_dict["vision_config"] = vision
    config = QTSplusConfig.from_dict(copy.deepcopy(config_dict))  # from_dict edits rope_scaling in place
    config.validate_qtsplus()

    shapes = parameter_shapes(config, vision, tied, with_projector)
    tensors = {name: init_tensor(name, shape, seed).to(dtype) for name, shape in shapes.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Weights left by an earlier write with another layout or format would be read instead of (index,
    # safetensors over bin) or next to (vLLM globs *.safetensors) the new ones. Unlinking also gives the
    # new files new inodes: a reader still mapping an old file keeps its (unchanged) pages.
    for stale in [*weight_files(out), *(out / name for name in LAYOUT_FILES), *out.glob("*.py")]:
        stale.unlink(missing_ok=True)
    if layout == "ours":
        save_weights(out, tensors, sharded, weight_format=weight_format)
    _write_json(out / "config.json", config_dict)
    write_tokenizer(out, tok, max_len=config_dict["max_position_embeddings"])
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    # Greedy by default for a test model; the released generation_config.json samples.
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": eot, "do_sample": False, "eos_token_id": [im_end, eot], "pad_token_id": eot},
    )
    if layout != "ours" or architecture or video_processor_type:
        write_layout(
            out, layout, tensors=tensors, config=config_dict, tok=tok, ids=ids,
            preprocessor=PREPROCESSOR_CONFIG, layers=layers, tied=tied, seed=seed,
            architecture=architecture, video_processor_type=video_processor_type, lora=lora,
            save_weights=save_weights,
        )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``qtsplus-tiny-checkpoint OUT_DIR`` with one flag per keyword of :func:`write_tiny_checkpoint`.

    Flags are derived from the signature so the two never drift: ``--kv-heads 2``, ``--sharded``,
    ``--tied``, ``--vision-config``, ``--no-reencode``, ``--dtype bfloat16`` ...
    """
    from .proportional import PRESETS

    parser = argparse.ArgumentParser(description="Write a tiny random-weight QTSplus checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS),
        help="start from a cost-proportional benchmark preset (qtsplus_vllm.testing.proportional); "
        "other flags given override its values",
    )  # fmt: skip
    for name, param in inspect.signature(write_tiny_checkpoint).parameters.items():
        flag, default = "--" + name.replace("_", "-"), param.default
        if param.kind is not param.KEYWORD_ONLY:
            continue
        if name == "dtype":
            parser.add_argument(flag, choices=sorted(DTYPES), default="float32")
        elif name == "weight_format":
            parser.add_argument(flag, choices=WEIGHT_FORMATS, default=default)
        elif name == "layout":
            parser.add_argument(flag, choices=LAYOUTS, default=default)
        elif isinstance(default, str):
            parser.add_argument(flag, default=default, help="'' = the layout's own; 'none' = leave it out")
        elif default is True:
            parser.add_argument("--no-" + flag[2:], dest=name, action="store_false")
        elif default is False:
            parser.add_argument(flag, action="store_true")
        else:
            kind = float if isinstance(default, float) else int
            parser.add_argument(flag, type=kind, default=default, help=f"default: {default}")
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = vars(parser.parse_args(argv))
    args.pop("preset")
    out_dir, args["dtype"] = args.pop("out_dir"), DTYPES[args["dtype"]]
    try:
        print(write_tiny_checkpoint(out_dir, **args))
    except ValueError as err:  # CheckpointError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
