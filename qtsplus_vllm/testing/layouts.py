"""The file layouts a QTSplus checkpoint is found in, for :func:`~qtsplus_vllm.testing.write_tiny_checkpoint`.

- ``ours``: this project's writer (safetensors, ``QTSplusQwen2_5_VLTextForCausalLM``, an ``auto_map``).
- ``trainer``: what the reference implementation's trainer writes (``QTSplusTrainer._save`` in
  ``Siyou-Li/QTSplus``, run under transformers 4.57), file for file: ``pytorch_model.bin`` (one
  ``torch.save`` of the full state dict, ``lm_head.weight`` included even when tied), ``config.json``
  saved unchanged from the LM split it started from (``"architectures":
  ["Qwen2_5_VLTextForCausalLM"]``, ``rope_scaling`` rewritten to ``{"type": "default", "rope_type":
  "default", "mrope_section": [...]}``, ``attn_implementation`` ``flash_attention_2``, ``layer_types``,
  the token ids, no ``vision_config``, no ``auto_map``), a greedy ``generation_config.json`` whose eos
  is ``<|im_end|>`` only, ``training_args.bin`` (a pickle), and the files of its processor
  (``Qwen2_5_VLVisionProcessor``): ``preprocessor_config.json``, ``video_preprocessor_config.json``
  naming ``Qwen2VLVideoProcessor``, the tokenizer files (bos ``<|endoftext|>``) and
  ``chat_template.jinja``. With ``lora=True`` the state dict is a PEFT model's (``base_model.model.``
  prefix, ``base_layer`` / ``lora_A`` / ``lora_B`` on the LM's linear layers).
- ``trainer-safetensors``: the same after the reference demo's conversion (``pytorch_model.bin``
  replaced by ``model.safetensors`` holding the same tensors).
- ``published``: a repository post-processed for remote code, as the Hub releases plausibly are:
  sharded safetensors, the ``auto_map`` and ``*.py`` files it points to, the trainer's processor files.

The pickles and code files written here are traps: unpickling ``training_args.bin`` or importing a
``*.py`` file creates a file named :data:`UNPICKLED_SENTINEL` or :data:`IMPORTED_SENTINEL` in the
checkpoint, so a test can prove that serving never did either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

LAYOUTS = ("ours", "trainer", "trainer-safetensors", "published")
REFERENCE_LM_ARCHITECTURE = "Qwen2_5_VLTextForCausalLM"
REFERENCE_VIDEO_PROCESSOR = "Qwen2VLVideoProcessor"
REFERENCE_PROCESSOR_CLASS = "Qwen2_5_VLVisionProcessor"
UNPICKLED_SENTINEL = "UNPICKLED-training_args.bin"
IMPORTED_SENTINEL = "IMPORTED-remote-code"
LORA_RANK, LORA_ALPHA = 2, 4
# The LM's linear layers the reference trainer gives LoRA adapters (find_all_linear_names)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A stand-in for the release's remote code: importing it leaves a mark (and would define nothing useful)
REMOTE_CODE = '''"""Stand-in for a Hub repository's remote code (qtsplus_vllm.testing.layouts): never import it."""
import os

