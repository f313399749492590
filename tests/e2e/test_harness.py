"""The end-to-end harness itself, proved on a real ``vllm serve`` of a tiny plain-text Qwen2 model.

No plugin is involved: the model is transformers' ``Qwen2ForCausalLM`` with random weights and the
project's tiny byte-level BPE tokenizer (Qwen special tokens, chat template), and the server runs
with ``VLLM_PLUGINS=""`` so that a plugin under development cannot break the harness's own tests.
One server serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from qtsplus_vllm.testing.server import (
    RemoteServer,
    ServerStartupError,
    cpu_serve_args,
    process_group_alive,
)
from qtsplus_vllm.testing.tiny_checkpoint import added_token_ids, build_tokenizer, write_tokenizer

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install '.[dev]')")

MODEL_NAME = "tiny-qwen2"
MAX_MODEL_LEN = 512
NO_PLUGINS = {"VLLM_PLUGINS": ""}  # an empty allow-list: no general plugin loads (ours included)

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is moving in the video?"}],
    "system": [
        {"role": "system", "content": "Answer with a short sentence."},
        {"role": "user", "content": "Which colour is the background?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "How many objects can you see?"},
        {"role": "assistant", "content": "Two: a red square and a blue circle."},
        {"role": "user", "content": "In which direction are they moving?"},
    ],
}


def write_tiny_text_model(out: Path, seed: int = 0) -> Path:
    """A random-weight Qwen2ForCausalLM (D=128, 2 layers, 4 heads / 2 KV heads) with our tokenizer.

    The head dim is 32 because vLLM's CPU attention supports head sizes 32, 64, 80, ... only (a
    head dim of 16 starts, then fails at the first request).
    """
    tok = build_tokenizer()
    ids = added_token_ids(tok)
    config = Qwen2Config(
        vocab_size=-(-tok.get_vocab_size() // 64) * 64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out)
    write_tokenizer(out, tok, max_len=config.max_position_embeddings)
    return out


def live_processes_with(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_text_model(tmp_path_factory.mktemp("tiny-qwen2") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir: Path, vllm_cache_root: Path):
    args = cpu_serve_args(MAX_MODEL_LEN, served_model_name=MODEL_NAME)
    with RemoteServer(model_dir, args, env=NO_PLUGINS, cache_root=vllm_cache_root) as remote:
        pgid = remote.pid
        print(f"\nvllm serve healthy after {remote.startup_seconds:.1f} s")
        yield remote
    assert not process_group_alive(pgid), f"processes of group {pgid} outlived the server"


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.get_client(timeout=120)


def prompt_token_count(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return len(ids)


def test_server_is_healthy(server: RemoteServer):
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert server.url_for("v1", "models") == f"{server.base_url}/models"
    with urllib.request.urlopen(server.url_for("health"), timeout=10) as response:
        assert response.status == 200
    assert server.startup_seconds is not None and server.startup_seconds < server.startup_timeout
    assert "Application startup complete" in server.log_tail(10_000)
    assert len(server.log_tail(5).splitlines()) <= 5


def test_models_lists_the_served_model(client: openai.OpenAI):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_dump()["max_model_len"] == MAX_MODEL_LEN


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_usage_counts_the_templated_prompt(client: openai.OpenAI, tokenizer, conversation: str):
    messages = CONVERSATIONS[conversation]
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0.0
    )
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == prompt_token_count(tokenizer, messages)
    assert 1 <= response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streaming_equals_non_streaming_for_greedy(client: openai.OpenAI, tokenizer):
    messages = CONVERSATIONS["user"]
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0.0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.prompt_tokens == whole.usage.prompt_tokens == prompt_token_count(tokenizer, messages)
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_async_client_serves_concurrent_requests(server: RemoteServer, tokenizer):
    async def ask_all() -> list:
        async with server.get_async_client(timeout=120) as client:
            requests = [
                client.chat.completions.create(model=MODEL_NAME, messages=m, max_tokens=4, temperature=0.0)
                for m in CONVERSATIONS.values()
            ]
            return await asyncio.gather(*requests)

    responses = asyncio.run(ask_all())
    for messages, response in zip(CONVERSATIONS.values(), responses, strict=True):
        assert response.usage.prompt_tokens == prompt_token_count(tokenizer, messages)
        assert response.choices[0].finish_reason in ("stop", "length")


def test_malformed_requests_get_400_and_the_server_still_answers(server: RemoteServer, client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=MODEL_NAME, messages=CONVERSATIONS["user"], max_tokens=-1, temperature=0.0
        )
    assert excinfo.value.status_code == 400

    status, body = post_json(server.url_for("v1", "chat", "completions"), {"model": MODEL_NAME})
    assert status == 400, body
    assert "messages" in json.dumps(body)

    with urllib.request.urlopen(server.url_for("health"), timeout=10) as response:
        assert response.status == 200
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=CONVERSATIONS["user"], max_tokens=4, temperature=0.0
    )
    assert response.choices and response.usage.completion_tokens >= 1


def test_startup_failure_raises_with_the_log_and_leaves_nothing(tmp_path: Path, vllm_cache_root: Path):
    not_a_model = tmp_path / "not-a-model"  # exists, but has no config.json
    not_a_model.mkdir()
    remote = RemoteServer(not_a_model, cpu_serve_args(), env=NO_PLUGINS, cache_root=vllm_cache_root)
    with pytest.raises(ServerStartupError) as excinfo, remote:
        pytest.fail("the server should not have started")
    message = str(excinfo.value)
    assert "exited with code" in message and "before becoming healthy" in message
    assert f"--- last 80 lines of {remote.log_path} ---" in message
    assert str(not_a_model) in message.split("---", 2)[-1]  # vLLM's own error, from the log
    assert remote.pid is None
    assert live_processes_with(str(not_a_model)) == []
    assert remote.log_path.exists()  # kept for inspection after a failed start
    remote.log_path.unlink()
