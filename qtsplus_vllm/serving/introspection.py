"""``POST /v1/qtsplus/selection``: which visual tokens QTS+ keeps for a (video, question), and where.

A vLLM endpoint plugin (entry point ``vllm.endpoint_plugins`` -> ``qtsplus``). vLLM loads endpoint
plugins only when ``VLLM_PLUGINS`` names them, and that variable is an allowlist for every plugin
group, so ``VLLM_PLUGINS=qtsplus`` enables this endpoint and the general plugin together.

A request carries what a chat request carries (``messages``, or the shorthand ``video`` +
``question``; ``mm_processor_kwargs``, ``media_io_kwargs``) and takes the chat path up to the
multimodal processor: vLLM's renderer fetches the video with the server's media connector (our
limits apply), renders the chat template and tokenizes; the query rule picks the question from the
prompt ids; the selection runs on the process-global runtime the processor uses (so it shares its
ViT-feature cache) behind the processor's limits. So M, n and the kept tokens are those a chat
request with the same inputs gets, and a bad input gets the chat endpoint's status and message
(raised here, answered by vLLM's exception handlers in its error shape).

A client that disconnects cancels the request (vLLM's ``with_cancellation``) and with it the
video's decoding and ViT, as for a chat request (``serving.cancellation``).

Token geometry: M = t · gh · gw tokens after the 2×2 merger, time-major then row then column;
temporal step k (one ViT temporal patch) covers sampled frames 2k and 2k+1.

``GET /qtsplus`` serves a self-contained page that plots the answer (``static/selection.html``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from argparse import Namespace
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from pydantic import BaseModel, model_validator

from ..runtime import VideoSelection, get_runtime
from .cancellation import request_scope
from .compat import build_chat_params
from .processor import _as_frames, _report, _select, load_runtime, selection_inputs

ROUTE = "/v1/qtsplus/selection"
PAGE_ROUTE = "/qtsplus"
THUMBNAIL_WIDTH = 192  # pixels; thumbnails only for steps with kept tokens


class SelectionRequest(BaseModel):
    """A chat request's inputs: ``messages`` as for ``/v1/chat/completions``, or ``video`` + ``question``."""

    model: str | None = None
    messages: list[dict[str, Any]] | None = None
    video: str | None = None  # a video_url: http(s)://, file://, data:
    question: str | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    video_index: int = 0  # which video of the request to inspect
    include_frames: bool = False  # add JPEG thumbnails of the steps with kept tokens

    @model_validator(mode="after")
    def _one_input(self) -> SelectionRequest:
        if (self.messages is None) == (self.video is None):
            raise ValueError("give either `messages` or `video` (with an optional `question`), not both")
        if self.question is not None and self.video is None:
            raise ValueError("`question` goes with `video`; with `messages` the question is in the messages")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return self.messages
        content: list[dict[str, Any]] = [{"type": "video_url", "video_url": {"url": self.video}}]
        if self.question:
            content.append({"type": "text", "text": self.question})
        return [{"role": "user", "content": content}]


class Grid(BaseModel):
    t: int  # temporal steps
    h: int  # token rows per step
    w: int  # token columns per step


class StepSummary(BaseModel):
    """One temporal step (two sampled frames): its time and how relevant its tokens are."""

    step: int
    index: int  # source frame index of the step's first sampled frame
    source_indices: list[int]  # source frame indices of both sampled frames
    timestamp_s: float
    relevance_max: float | None  # None with selection off
    relevance_mean: float | None
    kept_tokens: int
    thumbnail: str | None = None  # data:image/jpeg;base64,... (include_frames, kept_tokens > 0)


class KeptToken(BaseModel):
    token: int  # position among the M
    step: int
    frame_index: int  # source frame index
    timestamp_s: float
    row: int
    col: int
    relevance: float | None


class SelectionResponse(BaseModel):
    object: str = "qtsplus.selection"
    model: str
    question: str
    M: int
    n: int
    rho: float | None  # None with selection off
    kept_ratio: float  # n / M
    num_frames: int  # sampled frames
    grid: Grid
    frames: list[StepSummary]  # one per temporal step; kept_tokens sum to n
    kept: list[KeptToken]  # ascending token position
    timings_ms: dict[str, float]  # render (fetch, decode, template) and selection, end to end


