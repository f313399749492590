"""Checkpoint layouts (issue 18): what the writer emits, how each is read, and what is refused.

The end-to-end proof (each layout served, answers equal to the oracle) is tests/e2e/test_serve_layouts.py;
here: the files of each layout, the config served by model_type, the start-up facts, LoRA refused.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from qtsplus_vllm.checkpoint import CheckpointReader, load_config, validate_checkpoint
from qtsplus_vllm.config import ARCHITECTURE, CheckpointError, QTSplusConfig
from qtsplus_vllm.layout import inspect_layout, peft_tensors
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.layouts import (
    IMPORTED_SENTINEL,
    LORA_TARGETS,
    REFERENCE_LM_ARCHITECTURE,
    UNPICKLED_SENTINEL,
)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("trainer") / "m", seed=3, layout="trainer", tied=True
    )


def test_trainer_layout_has_the_reference_trainer_files(trainer):
    names = {p.name for p in trainer.iterdir()}
    assert {
        "pytorch_model.bin", "config.json", "generation_config.json", "training_args.bin",
        "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
        "chat_template.jinja",
    } <= names  # fmt: skip
    assert not any(name.endswith(".safetensors") for name in names)
    config = json.loads((trainer / "config.json").read_text())
    assert config["architectures"] == [REFERENCE_LM_ARCHITECTURE]
    assert config["rope_scaling"]["type"] == config["rope_scaling"]["rope_type"] == "default"
    assert config["attn_implementation"] == "flash_attention_2"
    assert "auto_map" not in config and "vision_config" not in config
    assert config["tie_word_embeddings"] is True
    video = json.loads((trainer / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert json.loads((trainer / "tokenizer_config.json").read_text())["bos_token"] == "<|endoftext|>"
    generation = json.loads((trainer / "generation_config.json").read_text())
    assert generation["do_sample"] is False and isinstance(generation["eos_token_id"], int)
    reader = CheckpointReader(trainer)
    assert "lm_head.weight" in reader  # saved although tied
    both = reader.load(["lm_head.weight", "model.embed_tokens.weight"])
    assert torch.equal(both["lm_head.weight"], both["model.embed_tokens.weight"])


def test_the_traps_are_real(trainer, tmp_path):
    """Unpickling training_args.bin or importing the code files leaves a mark: the e2e checks mean something."""
    torch.load(trainer / "training_args.bin", weights_only=False)  # what must never happen in serving
    assert (trainer / UNPICKLED_SENTINEL).exists()
    (trainer / UNPICKLED_SENTINEL).unlink()
    published = write_tiny_checkpoint(tmp_path / "p", seed=3, layout="published")
    code = next(published.glob("*.py"))
    spec = importlib.util.spec_from_file_location("trap", code)
    with pytest.raises(ImportError, match="never be imported"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (published / IMPORTED_SENTINEL).exists()


def test_training_args_is_never_unpickled_by_the_reader(trainer):
    reader = CheckpointReader(trainer)
    validate_checkpoint(load_config(trainer), reader)
    assert "training_args.bin" not in set(reader.files().values())
    assert not (trainer / UNPICKLED_SENTINEL).exists()


@pytest.mark.parametrize("names", [[ARCHITECTURE], [REFERENCE_LM_ARCHITECTURE], None, ["SomethingElse"]])
def test_every_architecture_name_is_served_by_our_class(names):
    raw = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    if names is not None:
        raw["architectures"] = names
    config = QTSplusConfig.from_dict(raw)
    assert config.architectures == [ARCHITECTURE]  # what vLLM picks the model class from
    assert config.checkpoint_architectures == (names or [])


def test_other_model_types_keep_their_architectures():
    from transformers import Qwen2Config

    assert Qwen2Config(architectures=[REFERENCE_LM_ARCHITECTURE]).architectures == [REFERENCE_LM_ARCHITECTURE]


def test_each_layout_reads_as_the_same_weights(tmp_path):
    ours = CheckpointReader(write_tiny_checkpoint(tmp_path / "ours", seed=4))
    for layout in ("trainer", "trainer-safetensors", "published"):
        other = CheckpointReader(write_tiny_checkpoint(tmp_path / layout, seed=4, layout=layout))
        assert other.keys() == ours.keys(), layout
        for name in (
            "model.qts_plus.selector.budget.mlp.0.weight",
            "model.vision_tower.patch_embed.proj.weight",
        ):
            assert torch.equal(other.load([name])[name], ours.load([name])[name]), (layout, name)


def test_layout_facts_for_the_start_up_line(tmp_path):
    bare = write_tiny_checkpoint(
        tmp_path / "bare", seed=4, layout="published", architecture="none", video_processor_type="none"
    )
    facts = inspect_layout(bare)
    assert facts.kind == "remote-code repository" and facts.architectures == []
    assert facts.video_processor is None and "qts_plus_qwen2_5_lm.py" in facts.remote_code
    assert facts.weights.startswith("3 safetensors shard(s)")


@pytest.mark.parametrize("layout", ["trainer", "trainer-safetensors"])
def test_an_unmerged_lora_checkpoint_is_refused_naming_its_tensors(tmp_path, layout):
    model = write_tiny_checkpoint(tmp_path / "lora", seed=4, layout=layout, lora=True)
    reader = CheckpointReader(model)
    found = peft_tensors(reader.keys())
    assert any(".lora_A." in n for n in found) and any(".base_layer." in n for n in found)
    assert {n.split(".")[-4] for n in found if ".lora_A." in n} == set(LORA_TARGETS)
    with pytest.raises(CheckpointError, match=r"LoRA \(PEFT\).*lora_alpha / r.*merge_and_unload"):
        validate_checkpoint(load_config(model), reader)


def test_the_engine_refuses_lora_tensors_as_they_stream(tmp_path):
    """``load_weights`` stops on the first PEFT name, before vLLM's loader fails on an unknown name."""
    pytest.importorskip("vllm")
    from qtsplus_vllm.serving.model import QTSplusQwen2_5_VLForCausalLM

    model = object.__new__(QTSplusQwen2_5_VLForCausalLM)
    torch.nn.Module.__init__(model)
    model.model_path = "m"
    weights = iter(
        [("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", torch.zeros(2, 2))]
    )
    with pytest.raises(CheckpointError, match="LoRA"):
        model.load_weights(weights)


def test_peft_names():
    assert peft_tensors(["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]) == []
    assert peft_tensors(["base_model.model.lm_head.weight"]) == ["base_model.model.lm_head.weight"]


def test_trust_remote_code_is_refused_at_start_up():
    """With --trust-remote-code vLLM imports the repository's *.py files: QTSplus never needs them."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from qtsplus_vllm.serving.deployment import DeploymentError, check_deployment

    with pytest.raises(DeploymentError, match="Drop --trust-remote-code"):
        check_deployment(SimpleNamespace(trust_remote_code=True, multimodal_config=None))
    check_deployment(SimpleNamespace(trust_remote_code=False, multimodal_config=None))
