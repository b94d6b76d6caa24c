"""Sortable integer keys: a non-negative float and an index in one int64.

The bits of a non-negative float32, read as an int32, order exactly like the float.
Shifted into the high 32 bits, with ``n - 1 - index`` in the low 32 bits, one int64
key orders by value descending and, among equal values, by index ascending: one
``amax``/``topk``/``scatter_reduce`` then finds "the highest value, lowest index
first" where two passes would be needed otherwise. Every such key in ssdlit (best
anchor of a gt, best gt of an anchor, hardest negatives) is made here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["index_of", "pack", "value_bits", "value_of"]


def value_bits(value: Tensor) -> Tensor:
    """The high half of a key: the float32 bits of ``value`` (>= 0) << 32, int64.
    Values of other float dtypes are rounded to float32 first."""
    return value.float().view(torch.int32).long() << 32


def pack(value: Tensor, index: Tensor, n: int, bits: Tensor | None = None) -> Tensor:
    """Keys ``value_bits(value) | (n - 1 - index)`` (``index`` in ``0..n-1``);
    ``bits``: ``value_bits(value)`` when already computed."""
    return (value_bits(value) if bits is None else bits) | ((n - 1) - index)


def index_of(key: Tensor, n: int) -> Tensor:
    """The index packed in ``key`` by :func:`pack` with the same ``n``."""
    return (n - 1) - (key & 0xFFFFFFFF)


def value_of(key: Tensor) -> Tensor:
    """The float32 value packed in ``key``."""
    return (key >> 32).int().view(torch.float32)