def describe_selection(
    selection: VideoSelection, frame_indices: Sequence[int], fps: float | None
) -> tuple[Grid, list[StepSummary], list[KeptToken]]:
    """Map the kept token positions to steps, source frames, timestamps and grid cells.

    Token i lies in step i // (gh·gw), row (i mod gh·gw) // gw, column i mod gw. A step's time is that
    of its first sampled frame, source index / source fps (the sampled position when fps is unknown).
    """
    t, h, w = selection.grid_thw
    merge = selection.merge_size
    grid = Grid(t=t, h=h // merge, w=w // merge)
    per_step = grid.h * grid.w
    last = len(frame_indices) - 1

    def source(step: int, offset: int = 0) -> int:
        position = min(2 * step + offset, last)
        return int(frame_indices[position]) if last >= 0 else 2 * step + offset

    def seconds(step: int) -> float:
        return source(step) / fps if fps else float(min(2 * step, max(last, 0)))

    indices = selection.indices.tolist()
    kept_per_step = np.bincount(np.asarray(indices, dtype=np.int64) // per_step, minlength=t)
    scores = None if selection.scores is None else selection.scores.view(t, per_step)  # [t, gh·gw]
    steps = [
        StepSummary(
            step=k,
            index=source(k),
            source_indices=[source(k), source(k, 1)],
            timestamp_s=seconds(k),
            relevance_max=None if scores is None else float(scores[k].max()),
            relevance_mean=None if scores is None else float(scores[k].mean()),
            kept_tokens=int(kept_per_step[k]),
        )
        for k in range(t)
    ]
    flat = None if selection.scores is None else selection.scores.tolist()
    kept = [
        KeptToken(
            token=i,
            step=i // per_step,
            frame_index=source(i // per_step),
            timestamp_s=seconds(i // per_step),
            row=i % per_step // grid.w,
            col=i % grid.w,
            relevance=None if flat is None else flat[i],
        )
        for i in indices
    ]
    return grid, steps, kept


def encode_thumbnail(frame: np.ndarray, width: int = THUMBNAIL_WIDTH) -> str:
    """uint8 [H, W, 3] -> a JPEG data URL at most ``width`` pixels wide."""
    image = Image.fromarray(frame)
    if image.width > width:
        image = image.resize((width, max(1, round(image.height * width / image.width))), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _unpack_video(item: object) -> tuple[np.ndarray, dict[str, Any]]:
    """A fetched video item (vLLM's MediaWithBytes of (frames, metadata), or frames) -> both."""
    media = getattr(item, "media", item)
    frames, metadata = media if isinstance(media, tuple) else (media, {})
    return _as_frames(frames), dict(metadata or {})


class SelectionInspector:
    """The endpoint's work, bound to one server's renderer, models and model config."""

    def __init__(self, state: Any, engine_client: Any):
        self.online_renderer = state.online_renderer
        self.models = state.openai_serving_models
        self.model_config = engine_client.model_config

    def _check_model(self, name: str | None) -> None:
        """The chat endpoint's 404 for a model name this server does not serve."""
        from vllm.exceptions import VLLMNotFoundError

        if name and not self.models.is_base_model(name) and name not in self.models.lora_requests:
            served = ", ".join(path.name for path in self.models.base_model_paths)
            raise VLLMNotFoundError(f"The model `{name}` does not exist. Valid aliases: {served}.")

    async def _render(self, body: SelectionRequest) -> tuple[list[int], np.ndarray, dict[str, Any]]:
        """The chat path up to the multimodal processor (``OnlineRenderer.preprocess_chat``).

        Returns the prompt ids as the chat template renders them, and the chosen video's frames
        [T, H, W, 3] and loader metadata.
        """
        from vllm.entrypoints.generate.base.protocol import validate_request_mm_kwargs
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        self._check_model(body.model)
        chat = ChatCompletionRequest(
            model=body.model,
            messages=body.chat_messages(),
            mm_processor_kwargs=body.mm_processor_kwargs,
            media_io_kwargs=body.media_io_kwargs,
        )
        online = self.online_renderer
        validate_request_mm_kwargs(
            mm_processor_kwargs=chat.mm_processor_kwargs,
            media_io_kwargs=chat.media_io_kwargs,
            trust_request_mm_kwargs=online.trust_request_mm_kwargs,
        )
        mm_config = self.model_config.multimodal_config
        chat_params = build_chat_params(chat, online)  # the chat path's defaults, on vLLM 0.32 and 0.33
        chat_params = chat_params.with_defaults(
            online.default_chat_template_kwargs,
            default_media_io_kwargs=mm_config.media_io_kwargs if mm_config else None,
            default_mm_processor_kwargs=chat.mm_processor_kwargs,
        )
        _, prompt = await online.renderer.render_messages_async(chat.messages, chat_params)
        tokens = await online.renderer.tokenize_prompt_async(prompt, chat.build_tok_params(self.model_config))
        videos = (prompt.get("multi_modal_data") or {}).get("video") or []
        if not 0 <= body.video_index < len(videos):
            raise ValueError(f"video_index={body.video_index}, but the request has {len(videos)} video(s)")
        return tokens["prompt_token_ids"], *_unpack_video(videos[body.video_index])

    def _select(self, prompt_ids: list[int], frames: np.ndarray, body: SelectionRequest):
        """The processor's steps (``QTSplusMultiModalProcessor.apply``, then ``_apply_hf_processor_main``).

        Blocking (tokenizer, loading the runtime on first use, ViT, selector): run off the event loop.
        """
        tokenizer = self.online_renderer.renderer.get_tokenizer()
        question_ids, options = selection_inputs(
            prompt_ids, tokenizer, self.model_config.multimodal_config, body.mm_processor_kwargs or {}
        )
        runtime = load_runtime(get_runtime, self.model_config)  # a runtime that cannot serve: 503
        selection = _select(runtime, frames, question_ids, options)
        _report("video", selection, runtime.feature_cache.stats())  # the operator's log line and metrics
        return tokenizer.decode(question_ids), selection

    async def inspect(self, body: SelectionRequest) -> SelectionResponse:
        """The endpoint's answer. Cancelled (the client went away: :func:`cancellable`), the request's
        video work stops as a chat request's does: one cancel token for all its videos, checked per frame."""
        started = time.perf_counter()
        async with request_scope() as token:
            token.mm_processor_kwargs = body.mm_processor_kwargs or None  # the loader prepares at these
            prompt_ids, frames, metadata = await self._render(body)
            render_ms = (time.perf_counter() - started) * 1e3

            clock = time.perf_counter()
            question, selection = await asyncio.to_thread(self._select, prompt_ids, frames, body)
            selection_ms = (time.perf_counter() - clock) * 1e3

        # a streamed video's own plan: redone if the decoder found another frame count than the header
        plan = getattr(frames, "plan", None)
        indices = plan.frame_indices if plan is not None else metadata.get("frames_indices", [])
        grid, steps, kept = describe_selection(selection, list(indices), metadata.get("fps"))
        if body.include_frames:
            wanted = [step for step in steps if step.kept_tokens]
            pictures = await asyncio.to_thread(
                lambda: [encode_thumbnail(frames[min(2 * s.step, len(frames) - 1)]) for s in wanted]
            )
            for step, picture in zip(wanted, pictures, strict=True):
                step.thumbnail = picture
        # No per-stage timings and no cache state: whether the ViT ran says whether anyone else
        # recently sent this video, which is not this caller's business (the server's log and
        # metrics have both).
        timings = {"render_ms": render_ms, "selection_ms": selection_ms}
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return SelectionResponse(
            model=body.model or self.models.model_name(),
            question=question,
            M=selection.num_visual_tokens,
            n=selection.n,
            rho=selection.rho,
            kept_ratio=selection.n / selection.num_visual_tokens,
            num_frames=selection.num_frames,
            grid=grid,
            frames=steps,
            kept=kept,
            timings_ms=timings,
        )


def cancellable(handler):
    """vLLM's ``with_cancellation``: the handler's task is cancelled when its client disconnects
    (FastAPI alone runs a handler to its end). Where a vLLM lacks it, the handler runs to its end."""
    try:
        from vllm.entrypoints.serve.utils.api_utils import with_cancellation
    except ImportError:
        return handler
    return with_cancellation(handler)


router = APIRouter()


@router.post(ROUTE, response_model=SelectionResponse)
async def create_selection(body: SelectionRequest, raw_request: Request):
    """The selection a chat request with these inputs gets, mapped to frames and timestamps."""
    answer = await _inspect(body, raw_request)
    # None: the client went away and the work was cancelled; nobody reads this (499, nginx's name for it)
    return answer if answer is not None else Response(status_code=499)


@cancellable
async def _inspect(body: SelectionRequest, raw_request: Request) -> SelectionResponse:
    return await raw_request.app.state.qtsplus_inspector.inspect(body)


@router.get(PAGE_ROUTE, response_class=HTMLResponse)
async def selection_page() -> HTMLResponse:
    """A self-contained page that plots the endpoint's answer (runs itself given ``?video=...``)."""
    return HTMLResponse(resources.files(__package__).joinpath("static/selection.html").read_text("utf-8"))


class QTSplusSelectionEndpoint:
    """The endpoint plugin: vLLM calls the class (a zero-argument factory) in the API server."""

    name = "qtsplus"
    required_tasks = ("generate",)  # needs an engine: not on vLLM's render-only server

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        state.qtsplus_inspector = SelectionInspector(state, engine_client)
