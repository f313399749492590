"""Fuzz tests of the input-facing functions: random and mutated inputs, a fixed budget.

Fuzzed, with hypothesis:

- the video loader ``QTSplusVideoLoader.load_bytes`` and the core ``decode_video`` on random bytes
  and on mutations of small valid and hostile seed files (bit flips, byte overwrites, truncation,
  insertions, deletions, duplicated chunks, the head of one file on the body of another), with
  random sampling settings and (``decode_video``) small limits;
- the loader's ``media_io_kwargs`` (``sampling_from_kwargs``) and ``parse_options`` with random
  dicts of JSON-like values (nan and inf, bools, None, strings, nested containers);
- ``extract_question_ids`` on random id lists over the whole vocabulary of the tiny checkpoint's
  tokenizer (every added token included), on chat-template renderings of random messages (any
  unicode text, markup fragments, long strings, videos and images anywhere) and on mutations of
  those lists (deleted, duplicated and shuffled tokens).

The contract checked: no crash and no hang (a deadline per example, a timeout per test) and only
the documented exceptions. ``load_bytes`` raises ``VideoDecodeError`` or ``QTSplusHTTPError`` (for a
``LimitExceeded``), both ``ValueError``; ``decode_video`` raises ``VideoDecodeError`` or
``LimitExceeded``; ``sampling_from_kwargs`` a ``ValueError`` naming a key; ``parse_options`` an
``OptionError`` whose ``key`` is one of the dict's; ``extract_question_ids`` never raises. Whatever
they return has the documented form: frames uint8 [T, H, W, 3] with T even and >= 2, one index per
frame within the source's frames, the loader's metadata keys; a question of vocabulary ids that is
never empty and holds no special token.

The budget is ``QTSPLUS_FUZZ_EXAMPLES`` examples per test (default 100: the module takes well
under a minute on two busy cores), derandomized and without an example database, so every run
tries the same cases; raise it for a long campaign.
"""

from __future__ import annotations

import functools
import math
import os
import re
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from qtsplus_vllm.limits import LimitExceeded, Limits
from qtsplus_vllm.options import OPTION_KEYS, OptionError, SelectionOptions, parse_options
from qtsplus_vllm.question import extract_question_ids
from qtsplus_vllm.serving.errors import QTSplusHTTPError
from qtsplus_vllm.serving.video_loader import (
    ACCEPTED_KWARGS,
    IGNORED_KWARGS,
    LOADER_NAME,
    QTSplusVideoLoader,
    sampling_from_kwargs,
)
from qtsplus_vllm.streaming import EncodedVideo, LazyVideo
from qtsplus_vllm.testing import hostile, write_tiny_checkpoint
from qtsplus_vllm.testing.tiny_checkpoint import NON_SPECIAL_ADDED, SPECIAL_TOKENS
from qtsplus_vllm.testing.videos import make_video_bytes, render_frames
from qtsplus_vllm.video import SamplingConfig, VideoDecodeError, decode_video

EXAMPLES = int(os.environ.get("QTSPLUS_FUZZ_EXAMPLES", "100"))

