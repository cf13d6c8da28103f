"""Deterministic mixture draws: every random choice is a pure function of (seed, stage, index)."""

from __future__ import annotations

import bisect
import hashlib
import struct
import zlib

import numpy as np

from config.schema import MixtureConfig


def stable_hash(text: str) -> int:
    """A process-independent hash (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def draw_rng(seed: int, stage: str, index: int, salt: str) -> np.random.Generator:
    return np.random.default_rng([seed, stable_hash(stage), index, stable_hash(salt)])


def _draw_key(seed: int, stage: str, index: int, salt: str) -> bytes:
    """The bytes that key every counter-based random number of draw ``index``."""
    return struct.pack("<qIqI", seed, stable_hash(stage), index, stable_hash(salt))


class DrawRandom:
    """The random numbers of one draw, as a counter-based stream: block ``k`` is BLAKE2b-512 of (seed, stage, index,
    salt, k), eight uniforms of 53 bits each: no numpy generator to seed per draw (its seed sequence is costly) nor
    per-call overhead to pay, and augmentation plans take ten numbers per image.
    Offers the part of ``numpy.random.Generator`` that :func:`data.augment.plan_augment` uses."""

    def __init__(self, seed: int, stage: str, index: int, salt: str):
        self._key = _draw_key(seed, stage, index, salt)
        self._block = 0
        self._ready: list[float] = []

    def random(self) -> float:
        """A uniform in [0, 1)."""
        if not self._ready:
            words = struct.unpack("<8Q", hashlib.blake2b(self._key + struct.pack("<Q", self._block)).digest())
            self._block += 1
            self._ready = [(word >> 11) * 2.0**-53 for word in reversed(words)]  # popped from the end: in order
        return self._ready.pop()

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        """A uniform in [low, high)."""
        return low + (high - low) * self.random()

    def integers(self, low: int, high: int) -> int:
        """An integer in [low, high), each with probability 1 / (high - low) (to within 2**-53)."""
        return low + min(int(self.random() * (high - low)), high - low - 1)


def draw_uniforms(seed: int, stage: str, index: int, salt: str) -> tuple[float, float]:
    """Two uniforms in [0, 1) of draw ``index``, as a counter-based hash (BLAKE2b of the key): no generator to seed
    (its seed sequence is costly), which the loader would otherwise do for every draw it plans."""
    high, low = struct.unpack("<QQ", hashlib.blake2b(_draw_key(seed, stage, index, salt), digest_size=16).digest())
    return (high >> 11) * 2.0**-53, (low >> 11) * 2.0**-53  # the top 53 bits: every double in [0, 1) is exact


def multimodal_share(mix: MixtureConfig, progress: float) -> float:
    """The report's ramp: the multimodal share grows linearly over the stage (progress in [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    return mix.multimodal_share_start + progress * (mix.multimodal_share_end - mix.multimodal_share_start)


def _edges(weights: dict[str, float]) -> tuple[list[str], list[float]]:
    """The sources with positive weight and the upper edges of their shares of [0, 1), accumulated in order."""
    names = [name for name, w in weights.items() if w > 0]
    total = sum(weights[name] for name in names)
    edges, edge = [], 0.0
    for name in names:
        edge += weights[name] / total
        edges.append(edge)
    return names, edges


def _pick_from(names: list[str], edges: list[float], u: float) -> str:
    """The first source whose edge lies above ``u`` (the last one if rounding left ``u`` above every edge)."""
    return names[min(bisect.bisect_right(edges, u), len(names) - 1)]


class MixtureSampler:
    """Chooses the source of each draw from the stage's mixture."""

    def __init__(self, mix: MixtureConfig, seed: int, stage: str, images_only: bool = False):
        self.mix = mix
        self.seed = seed
        self.stage = stage
        self.images_only = images_only
        # The two uniforms of each draw, memoized: prefetch plans the same draws again every step.
        self._uniforms: dict[int, tuple[float, float]] = {}
        # Each group's shares, accumulated once (choose() runs for every planned draw).
        self._groups = {group: _edges(weights) for group, weights in (
            ("multimodal", mix.multimodal_sources), ("text", mix.text_sources), ("long", mix.long_sources))
            if any(w > 0 for w in weights.values())}

    def uniforms(self, index: int) -> tuple[float, float]:
        """The (group, source) uniforms of draw ``index``: a pure function of (seed, stage, index)."""
        pair = self._uniforms.get(index)
        if pair is None:
            if len(self._uniforms) >= 1 << 16:
                self._uniforms.clear()
            pair = self._uniforms[index] = draw_uniforms(self.seed, self.stage, index, "mixture")
        return pair

    @property
    def depends_on_progress(self) -> bool:
        """Whether :meth:`choose` may give a draw another source at another progress (the multimodal share
        ramps); if not, a draw's source is a function of its index alone."""
        mix = self.mix
        return not self.images_only and mix.multimodal_share_start != mix.multimodal_share_end

    def sources(self) -> list[str]:
        """Every source a draw of this stage can come from (groups with zero chance are left out), sorted."""
        return mixture_sources(self.mix, self.images_only)

    def choose(self, index: int, progress: float) -> str:
        """Source of draw ``index`` at stage ``progress``: long (``long_share``), else multimodal by the ramp,
        else text."""
        u_group, u_source = self.uniforms(index)
        if self.images_only:
            return _pick_from(*self._groups["multimodal"], u_source)
        long_share = self.mix.long_share
        if u_group < long_share:
            return _pick_from(*self._groups["long"], u_source)
        # Rescale the remaining probability mass so the replay part keeps the ramp's proportions.
        u_replay = (u_group - long_share) / (1.0 - long_share)
        if u_replay < multimodal_share(self.mix, progress):
            return _pick_from(*self._groups["multimodal"], u_source)
        return _pick_from(*self._groups["text"], u_source)


def epoch_permutation(seed: int, stage: str, source: str, epoch: int, size: int) -> np.ndarray:
    """The order in which a source's samples are visited in one epoch (a fresh shuffle per epoch)."""
    return draw_rng(seed, stage, epoch, f"order/{source}").permutation(size)


def mixture_sources(mix: MixtureConfig, images_only: bool = False) -> list[str]:
    """Every source a draw of a stage with mixture ``mix`` can come from (groups with zero chance are left out),
    sorted: a packed row names the source of each position by its index here (per-source loss)."""
    shares = (mix.multimodal_share_start, mix.multimodal_share_end)
    groups = []
    if images_only or max(shares) > 0:
        groups.append(mix.multimodal_sources)
    if not images_only and min(shares) < 1:
        groups.append(mix.text_sources)
    if not images_only and mix.long_share > 0:
        groups.append(mix.long_sources)
    return sorted({name for group in groups for name, w in group.items() if w > 0})
