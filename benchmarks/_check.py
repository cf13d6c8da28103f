"""The check every benchmark runs before it times anything: its baseline computes the same thing as the measured path.

A speed or memory ratio against a baseline means something only if both sides do the same work. Each benchmark
therefore compares the two (outputs, gradients, streams or bytes) first; a failed comparison prints one line,
``baseline check failed: <what>: <why>``, on stderr and exits with status 1, so no figure is printed for it.

Scripts run as ``python benchmarks/x.py`` (``benchmarks/`` is ``sys.path[0]``: ``import _check``) or as modules and
from tests (``import benchmarks._check``); both import this file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch

__all__ = ["fail", "require", "require_close", "require_close_scaled", "require_equal"]


def fail(name: str, reason: str) -> NoReturn:
    """Print ``baseline check failed: name: reason`` on stderr and exit with status 1."""
    print(f"baseline check failed: {name}: {reason}", file=sys.stderr, flush=True)
    sys.exit(1)


def require(name: str, condition: bool, reason: str) -> None:
    """Fail with ``reason`` unless ``condition`` holds."""
    if not condition:
        fail(name, reason)


def _pairs(name: str, actual: Any, expected: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(label, actual, expected)`` tensors of two tensors, numbers, or same-keyed mappings / same-length sequences."""
    if isinstance(expected, Mapping):
        require(name, isinstance(actual, Mapping) and set(actual) == set(expected),
                f"keys differ: {sorted(set(actual) ^ set(expected))[:5]}" if isinstance(actual, Mapping)
                else "the measured side is not a mapping")
        return [pair for key in expected for pair in _pairs(f"{name}[{key}]", actual[key], expected[key])]
    if isinstance(expected, Sequence) and not isinstance(expected, str):
        require(name, isinstance(actual, Sequence) and len(actual) == len(expected),
                f"{len(actual)} items against {len(expected)}")
        return [pair for i, (a, e) in enumerate(zip(actual, expected)) for pair in _pairs(f"{name}[{i}]", a, e)]
    return [(name, torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach())]


def require_close(name: str, actual: Any, expected: Any, rtol: float, atol: float) -> float:
    """Fail unless ``|actual - expected| <= atol + rtol * |expected|`` everywhere (NaN never passes).

    Args:
        name: What is compared, for the message (e.g. ``"vit packed vs padded outputs"``).
        actual: The measured path's result: a tensor, a number, or a mapping / sequence of them.
        expected: The baseline's, of the same structure and shapes.
        rtol: Relative tolerance.
        atol: Absolute tolerance.

    Returns:
        The largest absolute difference (for the benchmark's JSON).
    """
    worst = 0.0
    for label, a, e in _pairs(name, actual, expected):
        require(label, a.shape == e.shape, f"shapes differ: {tuple(a.shape)} against {tuple(e.shape)}")
        if a.numel() == 0:
            continue
        a, e = a.double().cpu(), e.double().cpu()
        diff = (a - e).abs()
        excess = diff - (atol + rtol * e.abs())
        bad = torch.isnan(diff) | (excess > 0)
        if bool(bad.any()) and a.numel() == 1:
            fail(label, f"{float(a):.6g} against {float(e):.6g}: abs diff {float(diff):.3g} over rtol={rtol:g}, "
                        f"atol={atol:g}")
        if bool(bad.any()):
            index = int(torch.where(bad.flatten(), excess.flatten().nan_to_num(float("inf")), -1.0).argmax())
            fail(label, f"max abs diff {float(diff.max()):.3g} over rtol={rtol:g}, atol={atol:g} "
                        f"({int(bad.sum())} of {a.numel()} elements; first worst at flat index {index}: "
                        f"{float(a.flatten()[index]):.6g} against {float(e.flatten()[index]):.6g})")
        worst = max(worst, float(diff.max()))
    return worst


def require_close_scaled(name: str, actual: Any, expected: Any, rel: float) -> float:
    """Fail unless every tensor is within ``rel`` times the largest magnitude of its expected counterpart.

    The tolerance for gradients: their entries span orders of magnitude, and a sum over many tokens leaves
    rounding of the order of the tensor's largest entries, not of each entry.

    Returns:
        The largest ``max|actual - expected| / max|expected|`` (0 where expected is all zeros and actual equals it).
    """
    worst = 0.0
    for label, a, e in _pairs(name, actual, expected):
        scale = float(e.abs().max()) if e.numel() else 0.0
        require_close(label, a, e, rtol=0.0, atol=rel * scale)
        if scale:
            worst = max(worst, float((a.double() - e.double()).abs().max()) / scale)
    return worst


def require_equal(name: str, actual: Any, expected: Any) -> None:
    """Fail unless ``actual == expected`` exactly (tensors: same shape, dtype and values; else Python equality)."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        require(name, isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor),
                f"{type(actual).__name__} against {type(expected).__name__}")
        require(name, actual.shape == expected.shape and actual.dtype == expected.dtype,
                f"{actual.dtype}{list(actual.shape)} against {expected.dtype}{list(expected.shape)}")
        differ = actual.cpu() != expected.cpu()
        if bool(differ.any()):
            diff = (actual.cpu().double() - expected.cpu().double()).abs().max()
            fail(name, f"{int(differ.sum())} of {differ.numel()} elements differ (max abs diff {float(diff):.3g})")
        return
    if actual != expected:
        fail(name, f"{_short(actual)} != {_short(expected)}")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