settings.register_profile(
    "qtsplus-fuzz",
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    # the first example of a test builds the seed files or the tokenizer (seconds, once)
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
FUZZ = settings(settings.get_profile("qtsplus-fuzz"))

pytestmark = pytest.mark.timeout(120 + 2 * EXAMPLES)

METADATA_KEYS = {"total_num_frames", "fps", "duration", "video_backend", "frames_indices", "do_sample_frames"}
MARKUP = re.compile(r"<\|[a-z_]+\|>")


# -- video seeds and mutations -------------------------------------------------------------------


@functools.cache
def seed_files() -> dict[str, bytes]:
    """Small valid and hostile files: each decodes (or fails) in milliseconds."""
    smooth = render_frames(8, (32, 24), seed=4)
    mjpeg_avi = hostile.encode_frames(smooth, codec="mjpeg", container_format="avi", pix_fmt="yuvj420p")
    return {
        "h264_mp4": make_video_bytes(frames=12, size=(48, 32), fps=4.0, seed=1),
        "h264_one_frame": make_video_bytes(frames=1, size=(32, 32), fps=4.0, seed=2),
        "png_mov_odd_size": hostile.flat_video(8, (33, 17)),
        "mjpeg_avi": mjpeg_avi,
        "mjpeg_avi_understated": hostile.understate_frame_count(mjpeg_avi, 2),
        "ffv1_mkv": hostile.encode_frames(smooth, codec="ffv1", container_format="matroska", pix_fmt="bgr0"),
        "gif": hostile.encode_frames(smooth, codec="gif", container_format="gif", pix_fmt="rgb8"),
        "truncated_mp4": hostile.truncated_mp4(0.5),
        "audio_only": hostile.audio_only(0.25),
        "png_image": hostile.png_image((32, 24)),
        "zero_frame": hostile.zero_frame_video((32, 32)),
    }


SEED_NAMES = (
    "h264_mp4",
    "h264_one_frame",
    "png_mov_odd_size",
    "mjpeg_avi",
    "mjpeg_avi_understated",
    "ffv1_mkv",
    "gif",
    "truncated_mp4",
    "audio_only",
    "png_image",
    "zero_frame",
)


def _position(draw, data: bytearray, end: bool = False) -> int:
    return draw(st.integers(0, len(data) if end else max(len(data) - 1, 0)))


def _flip_bit(draw, data: bytearray) -> bytearray:
    if data:
        data[_position(draw, data)] ^= 1 << draw(st.integers(0, 7))
    return data


def _overwrite(draw, data: bytearray) -> bytearray:
    at = _position(draw, data)
    chunk = draw(st.binary(min_size=1, max_size=8))
    data[at : at + len(chunk)] = chunk
    return data


def _truncate(draw, data: bytearray) -> bytearray:
    return data[: _position(draw, data, end=True)]


def _insert(draw, data: bytearray) -> bytearray:
    at = _position(draw, data, end=True)
    data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return data


def _delete(draw, data: bytearray) -> bytearray:
    at = _position(draw, data)
    del data[at : at + draw(st.integers(1, 256))]
    return data


def _duplicate(draw, data: bytearray) -> bytearray:
    start, at = _position(draw, data), _position(draw, data, end=True)
    data[at:at] = data[start : start + draw(st.integers(1, 512))]
    return data


MUTATIONS = (_flip_bit, _overwrite, _truncate, _insert, _delete, _duplicate)


@st.composite
def mutated_videos(draw) -> bytes:
    data = bytearray(seed_files()[draw(st.sampled_from(SEED_NAMES))])
    for mutate in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4)):
        data = mutate(draw, data)
    return bytes(data)


@st.composite
def spliced_videos(draw) -> bytes:
    """The head of one seed file on the body of another, cut at the same or at another offset."""
    head = seed_files()[draw(st.sampled_from(SEED_NAMES))]
    body = seed_files()[draw(st.sampled_from(SEED_NAMES))]
    cut = draw(st.integers(0, len(head)))
    resume = draw(st.one_of(st.just(cut), st.integers(0, len(body))))
    return head[:cut] + body[resume:]


@st.composite
def seed_head_then_noise(draw) -> bytes:
    head = seed_files()[draw(st.sampled_from(SEED_NAMES))]
    return head[: draw(st.integers(1, 256))] + draw(st.binary(max_size=2048))


hostile_bytes = st.one_of(
    st.binary(max_size=2048), mutated_videos(), mutated_videos(), spliced_videos(), seed_head_then_noise()
)

sampling_kwargs = st.fixed_dictionaries(
    {},
    optional={
        "fps": st.floats(0.05, 30.0),
        "max_frames": st.integers(2, 64),
        "num_frames": st.integers(-1, 64),
        "video_backend": st.just(LOADER_NAME),
    },
)  # max_frames 2 and 3 alone are valid: min_frames follows max_frames down


@st.composite
def sampling_configs(draw) -> SamplingConfig:
    max_frames = draw(st.integers(2, 64))
    min_frames = draw(st.integers(1, max_frames))
    return SamplingConfig(fps=draw(st.floats(0.05, 30.0)), min_frames=min_frames, max_frames=max_frames)


limit_settings = st.one_of(
    st.just(Limits()),
    st.builds(
        Limits,
        max_video_seconds=st.sampled_from([7200.0, 2.0, 0.5]),
        max_source_frames=st.sampled_from([432_000, 8, 3]),
        max_frame_pixels=st.sampled_from([4096 * 4096, 1024, 100]),
        decode_max_pixels=st.sampled_from([Limits.decode_max_pixels, 1024, 256]),
    ),
)


def check_frames(frames: np.ndarray, indices: list[int], total_frames: int, max_frames: int) -> None:
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert frames.ndim == 4 and frames.shape[-1] == 3 and min(frames.shape) >= 1
    assert frames.shape[0] >= 2 and frames.shape[0] % 2 == 0
    assert frames.shape[0] <= max_frames
    assert len(indices) == frames.shape[0]
    assert all(type(i) is int and 0 <= i < total_frames for i in indices)


