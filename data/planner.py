"""What each draw of a stage is: a pure function of ``(seed, stage, global draw index)`` and a slot's counters.

The global batch is cut into slots (rows or image-text pairs), each an independent stream: draw ``k`` of slot ``v``
(of ``V``) has the global index ``k * V + v``. Its source comes from :class:`~data.mixture.MixtureSampler`, its
sample from the source's epoch permutation, its patch cap from the stage's progress, and its augmentation from the
global index (:class:`~data.mixture.DrawRandom`, applied by the reader). So the global stream does not depend on the
data-parallel size, and the state is a handful of counters per slot (:class:`SlotStream`).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sized
from typing import Any

from config.schema import StageConfig
from data.formats import DataError
from data.mixture import MixtureSampler, epoch_permutation

# A draw: (source, position in the source, global draw index, patch cap). What the reader reads, and all it needs.
DrawKey = tuple[str, int, int, int]
# Epoch orders of the sources kept for reuse (LRU), in bytes.
ORDER_CACHE_BYTES = 256 * 1024 * 1024
# Progressive resolution raises the patch cap in this many equal steps: a cap that moved with every batch would make
# every draw read ahead (planned at one progress, taken at a later one) a miss, while the reads ahead stay valid
# between steps.
RESOLUTION_STEPS = 16


class SlotStream:
    """The counters of one slot of the global batch: draws ``k`` of slot ``v`` (of ``V``) have the global index
    ``k * V + v``; the ``c``-th draw of a source from this slot takes position ``c * V + v`` of that source's epoch
    order. Also the slot's corrupt samples (counted by the reader) and the identity of the one document waiting for
    the next row (kept by the packer)."""

    def __init__(self, slot: int, num_slots: int, sources: list[str]):
        self.slot = slot
        self.num_slots = num_slots
        self.draws = 0
        # Every source is listed from the start: a checkpoint template (torch.distributed.checkpoint loads into the
        # keys it is given) must hold every counter.
        self.source_draws = {name: 0 for name in sources}
        self.corrupt = 0
        # The waiting document's (source, position, global draw index, patch cap) -- enough to render it again --
        # and the offset of its first token not yet placed in a row.
        self.pending: tuple[str, int, int, int, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "source_draws": dict(self.source_draws),
            "corrupt": self.corrupt,
            "pending": list(self.pending) if self.pending is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
        self.source_draws = {name: int(count) for name, count in state["source_draws"].items()}
        self.corrupt = int(state["corrupt"])
        pending = state.get("pending")
        self.pending = (pending[0], *map(int, pending[1:])) if pending else None


class Planner:
    """The draws of one data-parallel rank's slots; its state is their counters (:attr:`slots`).

    Rank ``r`` of ``R`` with ``m`` slots each serves the global slots ``r * m .. r * m + m - 1``. Besides the counters
    it keeps only caches of pure computations: recent epoch orders, and each slot's draws planned ahead for the
    reader (:meth:`plan_ahead`), which :meth:`draw` takes instead of computing them again.

    Args:
        sampler: The stage's mixture (it carries the seed and the stage name of every random choice).
        sizes: Samples per source, by name (anything with ``len``: the opened sources).
        stage: The stage (patch caps, slots per rank).
        shard: ``(rank, size)`` of this rank's share of the global batch.
    """

    def __init__(self, sampler: MixtureSampler, sizes: Mapping[str, Sized], stage: StageConfig,
                 shard: tuple[int, int]):
        self.sampler = sampler
        self.sizes = sizes
        self.patch_caps = (stage.min_image_patches or stage.max_image_patches, stage.max_image_patches)
        rank, size = shard
        per_rank = stage.micro_batch_size
        self.slots = [SlotStream(v, per_rank * size, list(sizes))
                      for v in range(rank * per_rank, (rank + 1) * per_rank)]
        self._orders: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()  # LRU
        # Per slot, the draws planned (for the reader) but not drawn yet, and where that plan ends: the slot's draw
        # count and per-source draw counts after its last planned draw.
        self._ahead: dict[int, collections.deque[DrawKey]] = {}
        self._plan_end: dict[int, tuple[int, dict[str, int]]] = {}
        self._plan_cap = -1  # the patch cap of the draws planned

    def image_patch_cap(self, progress: float) -> int:
        """Progressive resolution: the per-image patch cap grows over the stage from ``min_image_patches``
        (0: no ramp) to ``max_image_patches``, in :data:`RESOLUTION_STEPS` equal steps."""
        low, high = self.patch_caps
        step = math.floor(min(max(progress, 0.0), 1.0) * RESOLUTION_STEPS) / RESOLUTION_STEPS
        return int(low + step * (high - low))

    def plan(self, stream: SlotStream, progress: float, count: int,
             start: tuple[int, dict[str, int]] | None = None) -> tuple[list[DrawKey], tuple[int, dict[str, int]]]:
        """The next ``count`` draws of a slot's stream, without advancing it (a pure function of its counters and
        ``progress``), and where they end: the slot's draw count and per-source draw counts after them. From
        ``start`` (such an end) instead of its counters, if given."""
        draws, source_draws = start if start is not None else (stream.draws, stream.source_draws)
        planned, source_draws = [], dict(source_draws)
        cap = self.image_patch_cap(progress)
        for ahead in range(count):
            draw = (draws + ahead) * stream.num_slots + stream.slot
            name = self.sampler.choose(draw, progress)
            planned.append((name, self._position(name, source_draws[name] * stream.num_slots + stream.slot), draw,
                            cap))
            source_draws[name] += 1
        return planned, (draws + count, source_draws)

    def _position(self, name: str, index: int) -> int:
        """The sample of source ``name`` that its ``index``-th draw (over all slots) visits."""
        epoch, offset = divmod(index, len(self.sizes[name]))
        return int(self._order(name, epoch)[offset])

    def _order(self, name: str, epoch: int) -> Any:
        key = (name, epoch)
        order = self._orders.get(key)
        if order is not None:
            self._orders.move_to_end(key)
            return order
        # Slots do not move through a source's epochs in step (each draws it at its own rate: their counts drift
        # apart like random walks), so several epochs of a source are in use at once, more the smaller it is.
        # Keep the recent orders up to a memory bound (a source of 10M samples has an 80 MB order).
        while self._orders and sum(o.nbytes for o in self._orders.values()) > ORDER_CACHE_BYTES:
            self._orders.popitem(last=False)
        size = len(self.sizes[name])
        sampler = self.sampler
        order = self._orders[key] = epoch_permutation(sampler.seed, sampler.stage, name, epoch, size)
        return order

    def draw(self, stream: SlotStream, progress: float) -> DrawKey:
        """The next draw of a slot's stream; advances its counters."""
        ahead = self._ahead.get(stream.slot)
        if ahead and not self.sampler.depends_on_progress:
            # The plan is this very computation, from the same counters at the same patch cap (plan_ahead drops
            # plans of another cap): taken as it is, each draw's source and position are computed once.
            key = ahead.popleft()
            stream.draws += 1
            stream.source_draws[key[0]] += 1
            return key
        draw = stream.draws * stream.num_slots + stream.slot
        name = self.sampler.choose(draw, progress)
        position = self._position(name, stream.source_draws[name] * stream.num_slots + stream.slot)
        stream.draws += 1
        stream.source_draws[name] += 1
        key = name, position, draw, self.image_patch_cap(progress)
        if not ahead:  # drawn past its plan (or none): the next plan starts from the counters
            self._plan_end.pop(stream.slot, None)
        elif ahead.popleft() != key:  # planned otherwise: plan this slot again from its counters
            ahead.clear()
            self._plan_end.pop(stream.slot, None)
        return key

    def plan_ahead(self, progress: float, window: int) -> list[list[DrawKey]]:
        """Each slot's draws newly planned (predicted at the current progress), once some slot has at most half of
        ``window`` draws planned ahead: then each slot's plan is extended to the whole window, from where it ended
        (each draw is planned once). Empty while every slot has more. A draw that turns out other than planned (the
        mixture moved with progress) drops the rest of its slot's plan, which starts again from the slot's
        counters; a step of progressive resolution drops every plan."""
        cap = self.image_patch_cap(progress)
        if cap != self._plan_cap:  # every draw planned at another cap is now another one
            self.forget_plans()
            self._plan_cap = cap
        if all(len(self._ahead.get(s.slot, ())) > window // 2 for s in self.slots):
            return []
        plans = []
        for stream in self.slots:
            ahead = self._ahead.setdefault(stream.slot, collections.deque())
            plan, self._plan_end[stream.slot] = self.plan(stream, progress, window - len(ahead),
                                                          self._plan_end.get(stream.slot))
            ahead.extend(plan)
            plans.append(plan)
        return plans

    def forget_plans(self) -> None:
        self._ahead.clear()
        self._plan_end.clear()

    def state_dict(self) -> dict[str, Any]:
        """One entry per slot, keyed by its global slot index: reshardable across data-parallel sizes."""
        return {f"slot{stream.slot}": stream.state_dict() for stream in self.slots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stream in self.slots:
            key = f"slot{stream.slot}"
            if key not in state:
                raise DataError(f"the loader state has no {key}: it was saved with a different global batch")
            stream.load_state_dict(state[key])
        self.forget_plans()
