"""The compiled passes of :mod:`qtsplus_vllm.exact_resize` (numba; imported on first use)."""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

TILE_ROWS = 16  # source rows transposed at a time by the width pass (a [W, 16·C] uint8 tile)


@intrinsic
def fma32(typingctx, a, b, c):
    """a·b + c in float32 with one rounding (``llvm.fma.f32``)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@njit(nogil=True, cache=True)
def width_pass(src, starts, sizes, plain, weights, dst):
    """uint8 [B, H, W, C] -> float32 [B, H, w, C] along W. Tiles of TILE_ROWS source rows are
    transposed to uint8 [W, rows·C], so that each tap of an output is one contiguous row and every
    output's sum runs across rows·C lanes at once (the order of each lane's sum is ATen's)."""
    nb, height, width, nc = src.shape
    out = starts.shape[0]
    buf = np.empty((width, TILE_ROWS * nc), np.uint8)
    acc = np.empty(TILE_ROWS * nc, np.float32)
    for b in range(nb):
        for y0 in range(0, height, TILE_ROWS):
            rows = min(TILE_ROWS, height - y0)
            lanes = rows * nc
            tile = src[b, y0 : y0 + rows]
            if nc == 3:
                for x in range(width):
                    d = buf[x]
                    for r in range(rows):
                        q = r * 3
                        d[q] = tile[r, x, 0]
                        d[q + 1] = tile[r, x, 1]
                        d[q + 2] = tile[r, x, 2]
            else:
                for x in range(width):
                    d = buf[x]
                    for r in range(rows):
                        for c in range(nc):
                            d[r * nc + c] = tile[r, x, c]
            for j in range(out):
                s = starts[j]
                n = sizes[j]
                p = plain[j]
                wk = weights[j, 0]
                row = buf[s]
                for m in range(lanes):
                    acc[m] = np.float32(row[m]) * wk
                for k in range(1, p + 1):
                    wk = weights[j, k]
                    row = buf[s + k]
                    for m in range(lanes):
                        acc[m] = acc[m] + np.float32(row[m]) * wk
                for k in range(p + 1, n):
                    wk = weights[j, k]
                    row = buf[s + k]
                    for m in range(lanes):
                        acc[m] = fma32(np.float32(row[m]), wk, acc[m])
                for r in range(rows):
                    d = dst[b, y0 + r, j]
                    q = r * nc
                    for c in range(nc):
                        d[c] = acc[q + c]


@njit(nogil=True, cache=True)
def height_pass(src, starts, sizes, plain, weights, dst):
    """float32 [B, H, w, C] -> uint8 [B, C, h, w] along H, clamped to [0, 255], rounded half to even."""
    nb, height, width, nc = src.shape
    lanes = width * nc
    row = np.empty(lanes, np.float32)
    lo = np.float32(0.0)
    hi = np.float32(255.0)
    for b in range(nb):
        flat = src[b].reshape(height, lanes)
        for i in range(starts.shape[0]):
            s = starts[i]
            n = sizes[i]
            p = plain[i]
            wk = weights[i, 0]
            x = flat[s]
            for m in range(lanes):
                row[m] = x[m] * wk
            for k in range(1, p + 1):
                wk = weights[i, k]
                x = flat[s + k]
                for m in range(lanes):
                    row[m] = row[m] + x[m] * wk
            for k in range(p + 1, n):
                wk = weights[i, k]
                x = flat[s + k]
                for m in range(lanes):
                    row[m] = fma32(x[m], wk, row[m])
            for m in range(lanes):
                row[m] = np.rint(min(max(row[m], lo), hi))
            for c in range(nc):
                d = dst[b, c, i]
                for jj in range(width):
                    d[jj] = np.uint8(row[jj * nc + c])
