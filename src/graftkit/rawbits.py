"""numba helpers over raw float bits, shared by the merge kernels and training dropout.

Tensors reach these kernels as their raw bits (uint16 arrays for bf16, uint32 for float32), so
one compiled kernel per element type reads safetensors memory maps and torch tensors alike.

* :func:`as_f32` / :func:`to_raw` - one element to float32 and back (bf16 rounded to nearest
  even, as torch's ``.to(torch.bfloat16)``);
* :func:`random_draws` - counter-based uniform 32-bit draws from SplitMix64: element ``e`` of
  stream ``seed`` always gets the same draw, whatever the chunking or thread count.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba.extending import overload


def as_f32(x):
    """The float32 value of one raw element: bf16 (uint16 bits) or float32 (uint32 bits)."""


def to_raw(value, out):
    """A float32 ``value`` as a raw element of ``out``'s dtype (uint16: bf16, rounded to nearest
    even as torch's ``.to(torch.bfloat16)``; uint32: float32 bits). NaN is not canonicalized."""


# The raw element type is known when a kernel is compiled: each helper picks its bf16 or float32
# body then, so the kernels carry no per-element dtype branch.
@overload(as_f32, inline="always")
def _f32_typed(x):
    if x.bitwidth == 16:
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    return lambda x: np.uint32(x).view(np.float32)


@overload(to_raw, inline="always")
def _bits_typed(value, out):
    if out.dtype.bitwidth == 16:
        def bf16_bits(value, out):
            v = np.float32(value).view(np.uint32)
            return np.uint16((v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return bf16_bits
    return lambda value, out: np.float32(value).view(np.uint32)


GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@nb.njit(inline="always")
def splitmix64(z):
    """Output of SplitMix64 for the counter value ``z`` (the generator's state before mixing)."""
    z = np.uint64((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9))
    z = np.uint64((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB))
    return np.uint64(z ^ (z >> np.uint64(31)))


@nb.njit(inline="always")
def random_draws(buffer, seed, position, count):
    """Uniform 32-bit draws for elements ``position .. position + count - 1`` (``position`` even)
    of the stream ``seed``: element e gets one half of the SplitMix64 output for counter
    ``seed + (e // 2) * golden``, so any chunk of a tensor draws what the whole tensor would.
    Written into ``buffer`` (uint64, at least ``count + 1`` long); returns its first ``count``."""
    first = np.uint64(position // 2)
    for p in range((count + 1) // 2):  # one 64-bit word gives the draws of two entries
        word = splitmix64(seed + (first + np.uint64(p)) * GOLDEN)
        buffer[2 * p] = word >> np.uint64(32)
        buffer[2 * p + 1] = word & np.uint64(0xFFFFFFFF)
    return buffer[:count]