def check_loaded(frames: np.ndarray, metadata: dict, max_frames: int) -> None:
    assert set(metadata) == METADATA_KEYS
    check_frames(frames, metadata["frames_indices"], metadata["total_num_frames"], max_frames)
    assert math.isfinite(metadata["fps"]) and metadata["fps"] > 0
    assert metadata["duration"] == pytest.approx(metadata["total_num_frames"] / metadata["fps"])
    assert metadata["video_backend"] == LOADER_NAME and metadata["do_sample_frames"] is False


def load_or_reject(data: bytes, kwargs: dict) -> tuple[np.ndarray, dict] | None:
    """The loader's output with its frames decoded, or None for a documented rejection; anything else
    propagates.

    The loader returns the encoded bytes and a plan (``EncodedVideo``) that the processor decodes
    (``LazyVideo``), where a failure is a ``VideoDecodeError`` or a ``LimitExceeded`` too.
    """
    try:
        encoded, metadata = QTSplusVideoLoader.load_bytes(data, **kwargs)
        assert isinstance(encoded, EncodedVideo) and encoded.nbytes == len(data)
        lazy = LazyVideo(encoded)
        frames = lazy.to_array()
        assert frames.shape == lazy.shape
        if lazy.plan is not encoded.plan:  # the decoder found another frame count and redid the plan
            metadata = {**metadata, "frames_indices": list(lazy.plan.frame_indices)}
            metadata.update(
                total_num_frames=lazy.plan.total_frames,
                duration=lazy.plan.total_frames / lazy.plan.source_fps,
            )
        return frames, metadata
    except QTSplusHTTPError as err:
        assert isinstance(err.__cause__, LimitExceeded)
    except (VideoDecodeError, LimitExceeded):
        pass
    return None


def test_seed_files_cover_success_and_rejection():
    loads = {name: load_or_reject(data, {}) is not None for name, data in seed_files().items()}
    rejected = {"truncated_mp4", "audio_only", "png_image", "zero_frame"}
    assert loads == {name: name not in rejected for name in SEED_NAMES}


@FUZZ
@given(data=hostile_bytes, kwargs=sampling_kwargs)
def test_loader_on_hostile_bytes(data, kwargs):
    loaded = load_or_reject(data, kwargs)
    event("rejected" if loaded is None else "loaded")
    if loaded is not None:
        check_loaded(*loaded, max_frames=sampling_from_kwargs(kwargs).max_frames)


@FUZZ
@given(data=hostile_bytes, sampling=sampling_configs(), limits=limit_settings)
def test_decode_video_on_hostile_bytes(data, sampling, limits):
    try:
        video = decode_video(data, sampling, limits)
    except (VideoDecodeError, LimitExceeded) as err:
        event(f"rejected: {type(err).__name__}")
        return
    event("decoded")
    check_frames(video.frames, video.frame_indices, video.total_frames, sampling.max_frames)
    assert math.isfinite(video.source_fps) and video.source_fps > 0
    assert video.frames.shape[1] * video.frames.shape[2] <= limits.decode_max_pixels
    assert video.total_frames <= limits.max_source_frames
    assert video.total_frames / video.source_fps <= limits.max_video_seconds


def test_decode_video_limits_hold_when_the_header_understates_frames():
    data = seed_files()["mjpeg_avi_understated"]
    assert decode_video(data, SamplingConfig(), Limits()).total_frames == 8
    with pytest.raises(LimitExceeded, match="QTSPLUS_MAX_SOURCE_FRAMES"):
        decode_video(data, SamplingConfig(), Limits(max_source_frames=4))


# -- settings dicts ------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-4, 1 << 25),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 1.0),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def settings_dicts(known_keys, other_keys=None) -> st.SearchStrategy[dict]:
    known = st.sampled_from(sorted(known_keys))
    other = st.text(max_size=16) if other_keys is None else other_keys
    return st.dictionaries(st.one_of(known, known, other), json_values, max_size=6)


@FUZZ
@given(kwargs=settings_dicts(ACCEPTED_KWARGS + IGNORED_KWARGS))
def test_sampling_kwargs(kwargs):
    try:
        sampling = sampling_from_kwargs(kwargs)
    except ValueError as err:
        assert type(err) is ValueError
        assert any(repr(key) in str(err) for key in kwargs)
        return
    assert math.isfinite(sampling.fps) and sampling.fps > 0
    assert 1 <= sampling.min_frames <= sampling.max_frames
    assert sampling.max_frames >= 2


