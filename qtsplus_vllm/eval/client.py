"""The asynchronous evaluation client: one streamed chat completion per (mode, item).

- Modes run one after another (so one mode's latencies are not measured under another's load);
  within a mode at most ``concurrency`` requests are in flight.
- Each result is appended to the JSONL as one line and flushed as soon as it arrives: a crash or
  Ctrl-C loses at most the requests in flight. Re-running with the same output resumes: an item
  whose latest record under the same mode is ``ok`` is not asked again; failed ones are retried.
- A request that times out, cannot connect, or gets HTTP 408/429/5xx is retried ``retries`` times
  with a growing pause; other HTTP errors (a 400 such as a prompt longer than the context) are not.
  A request that still fails is recorded with ``status: "failed"`` and its error: it is reported
  apart and never scored as a wrong answer.
- Figures per request: TTFT (first streamed text), end-to-end latency, prompt and completion tokens
  from the final usage chunk (``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from .datasets import Item
from .modes import Mode
from .prompts import build_prompt, extract_letter

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class ClientConfig:
    base_url: str
    model: str | None = None
    api_key: str = "EMPTY"
    concurrency: int = 4
    timeout: float = 600.0  # seconds per attempt, whole request
    retries: int = 2
    backoff: float = 1.0  # seconds before the first retry, doubled after each
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = 0
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else f"{root}/v1"


class RequestError(Exception):
    def __init__(self, message: str, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.attempts = 1


def build_body(item: Item, mode: Mode, video_url: str, cfg: ClientConfig, model: str) -> dict[str, Any]:
    system, text = build_prompt(item)
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": video_url}},
                {"type": "text", "text": text},
            ],
        }
    )
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    body.update(mode.extra_body())
    return body


async def _stream_once(client: httpx.AsyncClient, cfg: ClientConfig, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    finish = None
    async with client.stream("POST", f"{cfg.api_root}/chat/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode("utf-8", "replace")[:500]
            raise RequestError(
                f"HTTP {response.status_code}: {detail}",
                status=response.status_code,
                retryable=response.status_code in RETRYABLE_STATUS,
            )
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RequestError(f"error in stream: {json.dumps(chunk['error'])[:500]}")
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    parts.append(text)
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                usage = chunk["usage"]
    latency = time.perf_counter() - start
    return {
        "reply": "".join(parts),
        "finish_reason": finish,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "ttft_s": ttft if ttft is not None else latency,
        "latency_s": latency,
    }


async def ask(
    client: httpx.AsyncClient, cfg: ClientConfig, body: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    """One request with retries: ``(result, attempts)``; raises :class:`RequestError` when all fail."""
    attempt = 0
    while True:
        attempt += 1
        try:
            async with asyncio.timeout(cfg.timeout):
                return await _stream_once(client, cfg, body), attempt
        except TimeoutError:
            error = RequestError(f"timed out after {cfg.timeout:g} s")
        except httpx.HTTPError as err:
            error = RequestError(f"{type(err).__name__}: {err}")
        except json.JSONDecodeError as err:
            error = RequestError(f"malformed stream: {err}")
        except RequestError as err:
            error = err
        if not error.retryable or attempt > cfg.retries:
            error.attempts = attempt
            raise error
        await asyncio.sleep(cfg.backoff * 2 ** (attempt - 1))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a results JSONL; a torn last line (a killed run) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "mode" in record and "id" in record:
            records.append(record)
    return records


def latest_records(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The last record of each (mode, item id)."""
    return {(r["mode"], r["id"]): r for r in records}


async def resolve_model(client: httpx.AsyncClient, cfg: ClientConfig) -> str:
    if cfg.model:
        return cfg.model
    response = await client.get(f"{cfg.api_root}/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RequestError("the endpoint lists no model; pass --model", retryable=False)
    return models[0]["id"]


@dataclass
class RunResult:
    model: str
    asked: int = 0
    skipped: int = 0  # finished in an earlier run
    failed: int = 0


async def run(
    items: list[Item],
    modes: list[Mode],
    cfg: ClientConfig,
    out_path: Path,
    video_url: Callable[[Path], str],
    *,
    progress: bool = True,
) -> RunResult:
    """Ask every item in every mode not finished yet, appending one JSONL record per result."""
    from tqdm.auto import tqdm

    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = {key for key, r in latest_records(read_records(out_path)).items() if r.get("status") == "ok"}
    todo = [(mode, [it for it in items if (mode.name, it.id) not in done]) for mode in modes]
    headers = {"Authorization": f"Bearer {cfg.api_key}", **cfg.headers}
    limits = httpx.Limits(max_connections=cfg.concurrency + 2, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(
        headers=headers, timeout=httpx.Timeout(cfg.timeout), limits=limits
    ) as client:
        result = RunResult(model=await resolve_model(client, cfg))
        result.skipped = len(items) * len(modes) - sum(len(pending) for _, pending in todo)
        bar = tqdm(total=sum(len(p) for _, p in todo), disable=not progress, unit="q", dynamic_ncols=True)
        with out_path.open("a", encoding="utf-8") as sink, bar:
            for mode, pending in todo:
                semaphore = asyncio.Semaphore(cfg.concurrency)
                scored = {"n": 0, "right": 0}

                async def one(item: Item, mode: Mode = mode, semaphore=semaphore, scored=scored) -> None:
                    async with semaphore:
                        record = await _evaluate(client, cfg, result.model, mode, item, video_url(item.video))
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()
                    result.asked += 1
                    if record["status"] == "ok":
                        scored["n"] += 1
                        scored["right"] += bool(record["correct"])
                    else:
                        result.failed += 1
                    acc = scored["right"] / scored["n"] if scored["n"] else 0.0
                    bar.set_postfix_str(f"{mode.name} acc={acc:.3f} failed={result.failed}", refresh=False)
                    bar.update(1)

                bar.set_description(mode.name)
                await asyncio.gather(*(one(item) for item in pending))
    return result


async def _evaluate(
    client: httpx.AsyncClient, cfg: ClientConfig, model: str, mode: Mode, item: Item, url: str
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "mode": mode.name,
        "id": item.id,
        "answer": item.answer,
        "groups": item.groups,
        "video": str(item.video),
    }
    body = build_body(item, mode, url, cfg, model)
    try:
        answer, attempts = await ask(client, cfg, body)
    except Exception as err:  # a bug or an unexpected reply must not end the run: record it as a failure
        if not isinstance(err, RequestError):
            err = RequestError(f"client error: {type(err).__name__}: {err}", retryable=False)
        record.update(
            status="failed", error=str(err), http_status=err.status, attempts=getattr(err, "attempts", 1)
        )
    else:
        pred = extract_letter(answer["reply"], item.letters, item.options)
        record.update(status="ok", pred=pred, correct=pred == item.answer, attempts=attempts, **answer)
    record["time"] = datetime.now(UTC).isoformat(timespec="seconds")
    return record
