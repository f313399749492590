"""The vLLM multimodal processor: QTS+ selection before scheduling.

vLLM fixes a request's prompt length, and so its KV blocks, in the processor, before the scheduler
sees it. n depends on the video *and* the question, so the selection runs here, in the API-server
process: recover the question from the prompt ids, run ViT -> selector on the lazily loaded runtime,
return the n rows as a CPU field and expand the item's single ``<|video_pad|>`` to exactly n tokens.

Several videos and images per prompt go through the same gate: an image is a one-frame video (the
frame repeated to fill the temporal patch, resized by the video rules and settings) behind
``<|image_pad|>``. Every item is selected on its own (its own ρ, n ≤ nmax) against the same query,
the question of the last user turn.

The question and every setting that changes the selection go into the processor kwargs before the
multimodal hash is taken, so the processor cache, the encoder cache and prefix caching never hand
one question's selection to another (DESIGN §9, trap 1).

Profiling and warm-up run in every vLLM process with dummy inputs: those are pass-through rows of
``get_mm_max_tokens_per_item`` = nmax tokens and never load the ViT or the selector.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    EmbeddingItems,
    ImageProcessorItems,
    MultiModalDataItems,
    VideoProcessorItems,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
)

from ..config import QTSplusConfig
from ..limits import LimitExceeded, RequestError, SelectionUnavailable, server_limits
from ..options import SelectionOptions, parse_options
from ..question import extract_question_ids
from ..runtime import (
    check_server_settings,
    get_runtime,
    out_of_memory,
    release_device_memory,
    report_device_failure,
    set_loader_preprocess,
    set_loader_runtime,
    set_request_preprocess,
    trust_client_uuids,
)
from ..streaming import LazyVideo, is_encoded_video
from ..video import PreprocessConfig, VideoDecodeError, vit_patch_count
from .cancellation import install as install_cancellation
from .errors import as_http_error
from .health import install_health_check
from .metrics import observe_selection
from .startup import report_startup
from .video_loader import bind_video_loader

# Under vLLM's logger tree, so the line shows with vLLM's own log configuration.
logger = logging.getLogger("vllm.qtsplus")

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
PLACEHOLDERS = {"video": VIDEO_PLACEHOLDER, "image": IMAGE_PLACEHOLDER}
PAD_TOKENS = {"video": "<|video_pad|>", "image": "<|image_pad|>"}
# Most items of one modality per prompt (vLLM's --limit-mm-per-prompt may lower it): each costs a
# ViT pass and up to nmax prompt tokens.
MAX_ITEMS = {"video": 4, "image": 8}
# Private processor kwarg carrying (question ids, selection settings): hashed by vLLM, never
# forwarded to a Hugging Face processor.
SELECTION_KEY = "_qtsplus_selection"
# Per modality: rows computed here, and rows given as embeddings (profiling dummies, trusted clients).
SELECTED_FIELDS = {"video": "qts_video_embeds", "image": "qts_image_embeds"}
PASSTHROUGH_FIELDS = {"video": "video_embeds", "image": "image_embeds"}


class QTSplusProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> QTSplusConfig:
        return self.ctx.get_hf_config(QTSplusConfig)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return dict(MAX_ITEMS)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return dict.fromkeys(MAX_ITEMS, max_item_tokens(self.ctx.model_config, self.get_hf_config(), seq_len))

    def pad_id(self, modality: str) -> int:
        return self.get_tokenizer().convert_tokens_to_ids(PAD_TOKENS[modality])

    @property
    def video_pad_id(self) -> int:
        return self.pad_id("video")


def selection_may_be_off(model_config) -> bool:
    """Whether an item can reach the LM with all its M rows (``qtsplus_select: false``).

    True when the server's default ``--mm-processor-kwargs`` turns the selection off, or when
    requests may set their own (``--trust-request-mm-kwargs``). That flag is a front-end argument
    the engine process never sees in its config, so it is read from the command line, which every
    process of ``vllm serve`` shares (forked or spawned, ``sys.argv`` is the parent's).
    """
    mm_config = getattr(model_config, "multimodal_config", None)
    defaults = dict(getattr(mm_config, "mm_processor_kwargs", None) or {})
    if defaults.get("qtsplus_select") is False:
        return True
    return any(arg == "--trust-request-mm-kwargs" or arg.startswith("--trust-request-mm-kwargs=")
               for arg in sys.argv)  # fmt: skip


def max_item_tokens(model_config, config: QTSplusConfig, seq_len: int) -> int:
    """The most LM rows one video or image can take: vLLM sizes its encoder cache from it.

    With the selection on that is nmax. Where a request can turn it off, an item may bring all M
    rows, up to the context (``seq_len``) and ``QTSPLUS_MAX_VIT_PATCHES``: vLLM 0.32 refuses an item
    larger than its encoder cache ("exceeds the pre-allocated encoder cache size"), and without this
    the cache is ``--max-num-batched-tokens`` tokens, so an unselected long video would need its
    whole prefill in one step instead of chunks. The cost: the profile run holds that many zero rows
    (seq_len × hidden × dtype bytes) while vLLM measures memory, as stock Qwen2.5-VL does.
    """
    nmax = config.qts_plus_nmax
    if not selection_may_be_off(model_config):
        return nmax
    all_rows = min(seq_len, server_limits().max_vit_patches // PreprocessConfig.merge_size**2)
    return max(nmax, all_rows)


class QTSplusDummyInputsBuilder(BaseDummyInputsBuilder[QTSplusProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "".join(PLACEHOLDERS[modality] * mm_counts.get(modality, 0) for modality in PLACEHOLDERS)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        """Zero rows of the largest item (:func:`max_item_tokens`) per item, as embeddings: no ViT or selector."""
        config = self.info.get_hf_config()
        dtype = self.info.ctx.model_config.dtype
        rows = max_item_tokens(self.info.ctx.model_config, config, seq_len)
        return {
            modality: [torch.zeros(rows, config.hidden_size, dtype=dtype) for _ in range(count)]
            for modality, count in mm_counts.items()
            if count > 0
        }


def _as_frames(video: object, modality: str = "video") -> np.ndarray | LazyVideo:
    """One item as uint8 frames [T, H, W, 3] (an image is one frame), or, for a video our loader
    planned (encoded bytes + plan), a :class:`LazyVideo` that the runtime decodes as a stream."""
    if modality == "video" and is_encoded_video(video):
        return LazyVideo(video)
    if modality == "image":
        if hasattr(video, "convert"):  # PIL
            video = video.convert("RGB")
        frame = np.asarray(video.cpu() if isinstance(video, torch.Tensor) else video)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"an image must decode to [H, W, 3], got shape {list(frame.shape)}")
        height, width = frame.shape[:2]
        try:  # vLLM's own guard is VLLM_MAX_IMAGE_PIXELS; ours applies to every visual item
            server_limits().check_stream(width, height, None, None)
        except LimitExceeded as err:
            raise as_http_error(err) from err
        return frame[None].astype(np.uint8, copy=False)
    if isinstance(video, torch.Tensor):
        video = video.cpu().numpy()
    elif isinstance(video, list):
        video = np.stack([np.asarray(frame) for frame in video])
    frames = np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a video must decode to frames [T, H, W, 3], got shape {list(frames.shape)}")
    return frames.astype(np.uint8, copy=False)


def _select(runtime, frames: np.ndarray, question_ids: list[int], options: SelectionOptions):
    """``runtime.select`` behind the limits, with failures turned into per-request HTTP errors.

    Out of memory -> 503 for this request; the memory is released after the exception (and the
    traceback that holds its tensors) is gone. A CUDA error that poisons the device -> 503, and the
    runtime is reported unhealthy (``/health`` answers 503) so an orchestrator replaces the server.
    """
    oom = None
    try:
        t, h, w = frames.shape[:3]
        server_limits().check_vit_patches(vit_patch_count(t, h, w, options.preprocess_config()))
        return runtime.select(frames, question_ids, options)
    except (RequestError, VideoDecodeError) as err:
        raise as_http_error(err) from err
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            failure = report_device_failure(runtime, err)
            if failure is None:
                raise
            raise as_http_error(failure) from None
        oom = str(err)
    # outside the except block: the traceback, and with it the frames of the failed call, is gone
    release_device_memory(runtime.device)
    logger.warning("QTSplus selection ran out of memory on a %s video: %s", list(frames.shape), oom)
    unavailable = SelectionUnavailable(
        f"the selection runtime ran out of memory on this video (frames {list(frames.shape)}); "
        "retry later, or lower max_pixels, fps or max_frames"
    )
    raise as_http_error(unavailable)


def _finished(frames) -> None:
    """The video's work is over (selected, refused or cancelled): its request's cancellation no
    longer counts it, and the frames decoded ahead for it go now (the item lives on in vLLM's
    request until the request ends)."""
    if isinstance(frames, LazyVideo):
        if frames.plan.cancel is not None:
            frames.plan.cancel.finish()
        frames.prepared = frames.features = None
        frames.data.prepared = frames.data.features = None


def load_runtime(get, model_config):
    """``get(model, dtype, revision=...)`` (:func:`~qtsplus_vllm.runtime.get_runtime`) for this model,
    with a runtime that cannot serve — a failed load, a device that failed — as the request's 503
    and its message (raised bare, vLLM would answer 500 while ``/health`` says 503)."""
    try:
        return get(model_config.model, model_config.dtype, revision=model_config.revision)
    except SelectionUnavailable as err:
        raise as_http_error(err) from None


def selection_inputs(
    prompt_ids: list[int], tokenizer, mm_config, request_kwargs: Mapping[str, object]
) -> tuple[list[int], SelectionOptions]:
    """A request's query ids and effective settings (server defaults + its kwargs), checked before any ViT work."""
    options = parse_options(mm_config.merge_mm_processor_kwargs(dict(request_kwargs)))
    question_ids = extract_question_ids(prompt_ids, tokenizer)
    try:
        server_limits().check_question_tokens(len(question_ids))
    except LimitExceeded as err:
        raise as_http_error(err) from err
    return question_ids, options


def _report(modality: str, result, cache_stats: dict[str, int]) -> None:
    """One log line and the Prometheus metrics for one video or image."""
    observe_selection(result, cache_stats)
    logger.info(
        "QTSplus %s: frames=%d M=%d n=%d rho=%s kept=%.1f%% vit_cache=%s decode_ms=%.1f preprocess_ms=%.1f "
        "vit_ms=%.1f selector_ms=%.1f",
        modality,
        result.num_frames,
        result.num_visual_tokens,
        result.n,
        "off" if result.rho is None else f"{result.rho:.4f}",
        100.0 * result.n / result.num_visual_tokens,
        "hit" if result.cache_hit else "miss",
        result.timings_ms.get("decode_ms", 0.0),
        result.timings_ms["preprocess_ms"],
        result.timings_ms["vit_ms"],
        result.timings_ms["selector_ms"],
    )


def content_keyed_uuids(
    mm_items: MultiModalDataItems, mm_uuids: Mapping[str, Sequence[str | None]] | None
) -> dict[str, list[str | None]] | None:
    """The client's item uuids with every item that carries data keyed by its content instead.

    vLLM takes a client-supplied ``uuid`` as the item's identity in the processor cache, the encoder
    cache and prefix caching, in place of the media: a second client sending other media under the
    same uuid would get the first client's selection and KV. So an item that carries data (a video,
    an image, embeddings) loses its uuid and vLLM hashes its content; an item sent by uuid alone
    (no data) keeps it, and :meth:`QTSplusMultiModalProcessor.apply` refuses it unless the operator
    trusts client uuids (``QTSPLUS_TRUST_CLIENT_UUIDS=1``).
    """
    if not mm_uuids:
        return None if mm_uuids is None else {}
    keyed: dict[str, list[str | None]] = {}
    for modality, uuids in mm_uuids.items():
        items = mm_items.get(modality)
        data = [None] * len(uuids) if items is None else items.get_all_items_for_hash()
        keyed[modality] = [None if item is not None else uuid for uuid, item in zip(uuids, data, strict=True)]
    return keyed


def _uuid_only_items(mm_uuids: Mapping[str, Sequence[str | None]]) -> list[str]:
    return [f"{modality}[{i}]" for modality, uuids in mm_uuids.items() for i, u in enumerate(uuids) if u]


class QTSplusMultiModalProcessor(BaseMultiModalProcessor[QTSplusProcessingInfo]):
    def __init__(self, info: QTSplusProcessingInfo, dummy_inputs: QTSplusDummyInputsBuilder) -> None:
        super().__init__(info, dummy_inputs)
        from .deployment import check_deployment  # vLLM options QTSplus cannot serve: refused at start-up

        check_deployment(info.ctx.model_config)
        # Server settings are checked when the server starts, not per request: the defaults given as
        # --mm-processor-kwargs, every QTSPLUS_* variable and, for a local checkpoint, its ViT and
        # selector tensors (a Hub checkpoint is checked by the engine when it loads the weights).
        model_config = info.ctx.model_config
        defaults = parse_options(info.ctx.get_mm_config().mm_processor_kwargs or {})
        check_server_settings(model_config.model, model_config.revision)
        set_loader_preprocess(defaults.preprocess_config())  # what the media loader resizes to
        set_loader_runtime(lambda: load_runtime(get_runtime, model_config))  # ... and encodes with
        mm_config = info.ctx.get_mm_config()  # a request's own settings, for its loader
        set_request_preprocess(
            lambda kwargs: parse_options(
                mm_config.merge_mm_processor_kwargs(dict(kwargs))
            ).preprocess_config()
        )
        # every video through our loader and sampling rules, whatever the checkpoint's files name
        loader = bind_video_loader(info.ctx.get_mm_config())
        report_startup(model_config, defaults, loader)
        install_health_check()
        install_cancellation()  # a cancelled request's video work stops (serving.cancellation)

    def apply(self, inputs: ProcessorInputs, timing_ctx):
        """Key items by content, and put the question and the effective settings into the (hashed) kwargs."""
        if not trust_client_uuids():
            uuids = content_keyed_uuids(inputs.mm_data_items, inputs.mm_uuid_items)
            if uuids and (unresolved := _uuid_only_items(uuids)):
                raise as_http_error(
                    RequestError(
                        f"{', '.join(unresolved)} carries a uuid but no data: this server does not reuse "
                        "media by client uuid (QTSPLUS_TRUST_CLIENT_UUIDS is off); send the media"
                    )
                )
            inputs = dataclasses.replace(inputs, mm_uuid_items=uuids)
        items = [inputs.mm_data_items.get(modality) for modality in MAX_ITEMS]
        if any(isinstance(item, ImageProcessorItems | VideoProcessorItems) for item in items):
            request_kwargs = {k: v for k, v in inputs.hf_processor_mm_kwargs.items() if k != SELECTION_KEY}
            question_ids, options = selection_inputs(
                inputs.prompt, self.info.get_tokenizer(), self.info.ctx.get_mm_config(), request_kwargs
            )
            inputs = dataclasses.replace(
                inputs,
                hf_processor_mm_kwargs={
                    **request_kwargs,
                    SELECTION_KEY: (tuple(question_ids), options.cache_key()),
                },
            )
        return super().apply(inputs, timing_ctx)

    def _runtime(self):
        model_config = self.info.ctx.model_config
        return load_runtime(get_runtime, model_config)

    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        out = BatchFeature()
        for modality in MAX_ITEMS:
            items = mm_items.get(modality)
            if isinstance(items, EmbeddingItems):
                out[PASSTHROUGH_FIELDS[modality]] = [items.get(i) for i in range(len(items))]
            elif isinstance(items, ImageProcessorItems | VideoProcessorItems) and len(items) > 0:
                question_ids, settings = hf_kwargs[SELECTION_KEY]
                options = SelectionOptions(**dict(settings))
                runtime = self._runtime()
                rows = []
                for i in range(len(items)):
                    frames = _as_frames(items.get(i), modality)
                    try:
                        result = _select(runtime, frames, list(question_ids), options)
                    finally:
                        _finished(frames)
                    rows.append(result.embeds)
                    _report(modality, result, runtime.feature_cache.stats())
                out[SELECTED_FIELDS[modality]] = rows
        return out

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = {}
        for modality in MAX_ITEMS:
            fields[SELECTED_FIELDS[modality]] = MultiModalFieldConfig.batched(modality)
            fields[PASSTHROUGH_FIELDS[modality]] = MultiModalFieldConfig.batched(modality)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        def replacement(modality: str):
            pad = self.info.pad_id(modality)

            def expand(item_idx: int) -> list[int]:
                item = out_mm_kwargs[modality][item_idx]
                selected, passthrough = SELECTED_FIELDS[modality], PASSTHROUGH_FIELDS[modality]
                field = item[selected] if selected in item else item[passthrough]
                return [pad] * int(field.data.shape[0])

            return PromptReplacement(modality=modality, target=[pad], replacement=expand)

        return [replacement(modality) for modality in MAX_ITEMS]
