"""Tiny checkpoints in the released format: writing, reading back, config inference, validation."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

import qtsplus_vllm.checkpoint as checkpoint_module
from qtsplus_vllm.checkpoint import (
    BIN_FILE,
    BIN_INDEX_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    expected_selector_shapes,
    load_config,
    validate_checkpoint,
)
from qtsplus_vllm.config import (
    SELECTOR_PREFIX,
    VISION_PREFIX,
    CheckpointError,
    QTSplusConfig,
    resolve_vision_config,
)
from qtsplus_vllm.convert import convert_to_qwen2_5_vl
from qtsplus_vllm.selector import QTSplusSelector
from qtsplus_vllm.testing.tiny_checkpoint import (
    CHAT_TEMPLATE,
    NON_SPECIAL_ADDED,
    SPECIAL_TOKENS,
    init_tensor,
    main,
    write_tiny_checkpoint,
)

# Key patterns of the released checkpoints (DESIGN §3), block/layer indices replaced by {i}.
LM_KEYS = {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    *(f"model.layers.{{i}}.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")),
    "model.layers.{i}.self_attn.o_proj.weight",
    *(f"model.layers.{{i}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
}
VISION_KEYS = {
    VISION_PREFIX + k
    for k in (
        "patch_embed.proj.weight",
        "blocks.{i}.norm1.weight",
        "blocks.{i}.norm2.weight",
        *(f"blocks.{{i}}.{m}.{w}" for m in ("attn.qkv", "attn.proj") for w in ("weight", "bias")),
        *(f"blocks.{{i}}.mlp.{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")),
        "merger.ln_q.weight",
        *(f"merger.mlp.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")),
    )
}


def pattern(key: str) -> str:
    return re.sub(r"\.(layers|blocks)\.\d+\.", r".\1.{i}.", key)


def edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, fn) -> None:
    weights = load_file(path / SINGLE_FILE)
    fn(weights)
    save_file(weights, str(path / SINGLE_FILE), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(str(tiny))


# ---------------------------------------------------------------- weights


def test_single_file_round_trip(tiny):
    reader = CheckpointReader(tiny)
    assert sorted(p.name for p in tiny.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (tiny / INDEX_FILE).exists()
    with safe_open(tiny / SINGLE_FILE, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    tensors = reader.load(reader.keys())
    assert tensors.keys() == load_file(tiny / SINGLE_FILE).keys()
    for name, tensor in tensors.items():
        assert reader.shapes(strip=False)[name] == list(tensor.shape)
        torch.testing.assert_close(tensor, init_tensor(name, tensor.shape, seed=0), rtol=0, atol=0)
    assert reader.dtype() == torch.float32


def test_key_names_are_the_released_ones(tiny):
    reader = CheckpointReader(tiny)
    keys = reader.keys()
    assert {pattern(k) for k in keys if not k.startswith(("model.vision", "model.qts"))} == LM_KEYS
    assert {pattern(k) for k in keys if k.startswith(VISION_PREFIX)} == VISION_KEYS
    config = load_config(tiny)
    assert reader.shapes(SELECTOR_PREFIX) == expected_selector_shapes(config)
    # only parameters: no rotary/inv_freq buffers, no projector unless asked
    assert not [k for k in keys if "inv_freq" in k or "rotary" in k or "mm_projector" in k]
    assert len({pattern(k) for k in keys if ".layers." in k}) * config.num_hidden_layers == sum(
        ".layers." in k for k in keys
    )
    validate_checkpoint(config, reader)


def test_sharded_round_trip_equals_single_file(tiny, tmp_path):
    sharded = write_tiny_checkpoint(tmp_path / "sharded", seed=0, sharded=True)
    assert not (sharded / SINGLE_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and files == sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    # the LM, the vision tower and the selector each span several shards
    for prefix in ("model.layers.", VISION_PREFIX, SELECTOR_PREFIX):
        assert len({f for k, f in index["weight_map"].items() if k.startswith(prefix)}) >= 2, prefix

    reader, single = CheckpointReader(sharded), CheckpointReader(tiny)
    assert reader.keys() == single.keys() == sorted(index["weight_map"])
    assert reader.shapes() == single.shapes()
    a, b = reader.load(reader.keys()), single.load(single.keys())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    validate_checkpoint(load_config(sharded), reader)


def test_rewriting_a_directory_replaces_the_weight_layout(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m", seed=1, sharded=True)
    write_tiny_checkpoint(path, seed=2)
    assert sorted(p.name for p in path.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (path / INDEX_FILE).exists()
    write_tiny_checkpoint(path, seed=3, sharded=True)
    assert not (path / SINGLE_FILE).exists()
    name = "model.norm.weight"
    torch.testing.assert_close(
        CheckpointReader(path).load([name])[name],
        init_tensor(name, torch.Size([128]), seed=3),
        rtol=0,
        atol=0,
    )


def test_load_prefix_reads_only_that_prefix(tmp_path, monkeypatch):
    path = write_tiny_checkpoint(tmp_path / "m", seed=1, sharded=True)
    read: list[str] = []

    class RecordingFile:
        def __init__(self, *args, **kwargs):
            self._file = safe_open(*args, **kwargs)

        def __enter__(self):
            self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self._file.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self._file, name)

    monkeypatch.setattr(checkpoint_module, "safe_open", RecordingFile)
    reader = CheckpointReader(path)
    selector = reader.load_prefix(SELECTOR_PREFIX)
    assert sorted(selector) == sorted(expected_selector_shapes(load_config(path)))
    assert sorted(read) == sorted(SELECTOR_PREFIX + k for k in selector)
    # the selector module loads what the prefix returns, strictly
    QTSplusSelector.from_config(load_config(path)).load_state_dict(selector)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(tmp_path, dtype):
    path = write_tiny_checkpoint(tmp_path / "m", dtype=dtype)
    reader = CheckpointReader(path)
    assert reader.dtype() == dtype
    assert json.loads((path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    assert load_config(path).dtype == dtype
    name = "model.qts_plus.selector.scoring_layers.0.k_proj.weight"
    tensor = reader.load([name])[name]
    assert tensor.dtype == dtype
    torch.testing.assert_close(tensor, init_tensor(name, tensor.shape, seed=0).to(dtype), rtol=0, atol=0)


def test_tied_checkpoint_has_no_lm_head(tiny, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tied", tied=True)
    reader = CheckpointReader(path)
    assert "lm_head.weight" not in reader and "lm_head.weight" in CheckpointReader(tiny)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    assert load_config(path).tie_word_embeddings is True
    # the other tensors do not depend on tying
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(
        reader.load([name])[name], CheckpointReader(tiny).load([name])[name], rtol=0, atol=0
    )


def test_projector_is_written_only_when_asked(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "p", with_projector=True, vision_out_hidden=48)
    reader = CheckpointReader(path)
    assert reader.shapes("model.mm_projector.", strip=False) == {"model.mm_projector.weight": [128, 48]}
    assert reader.shapes(VISION_PREFIX)["merger.mlp.2.weight"] == [48, 640]
    validate_checkpoint(load_config(path), reader)
    with pytest.raises(ValueError, match="vision_out_hidden=48"):
        write_tiny_checkpoint(tmp_path / "q", vision_out_hidden=48)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=7, sharded=True)
    b = write_tiny_checkpoint(tmp_path / "b", seed=7, sharded=True)
    c = write_tiny_checkpoint(tmp_path / "c", seed=8, sharded=True)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in c.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    differ = {n for n in names if (a / n).read_bytes() != (c / n).read_bytes()}
    assert differ == {n for n in names if n.endswith(".safetensors")}
    ra, rc = CheckpointReader(a), CheckpointReader(c)
    for name in ra.keys():
        assert not torch.equal(ra.load([name])[name], rc.load([name])[name]), name


# ---------------------------------------------------------------- torch.save (.bin) weights


class TrainingSettings:
    """Stands for any non-tensor object a trainer may pickle next to its weights (training_args.bin)."""

    def __init__(self):
        self.learning_rate = 1e-5


class RunsCode:
    """A pickle payload that calls os.mkdir(marker) when unpickled by a full (unsafe) unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_bin_round_trip_equals_safetensors(tiny, tmp_path, sharded):
    path = write_tiny_checkpoint(tmp_path / "bin", seed=0, weight_format="bin", sharded=sharded)
    assert not list(path.glob("*.safetensors")) and not (path / INDEX_FILE).exists()
    if sharded:
        index = json.loads((path / BIN_INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
        assert files == sorted(p.name for p in path.glob("*.bin"))
        assert not (path / BIN_FILE).exists()
        for prefix in ("model.layers.", VISION_PREFIX, SELECTOR_PREFIX):
            assert len({f for k, f in index["weight_map"].items() if k.startswith(prefix)}) >= 2, prefix
    else:
        assert (
            sorted(p.name for p in path.glob("*.bin")) == [BIN_FILE] and not (path / BIN_INDEX_FILE).exists()
        )
    for file in path.glob("*.bin"):  # plain torch.save state dicts that torch's safe loader reads
        state = torch.load(file, weights_only=True)
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
        assert file.stat().st_mode & 0o777 == 0o644

    reader, reference = CheckpointReader(path), CheckpointReader(tiny)
    assert (reader.format, reader.sharded) == ("bin", sharded)
    assert (reference.format, reference.sharded) == ("safetensors", False)
    assert reader.keys() == reference.keys()
    assert reader.shapes() == reference.shapes() and reader.dtype_codes() == reference.dtype_codes()
    assert reader.dtype() == torch.float32
    a, b = reader.load(reader.keys()), reference.load(reference.keys())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    if sharded:
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    assert (
        reader.load_prefix(SELECTOR_PREFIX, dtype=torch.bfloat16)["budget.mlp.0.bias"].dtype == torch.bfloat16
    )
    validate_checkpoint(load_config(path), reader)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_bin_files_are_mapped_weights_only_and_loaded_once_per_call(tmp_path, monkeypatch, sharded):
    path = write_tiny_checkpoint(tmp_path / "bin", seed=1, weight_format="bin", sharded=sharded)
    calls: list[tuple[str, dict]] = []
    real_load = torch.load

    def recording_load(file, *args, **kwargs):
        calls.append((os.path.basename(file), kwargs))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    reader = CheckpointReader(path)
    assert len(calls) == (0 if sharded else 1)  # an index needs no load; one file gives its keys
    calls.clear()
    selector = reader.load_prefix(SELECTOR_PREFIX)
    shards = sorted({p.name for p in path.glob("*.bin")})
    assert sorted(name for name, _ in calls) == shards  # each file once, not once per tensor
    assert all(kw == {"map_location": "cpu", "weights_only": True, "mmap": True} for _, kw in calls), calls
    QTSplusSelector.from_config(load_config(path)).load_state_dict(selector)
    calls.clear()
    reader.shapes()
    assert len(calls) == (len(shards) if sharded else 0)  # metadata: once per shard, then cached
    reader.dtype()
    reader.shapes(VISION_PREFIX)
    assert len(calls) == (len(shards) if sharded else 0)
    # what load returns is a copy, not a view of the memory-mapped file (nor shared with a tied tensor)
    name = SELECTOR_PREFIX + "budget.mlp.0.bias"
    first = reader.load([name])[name]
    first.zero_()
    assert not torch.equal(reader.load([name])[name], first)


def test_safetensors_are_preferred_over_bin(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "both", seed=1, weight_format="bin", sharded=True)
    other = write_tiny_checkpoint(tmp_path / "st", seed=2)
    shutil.copyfile(other / SINGLE_FILE, path / SINGLE_FILE)
    reader = CheckpointReader(path)
    assert reader.format == "safetensors" and not reader.sharded
    name = "model.norm.weight"
    torch.testing.assert_close(
        reader.load([name])[name], init_tensor(name, torch.Size([128]), seed=2), rtol=0, atol=0
    )


def test_legacy_torch_save_format_is_read(tiny, tmp_path):
    # torch.save before 1.6 wrote no zip archive: it cannot be memory-mapped, but is still read weights-only
    path = write_tiny_checkpoint(tmp_path / "legacy", seed=0, weight_format="bin")
    state = torch.load(path / BIN_FILE, weights_only=True)
    torch.save(state, path / BIN_FILE, _use_new_zipfile_serialization=False)
    reader = CheckpointReader(path)
    assert reader.keys() == CheckpointReader(tiny).keys()
    validate_checkpoint(load_config(path), reader)
    name = "model.norm.weight"
    torch.testing.assert_close(
        reader.load([name])[name], CheckpointReader(tiny).load([name])[name], rtol=0, atol=0
    )


@pytest.mark.parametrize("payload", ["code", "object"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_bin_holding_pickled_objects_is_refused_without_running_them(tmp_path, payload, sharded):
    path = write_tiny_checkpoint(tmp_path / "m", seed=0, weight_format="bin", sharded=sharded)
    marker = tmp_path / "code-ran"
    file = path / ("pytorch_model-00002-of-00003.bin" if sharded else BIN_FILE)
    state = torch.load(file, weights_only=True)
    state["model.qts_plus.selector.extra"] = RunsCode(marker) if payload == "code" else TrainingSettings()
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"pickled objects that are not tensors.*weights_only") as err:
        validate_checkpoint(load_config(path), CheckpointReader(path))  # reads every shard's metadata
    assert file.name in str(err.value)
    assert ("mkdir" if payload == "code" else "TrainingSettings") in str(err.value)
    assert not marker.exists()  # the payload never ran


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([torch.zeros(2)], "holds a list, not a state dict"),
        ({"state_dict": {"model.norm.weight": torch.zeros(2)}}, r"not a flat state dict.*state_dict"),
        ({"model.norm.weight": torch.zeros(2), "step": 3}, r"not a flat state dict.*step"),
    ],
    ids=["list", "nested", "number"],
)
def test_bin_that_is_not_a_flat_state_dict_is_refused(tmp_path, content, message):
    path = tmp_path / "m"
    path.mkdir()
    torch.save(content, path / BIN_FILE)
    with pytest.raises(CheckpointError, match=message):
        CheckpointReader(path)


def test_bin_index_errors_are_named(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m", sharded=True, weight_format="bin")
    index = json.loads((path / BIN_INDEX_FILE).read_text())
    name = next(k for k, f in index["weight_map"].items() if f.endswith("00001-of-00003.bin"))
    index["weight_map"][name] = "pytorch_model-00002-of-00003.bin"  # not where the tensor is
    (path / BIN_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        CheckpointReader(path).load([name])
    (path / "pytorch_model-00003-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00003-of-00003.bin"):
        CheckpointReader(path)
    for file in [*path.glob("*.bin"), path / BIN_INDEX_FILE]:
        file.unlink()
    with pytest.raises(CheckpointError, match=f"no weights in .*{BIN_FILE}"):
        CheckpointReader(path)


def test_rewriting_a_directory_switches_the_weight_format(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m", seed=1, sharded=True, weight_format="bin")
    write_tiny_checkpoint(path, seed=2)
    assert not list(path.glob("*.bin")) and not (path / BIN_INDEX_FILE).exists()
    assert CheckpointReader(path).format == "safetensors"
    write_tiny_checkpoint(path, seed=3, weight_format="bin")
    assert not list(path.glob("*.safetensors")) and not (path / INDEX_FILE).exists()
    assert sorted(p.name for p in path.glob("*.bin")) == [BIN_FILE]
    name = "model.norm.weight"
    torch.testing.assert_close(
        CheckpointReader(path).load([name])[name],
        init_tensor(name, torch.Size([128]), seed=3),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="weight_format"):
        write_tiny_checkpoint(tmp_path / "x", weight_format="pickle")


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_convert_reads_bin_checkpoints(tmp_path, sharded):
    # the converter reads through CheckpointReader: a .bin source converts to the same bytes as the
    # safetensors source with the same weights
    st = write_tiny_checkpoint(tmp_path / "st", seed=5, sharded=sharded)
    pt = write_tiny_checkpoint(tmp_path / "pt", seed=5, sharded=sharded, weight_format="bin")
    out_st, out_pt = (
        convert_to_qwen2_5_vl(st, tmp_path / "out-st"),
        convert_to_qwen2_5_vl(pt, tmp_path / "out-pt"),
    )
    names = sorted(p.name for p in out_st.iterdir())
    assert names == sorted(p.name for p in out_pt.iterdir())
    assert not [n for n in names if n.endswith(".bin") or n == BIN_INDEX_FILE]
    weights = [n for n in names if n.endswith(".safetensors")]
    assert weights == (
        [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] if sharded else [SINGLE_FILE]
    )
    assert (INDEX_FILE in names) == sharded
    for name in names:
        assert (out_st / name).read_bytes() == (out_pt / name).read_bytes(), name
    converted = CheckpointReader(out_pt)
    assert converted.format == "safetensors" and any(k.startswith("visual.") for k in converted.keys())


# ---------------------------------------------------------------- config


def test_config_round_trip_field_by_field(tiny):
    raw = json.loads((tiny / "config.json").read_text())
    config = load_config(tiny)
    assert "vision_config" not in raw  # like the released checkpoints
    assert raw["model_type"] == "qts_plus_qwen2_5_vl_causal_lm"
    assert raw["architectures"] == ["QTSplusQwen2_5_VLTextForCausalLM"]
    # transformers 5 normalises these four on load; everything else must come back unchanged
    assert config.dtype == torch.float32
    assert config.rope_parameters["mrope_section"] == raw["rope_scaling"]["mrope_section"]
    assert sum(raw["rope_scaling"]["mrope_section"]) == raw["hidden_size"] // raw["num_attention_heads"] // 2
    assert config.rope_parameters["rope_theta"] == raw["rope_theta"]
    assert config.sliding_window is None and raw["use_sliding_window"] is False
    for key, value in raw.items():
        if key not in ("dtype", "rope_scaling", "rope_theta", "sliding_window"):
            assert getattr(config, key) == value, key


def test_auto_config_needs_no_remote_code(tiny):
    assert "auto_map" in json.loads((tiny / "config.json").read_text())
    config = AutoConfig.from_pretrained(str(tiny))
    assert type(config) is QTSplusConfig
    assert config.qts_plus_nmax == 256 and config.qts_plus_rho_min == 0.05 and config.qts_plus_rho_max == 0.5


def test_vision_config_is_inferred_from_weights(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m", vision_depth=3, vision_hidden=240, vision_intermediate=72)
    vision = resolve_vision_config(load_config(path), CheckpointReader(path).shapes(VISION_PREFIX))
    assert (vision.depth, vision.hidden_size, vision.num_heads) == (3, 240, 3)
    assert (vision.out_hidden_size, vision.intermediate_size) == (128, 72)
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    assert list(vision.fullatt_block_indexes) == [] and vision.window_size == 112
    with pytest.raises(ValueError, match="vision_hidden=96"):
        write_tiny_checkpoint(tmp_path / "bad", vision_hidden=96)  # heads not inferable


def test_vision_config_dict_is_used_and_checked(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m", vision_config=True, vision_hidden=96, vision_heads=3)
    config, reader = load_config(path), CheckpointReader(path)
    assert isinstance(config.vision_config, dict)
    vision = resolve_vision_config(config, reader.shapes(VISION_PREFIX))
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (2, 96, 3, 96)
    validate_checkpoint(config, reader)

    edit_config(path, vision_config={**config.vision_config, "depth": 5})
    with pytest.raises(CheckpointError, match=r"vision_config\.depth=5.*blocks"):
        validate_checkpoint(load_config(path), reader)
    edit_config(path, vision_config={**config.vision_config, "intermediate_size": 80})
    with pytest.raises(CheckpointError, match=r"vision_config\.intermediate_size=80"):
        validate_checkpoint(load_config(path), reader)
    # without the dict, a head dim other than 80 cannot be inferred
    edit_config(path, vision_config=None)
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight.*96"):
        validate_checkpoint(load_config(path), reader)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_attention_heads": 5}, r"hidden_size=128 is not divisible by num_attention_heads=5"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads=3"),
        (
            {"qts_plus_rho_min": 0.6, "qts_plus_rho_max": 0.5},
            r"qts_plus_rho_min \(0\.6\).*qts_plus_rho_max \(0\.5\)",
        ),
        ({"qts_plus_nmax": 0}, r"qts_plus_nmax=0"),
        ({"vision_tower": "siglip"}, r"vision_tower='siglip'"),
    ],
)
def test_inconsistent_config_is_rejected(tmp_path, changes, message):
    path = write_tiny_checkpoint(tmp_path / "m")
    edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_config(path)


def test_generator_refuses_inconsistent_sizes_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"qts_plus_rho_min \(0\.6\)"):
        write_tiny_checkpoint(tmp_path / "rho", rho_min=0.6, rho_max=0.5)
    with pytest.raises(CheckpointError, match="num_attention_heads=6"):
        write_tiny_checkpoint(tmp_path / "heads", heads=6)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("model.qts_plus.selector.budget.mlp.2.weight", "missing tensors"),
        ("model.qts_plus.selector.reencode_layers.0.core.q_norm.weight", "missing tensors"),
        ("model.vision_tower.merger.mlp.2.weight", "missing vision tower tensors"),
        ("model.vision_tower.blocks.0.mlp.gate_proj.weight", "missing"),
    ],
)
def test_missing_tensor_is_named(tmp_path, key, message):
    path = write_tiny_checkpoint(tmp_path / "m")
    edit_weights(path, lambda w: w.pop(key))
    with pytest.raises(CheckpointError, match=message) as err:
        validate_checkpoint(load_config(path), CheckpointReader(path))
    assert key in str(err.value)


