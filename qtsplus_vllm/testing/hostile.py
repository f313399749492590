"""Hostile and edge-case media, made in memory, for hardening tests and fuzzing seeds.

Every builder returns the file's bytes. They are cheap: frames are flat colours or small, and the
large-geometry cases use lossless codecs that compress flat frames to almost nothing, so a
"8000×8000 frame" costs kilobytes on the wire and only a header read on a server that checks
limits before decoding.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

from .videos import make_video_bytes


def encode_frames(
    frames: np.ndarray | list[np.ndarray],
    fps: float = 4.0,
    codec: str = "png",
    container_format: str = "mov",
    pix_fmt: str = "rgb24",
) -> bytes:
    """uint8 RGB frames [T, H, W, 3] -> a file's bytes (any size, odd ones included, with ``png``)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        first = np.asarray(frames[0])
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = pix_fmt
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def flat_video(frames: int, size: tuple[int, int], fps: float = 4.0, codec: str = "png") -> bytes:
    """``frames`` flat frames of ``size`` (width, height), each a different grey."""
    width, height = size
    grey = np.linspace(20, 230, max(frames, 1)).astype(np.uint8)
    return encode_frames(
        [np.full((height, width, 3), g, dtype=np.uint8) for g in grey[:frames]], fps=fps, codec=codec
    )


def static_video(frames: int, size: tuple[int, int], fps: float = 60.0) -> bytes:
    """``frames`` identical frames of ``size`` (width, height, both even) as H.264: after the first
    frame each is a few bytes, so the file says nothing of the decoding it costs (frames × pixels)."""
    width, height = size
    frame = np.full((height, width, 3), 96, dtype=np.uint8)
    return encode_frames(
        [frame] * frames, fps=fps, codec="libx264", container_format="mp4", pix_fmt="yuv420p"
    )


def many_tiny_static_frames(frames: int = 2900, size: tuple[int, int] = (16, 16), fps: float = 60.0) -> bytes:
    """Decode work as many cheap frames: 2,900 static 16×16 frames at 60 fps are ~80 kB (48 s)."""
    return static_video(frames, size, fps)


def huge_static_frames(frames: int = 6, size: tuple[int, int] = (4096, 4096), fps: float = 60.0) -> bytes:
    """Decode work as few huge frames: static 4096×4096 frames (the largest the default frame limit
    admits) are ~20 kB for six, and each costs ~30 ms of decoding on these machines."""
    return static_video(frames, size, fps)


def corrupt_bytes(size: int = 4096, seed: int = 0) -> bytes:
    """Random bytes that no demuxer recognises."""
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8).tobytes()


def truncated_mp4(keep: float = 0.5) -> bytes:
    """A valid H.264 mp4 cut after ``keep`` of its bytes (its index, at the end, is lost)."""
    data = make_video_bytes(frames=16, size=(64, 48), fps=4.0, seed=3)
    return data[: int(len(data) * keep)]


def audio_only(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A WAV file: one audio stream, no video stream."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        stream.layout = "mono"
        samples = (np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(rate * seconds))) * 8000).astype(
            np.int16
        )
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def png_image(size: tuple[int, int] = (64, 48)) -> bytes:
    """A still PNG image (what a client sends when it puts an image in a ``video_url``)."""
    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="image2pipe") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, dtype=np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def zero_frame_video(size: tuple[int, int] = (64, 48)) -> bytes:
    """A container with a video stream that holds no frame."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=4)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "bgr0"
        container.start_encoding()  # write the header although no packet follows
    return buffer.getvalue()


def understate_frame_count(avi: bytes, frames: int) -> bytes:
    """``avi`` with main and stream headers (``avih``, ``strh``) that claim ``frames`` frames."""
    data = bytearray(avi)
    struct.pack_into("<I", data, data.index(b"avih") + 24, frames)
    struct.pack_into("<I", data, data.index(b"strh") + 40, frames)
    return bytes(data)


def understated_avi(
    frames: int, claimed: int = 2, size: tuple[int, int] = (16, 16), fps: float = 30.0
) -> bytes:
    """An MJPEG AVI of ``frames`` flat frames whose headers claim only ``claimed``.

    FFmpeg trusts the header for the frame count and duration, so only a decoder that counts as it
    goes sees the truth. 3,200 16×16 frames take about 0.7 MB.
    """
    width, height = size
    greys = np.arange(frames) % 200 + 20
    avi = encode_frames(
        [np.full((height, width, 3), g, dtype=np.uint8) for g in greys],
        fps=fps,
        codec="mjpeg",
        container_format="avi",
        pix_fmt="yuvj420p",
    )
    return understate_frame_count(avi, claimed)


def jpeg_frame(size: tuple[int, int], colour: tuple[int, int, int] = (90, 30, 200)) -> bytes:
    """One flat JPEG frame (a 6000×6000 one is about 300 kB; its header says the size)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=50)
    return buffer.getvalue()