open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "{sentinel}"), "w").close()
raise ImportError("qtsplus-vllm test trap: this repository code must never be imported")
'''


class _Trap:
    """Pickled as a call that creates a file when unpickled (what a hostile pickle could do instead)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def trainer_config(config: dict, ids: dict[str, int], layers: int, architecture: list[str] | None) -> dict:
    """config.json as the reference trainer's ``config.save_pretrained`` writes it (module docstring)."""
    out = {k: v for k, v in config.items() if k not in ("auto_map",)}
    mrope = config["rope_scaling"]["mrope_section"]
    out.update(
        rope_scaling={"type": "default", "rope_type": "default", "mrope_section": list(mrope)},
        attn_implementation="flash_attention_2",
        layer_types=["full_attention"] * layers,
        video_token_id=ids["<|video_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        transformers_version="4.57.1",
    )
    if architecture is None:
        out.pop("architectures", None)
    else:
        out["architectures"] = architecture
    return out


def processor_files(
    out: Path, tok, ids: dict[str, int], preprocessor: dict, video_processor_type: str | None
) -> None:
    """The files the reference trainer's processor (``Qwen2_5_VLVisionProcessor``) saves."""
    image = {**preprocessor, "processor_class": REFERENCE_PROCESSOR_CLASS}
    _json(out / "preprocessor_config.json", image)
    if video_processor_type:
        video = {
            key: preprocessor[key]
            for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")
        }
        video.update(
            image_mean=preprocessor["image_mean"],
            image_std=preprocessor["image_std"],
            fps=2.0,
            min_frames=4,
            max_frames=768,
            do_sample_frames=False,
            do_resize=True,
            do_normalize=True,
            do_rescale=True,
            rescale_factor=1 / 255,
            size={"shortest_edge": preprocessor["min_pixels"], "longest_edge": preprocessor["max_pixels"]},
            video_processor_type=video_processor_type,
            processor_class=REFERENCE_PROCESSOR_CLASS,
        )
        _json(out / "video_preprocessor_config.json", video)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config.update(bos_token="<|endoftext|>", processor_class=REFERENCE_PROCESSOR_CLASS)
    _json(out / "tokenizer_config.json", tokenizer_config)
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    specials["additional_special_tokens"] = tokenizer_config["additional_special_tokens"]
    _json(out / "special_tokens_map.json", specials)
    _json(out / "added_tokens.json", dict(sorted(ids.items(), key=lambda item: item[1])))
    tok.model.save(str(out))  # vocab.json and merges.txt, as a slow-tokenizer save writes them


def peft_state_dict(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The state dict of the PEFT-wrapped model: adapters on the LM's linear layers, unmerged."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in tensors.items():
        stem, _, leaf = name.rpartition(".")
        layer = stem.rpartition(".")[2]
        adapted = name.startswith("model.layers.") and layer in LORA_TARGETS
        if not adapted:
            out["base_model.model." + name] = tensor
            continue
        out[f"base_model.model.{stem}.base_layer.{leaf}"] = tensor
        if leaf == "weight":
            rows, cols = tensor.shape
            a = torch.randn(LORA_RANK, cols, generator=gen) / math.sqrt(cols)
            b = torch.randn(rows, LORA_RANK, generator=gen) * 0.01
            out[f"base_model.model.{stem}.lora_A.default.weight"] = a.to(tensor.dtype)
            out[f"base_model.model.{stem}.lora_B.default.weight"] = b.to(tensor.dtype)
    return out


def write_layout(
    out: Path,
    layout: str,
    *,
    tensors: dict[str, torch.Tensor],
    config: dict,
    tok,
    ids: dict[str, int],
    preprocessor: dict,
    layers: int,
    tied: bool,
    seed: int,
    architecture: str,
    video_processor_type: str,
    lora: bool,
    save_weights,
) -> None:
    """Rewrite a checkpoint written in our layout into ``layout`` (module docstring), in place."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if lora and not layout.startswith("trainer"):
        raise ValueError(
            "lora=True is what the reference trainer writes: use layout 'trainer' or 'trainer-safetensors'"
        )
    default_arch = REFERENCE_LM_ARCHITECTURE if layout.startswith("trainer") else config["architectures"][0]
    names = None if architecture == "none" else [architecture or default_arch]
    default_video = REFERENCE_VIDEO_PROCESSOR if layout != "ours" else ""
    video_type = "" if video_processor_type == "none" else (video_processor_type or default_video)
    if layout == "ours":
        if names is None:
            config.pop("architectures", None)
        else:
            config["architectures"] = names
        _json(out / "config.json", config)
        if video_type:
            processor_files(out, tok, ids, preprocessor, video_type)
        return

    state = dict(tensors)
    if layout.startswith("trainer") and tied:
        # the trainer's state dict copied to the CPU tensor by tensor: the tied head is saved as a copy
        state["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    if lora:
        state = peft_state_dict(state, seed)
    if layout == "trainer":
        save_weights(out, state, False, weight_format="bin")
    elif layout == "trainer-safetensors":
        save_weights(out, state, False, weight_format="safetensors")
    else:
        save_weights(out, state, True, weight_format="safetensors")

    if layout.startswith("trainer"):
        cfg = trainer_config(config, ids, layers, names)
        im_end, eot = ids["<|im_end|>"], ids["<|endoftext|>"]
        generation = {"bos_token_id": eot, "do_sample": False, "eos_token_id": im_end, "pad_token_id": eot}
        _json(out / "generation_config.json", {**generation, "transformers_version": "4.57.1"})
        torch.save(_Trap(out / UNPICKLED_SENTINEL), out / "training_args.bin")
    else:
        cfg = dict(config)
        if names is None:
            cfg.pop("architectures", None)
        else:
            cfg["architectures"] = names
        for file in {entry.split(".")[0] for entry in cfg.get("auto_map", {}).values()}:
            (out / f"{file}.py").write_text(REMOTE_CODE.format(sentinel=IMPORTED_SENTINEL))
    _json(out / "config.json", cfg)
    processor_files(out, tok, ids, preprocessor, video_type)