def test_selector_tensor_with_wrong_shape_is_named(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m")
    key = "model.qts_plus.selector.scoring_layers.0.k_proj.weight"
    edit_weights(path, lambda w: w.update({key: torch.zeros(48, 128)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{key}: checkpoint [48, 128] vs config [64, 128]")):
        validate_checkpoint(load_config(path), CheckpointReader(path))


def test_index_naming_a_missing_shard_is_rejected(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m", sharded=True)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        CheckpointReader(path)


# ---------------------------------------------------------------- tokenizer, template, processor


def test_added_tokens_are_single_ids(tiny, tokenizer):
    config = json.loads((tiny / "config.json").read_text())
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + NON_SPECIAL_ADDED]
    assert len(set(ids)) == 22 and max(ids) < config["vocab_size"] and len(tokenizer) <= config["vocab_size"]
    for token, token_id in zip(SPECIAL_TOKENS + NON_SPECIAL_ADDED, ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token
    video = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    text_ids = tokenizer("Look:<|vision_start|><|video_pad|><|vision_end|>what moves?")["input_ids"]
    assert text_ids.count(video) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["bos_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # as in Qwen2.5-VL: vision/chat tokens are special, tool-call tokens survive skip_special_tokens
    decoded = tokenizer.decode(tokenizer.encode("<|im_start|>hi<tool_call>"), skip_special_tokens=True)
    assert decoded == "hi<tool_call>"


@pytest.mark.parametrize(
    "text", ["hello world", "What is moving in the video?", "  spaces\tand\nlines ", "Ünïcödé 日本語 🎥 ok"]
)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) or len(text) < 4  # merges were learned


def test_chat_template_renders_like_qwen2_5_vl(tiny, tokenizer):
    assert (tiny / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    video_turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    assert tokenizer.apply_chat_template(video_turn, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What moves?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "video_url", "video_url": {"url": "x"}}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"video": "clip.mp4"}, {"type": "text", "text": "And now?"}]},
    ]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nVideo 2: <|vision_start|><|video_pad|><|vision_end|>And now?<|im_end|>\n"
    )


def test_processor_and_generation_config_load(tiny, tokenizer):
    processor = AutoProcessor.from_pretrained(str(tiny))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.chat_template == CHAT_TEMPLATE
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2
    generation = GenerationConfig.from_pretrained(str(tiny))
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert generation.eos_token_id == [tokenizer.eos_token_id, eot] and generation.pad_token_id == eot


# ---------------------------------------------------------------- numerics and CLI


def test_selector_is_healthy_on_random_inputs(tiny, tokenizer):
    """Scores vary across tokens and rho lands strictly inside (rho_min, rho_max)."""
    config, reader = load_config(tiny), CheckpointReader(tiny)
    selector = QTSplusSelector.from_config(config).eval()
    selector.load_state_dict(reader.load_prefix(SELECTOR_PREFIX))
    embed = reader.load(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    gen = torch.Generator().manual_seed(0)
    ns = set()
    for question in ("What is moving in the video?", "Which colour is the background?"):
        q = embed[tokenizer(question, add_special_tokens=False)["input_ids"]]
        for m in (40, 300):
            result = selector.select(torch.randn(m, config.hidden_size, generator=gen), q)
            assert config.qts_plus_rho_min < result.rho < config.qts_plus_rho_max
            assert result.scores.unique().numel() == m
            assert result.scores.std() > 0.05 * result.scores.mean()
            ns.add(result.n)
    assert len(ns) > 2


def test_greedy_generation_is_not_one_token_repeated(tiny, tokenizer):
    config, reader = load_config(tiny), CheckpointReader(tiny)
    with torch.device("meta"):
        lm = Qwen2_5_VLTextModel(config)
    weights = reader.load(
        [k for k in reader.keys() if k.startswith(("model.embed", "model.layers", "model.norm"))]
    )
    lm.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()}, strict=True, assign=True)
    lm.rotary_emb = type(lm.rotary_emb)(config=config)  # non-persistent buffer, built for real
    head = reader.load(["lm_head.weight"])["lm_head.weight"]
    chat = [{"role": "user", "content": "Describe the clip in one sentence."}]
    ids = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))[
        "input_ids"
    ]
    with torch.inference_mode():
        for _ in range(12):
            hidden = lm(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            ids.append(int(torch.argmax(hidden @ head.T)))
    assert len(set(ids[-12:])) >= 4, ids[-12:]


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--seed", "3", "--sharded", "--tied", "--dtype", "bfloat16", "--no-reencode"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config, reader = load_config(out), CheckpointReader(out)
    validate_checkpoint(config, reader)
    assert (out / INDEX_FILE).exists() and "lm_head.weight" not in reader
    assert reader.dtype() == torch.bfloat16 and config.tie_word_embeddings
    assert config.qts_plus_reencode is False and not reader.shapes(SELECTOR_PREFIX + "reencode_layers.")


def test_cli_writes_bin_weights(tmp_path, capsys):
    out = tmp_path / "cli-bin"
    assert main([str(out), "--weight-format", "bin", "--sharded"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    reader = CheckpointReader(out)
    assert (reader.format, reader.sharded) == ("bin", True) and (out / BIN_INDEX_FILE).exists()
    validate_checkpoint(load_config(out), reader)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--weight-format", "pickle"])


def test_cli_reports_bad_sizes_without_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "bad"), "--rho-min", "0.9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "qts_plus_rho_min (0.9)" in err and "Traceback" not in err
