"""End-to-end tests: each module starts a real ``vllm serve`` subprocess (qtsplus_vllm.testing.server).

Every test under this directory gets the ``e2e`` marker (deselect with ``-m "not e2e"``), and is
skipped with the reason when vLLM or the openai client is not installed, e.g. on a GPU machine set
up for the unit tests only. Only the presence of the packages is checked here (vLLM is never
imported into the test process): a vLLM that is installed but broken fails at server start-up,
with the server's log in the error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).parent


def _missing_requirement() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (CPU: bash scripts/setup.sh; GPU: pip install '.[gpu]' from a checkout)"
    if importlib.util.find_spec("openai") is None:
        return "the openai client is not installed (pip install '.[dev]')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest's collection hook sees the whole session's items: only touch this directory's.
    ours = [item for item in items if item.path.is_relative_to(E2E_DIR)]
    if not ours:
        return
    reason = _missing_requirement()
    for item in ours:
        item.add_marker(pytest.mark.e2e)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def vllm_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``VLLM_CACHE_ROOT`` for the session's servers (pass as ``RemoteServer(cache_root=...)``).

    vLLM writes it atomically, keyed by source hashes, so servers can share it; the second and later
    servers skip the model-class inspection subprocess (≈ 8 s on 2 cores). It stays out of ~/.cache.
    """
    return tmp_path_factory.mktemp("vllm-cache")