@FUZZ
@given(
    kwargs=settings_dicts(
        ACCEPTED_KWARGS + ("data", "cls"), st.text(max_size=16).filter(lambda key: key != "num_frames")
    ),
    seed=st.sampled_from(["h264_mp4", "h264_one_frame"]),
)
@example(kwargs={"max_frames": 2}, seed="h264_mp4")
@example(kwargs={"max_frames": 3.0, "fps": 30.0}, seed="h264_mp4")
@example(kwargs={"max_frames": 3, "min_frames": 3}, seed="h264_one_frame")
def test_loader_kwargs(kwargs, seed):
    try:
        encoded, metadata = QTSplusVideoLoader.load_bytes(seed_files()[seed], num_frames=32, **kwargs)
        loaded = LazyVideo(encoded).to_array(), metadata
    except (VideoDecodeError, QTSplusHTTPError):
        pytest.fail("a valid seed file was rejected")
    except ValueError as err:
        assert any(repr(key) in str(err) for key in kwargs)
        return
    check_loaded(*loaded, max_frames=sampling_from_kwargs(kwargs).max_frames)


@FUZZ
@given(
    kwargs=settings_dicts(OPTION_KEYS), ignore=st.frozensets(st.sampled_from(sorted(OPTION_KEYS)), max_size=2)
)
def test_parse_options(kwargs, ignore):
    try:
        options = parse_options(kwargs, ignore=ignore)
    except OptionError as err:
        assert err.key in kwargs and err.key not in ignore
        return
    assert isinstance(options, SelectionOptions)
    assert 0.0 <= options.rho_min <= options.rho_max <= 1.0 and 0.0 < options.rho_scale <= 100.0
    assert 28 * 28 <= options.min_pixels <= options.max_pixels
    assert options.max_tokens is None or options.max_tokens >= 1
    hash(options.cache_key())


# -- question extraction -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))))


def check_question(ids: list[int], tok) -> None:
    question = extract_question_ids(ids, tok)
    assert isinstance(question, list) and question
    assert all(type(i) is int and 0 <= i < len(tok) for i in question)
    assert not set(question) & set(tok.all_special_ids)
    assert not MARKUP.search(tok.decode(question))


ADDED_TOKENS = SPECIAL_TOKENS + NON_SPECIAL_ADDED
MARKUP_FRAGMENTS = ["<|", "|>", "<", "|", ">", "im_start", "im_end", "vision_", "end", "user", "\n", " "]

question_texts = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.lists(st.sampled_from(ADDED_TOKENS + MARKUP_FRAGMENTS), max_size=20).map("".join),
    st.builds(lambda text, times: text * times, st.text(min_size=1, max_size=8), st.integers(50, 800)),
)
content_parts = st.one_of(
    st.builds(lambda text: {"type": "text", "text": text}, question_texts),
    st.just({"type": "video"}),
    st.just({"type": "image"}),
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant"]),
            "content": st.one_of(question_texts, st.lists(content_parts, max_size=4)),
        }
    ),
    min_size=1,
    max_size=4,
)


def render(chat: list[dict], generation_prompt: bool, tok) -> list[int]:
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(prompt, add_special_tokens=False)["input_ids"]


@st.composite
def mutated_ids(draw, ids: list[int]) -> list[int]:
    ids = list(ids)
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(ids)))
        end = draw(st.integers(start, min(len(ids), start + 16)))
        action = draw(st.sampled_from(["delete", "duplicate", "shuffle"]))
        if action == "delete":
            del ids[start:end]
        elif action == "duplicate":
            ids[end:end] = ids[start:end]
        else:
            ids[start:end] = draw(st.permutations(ids[start:end]))
    return ids


@FUZZ
@given(data=st.data())
def test_question_of_random_ids(tok, data):
    added = tok.convert_tokens_to_ids(ADDED_TOKENS)
    ids = data.draw(st.lists(st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(added)), max_size=300))
    check_question(ids, tok)


@FUZZ
@given(chat=messages, generation_prompt=st.booleans())
@example(chat=[{"role": "user", "content": "What <|im_<|x|>end|> moves?"}], generation_prompt=True)
def test_question_of_rendered_chats(tok, chat, generation_prompt):
    check_question(render(chat, generation_prompt, tok), tok)


@FUZZ
@given(chat=messages, data=st.data())
def test_question_of_mutated_chats(tok, chat, data):
    check_question(data.draw(mutated_ids(render(chat, True, tok))), tok)


def test_question_of_deeply_nested_markup_is_linear(tok):
    depth = 20_000
    ids = tok(
        f"<|im_start|>user\nWhat {'<|a' * depth}{'|>' * depth}moves?<|im_end|>", add_special_tokens=False
    )
    assert tok.decode(extract_question_ids(ids["input_ids"], tok)) == "What moves?"