def jpeg_frames_url(frames: list[bytes]) -> str:
    """A ``data:video/jpeg`` URL: vLLM's comma-separated list of base64 JPEG frames."""
    import base64

    return "data:video/jpeg;base64," + ",".join(base64.b64encode(f).decode() for f in frames)


TRICKLE_INTERVAL = 0.25  # seconds between the bytes of a ``/trickle/N`` answer


@contextlib.contextmanager
def http_media_server(files: dict[str, bytes] | None = None) -> Iterator[str]:
    """A local HTTP server for fetch tests, in a thread; yields its base URL (``http://127.0.0.1:P``).

    Routes: ``/status/N`` answers status N; ``/loop`` redirects to itself; ``/truncated/NAME``
    announces ``files[NAME]``'s length and sends only 500 bytes; ``/big/N`` serves N zero bytes
    with a Content-Length, ``/big-chunked/N`` without one; ``/files/NAME`` serves ``files[NAME]``;
    ``/silent`` accepts the request and never answers; ``/trickle/N`` announces N bytes and sends
    one byte every ``TRICKLE_INTERVAL`` seconds (each read gets data long before any per-read
    timeout: only a total deadline ends it); ``/held`` answers how many silent and trickling
    requests are being held now. Silent and trickling handlers stop when the server does.
    """
    import http.server
    import threading

    files = dict(files or {})
    stopping = threading.Event()
    held = [0]
    held_lock = threading.Lock()

    @contextlib.contextmanager
    def holding():
        with held_lock:
            held[0] += 1
        try:
            yield
        finally:
            with held_lock:
                held[0] -= 1

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes = b"", length: int | None = None, **headers: str):
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            route, _, arg = self.path.strip("/").partition("/")
            if route == "status":
                self._send(int(arg), b"nope")
            elif route == "loop":
                self._send(302, Location="/loop")
            elif route == "truncated" and arg in files:
                self._send(200, files[arg][:500], length=len(files[arg]))
                self.close_connection = True
            elif route == "big":
                self._send(200, b"\0" * int(arg))
            elif route == "big-chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                left = int(arg)
                while left > 0:
                    chunk = b"\0" * min(left, 65536)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    left -= len(chunk)
                self.wfile.write(b"0\r\n\r\n")
            elif route == "files" and arg in files:
                self._send(200, files[arg])
            elif route == "held":
                self._send(200, str(held[0]).encode())
            elif route == "silent":
                with holding():
                    stopping.wait()
                self.close_connection = True
            elif route == "trickle":
                self.send_response(200)
                self.send_header("Content-Length", arg)
                self.end_headers()
                with holding():
                    for _ in range(int(arg)):
                        if stopping.wait(TRICKLE_INTERVAL):
                            break
                        try:
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                        except OSError:  # the client gave up
                            break
                self.close_connection = True
            else:
                self._send(404)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # many silent requests connect at once

        def handle_error(self, request, client_address):
            pass  # a client that stops reading a too-large body resets the connection

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()
