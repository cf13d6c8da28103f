"""Where each piece of optimizer work lives in ZeRO-1 distributed Muon: a pure function of shapes and the world size.

Two layouts, joined by all-to-alls (torchtitan's DistMuon idea, applied only where it pays):

* **Storage**: parameters are cut into *units* (a Muon unit is a whole matrix, each expert's matrix of a stacked
  expert tensor on its own; an AdamW unit is a chunk of ``PIECE`` elements) and units into *pieces* of at most
  ``PIECE`` elements. Every piece has one home rank, which holds its optimizer state and receives its reduced
  gradient in the reduce-scatter. Pieces are small, so the rank segments are equal to within one piece: no padding
  to the largest matrix, and the state and the reduce-scatter / all-gather bytes match ZeRO-1 AdamW's even split.
  Piece keys depend only on names and shapes, so a checkpoint reshards across data-parallel sizes.
* **Compute**: Newton-Schulz needs a whole matrix. A matrix's work is one *task*, or, when the matrix costs more
  than ``TASK_SHARE`` of a rank's mean Newton-Schulz FLOPs, ``k`` tasks, each computing a block of rows of every
  iterate (``A[rows] = X[rows] X^T``, ``X'[rows] = a X[rows] + (b A[rows] + c A[rows] A) X``; the ``k`` ranks swap
  their rows after each product). Every element is the same full-length dot product as in one process, so the
  result is the single-process one. Tasks are dealt largest-first to the least loaded rank, counting a *base load*
  (a rank's expert Newton-Schulz FLOPs when planning the dense units), so the FLOPs even out across the world.

A matrix's pieces are homed on its compute ranks when they have room, so most matrices never move; the others move
as ``ns_dtype`` updates in (and orthogonalized results out) through one all-to-all each way.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from optim.build import ADAMW, MUON, Route, route_parameters
from optim.muon import newton_schulz_flops

# Elements of a storage piece and of an AdamW unit: small against a rank's share at 1024 ranks (~2M dense elements of
# kimi_vl_a3b), so segments differ by at most ~3%; large enough to keep the unit count in the tens of thousands.
PIECE = 1 << 16
# A matrix whose Newton-Schulz FLOPs exceed this share of the ranks' mean (over these units) is split into row blocks.
TASK_SHARE = 1.0
NS_STEPS = 5


@dataclass(eq=False)
class Unit:
    """One independently optimized part of a parameter: a whole matrix (Muon) or a flat chunk (AdamW)."""

    key: str
    route: Route
    param: nn.Parameter
    expert: int | None = None  # Muon: index along dim 0 of a stacked expert tensor
    start: int = 0  # AdamW: element range of the flattened parameter
    stop: int = 0

    @property
    def is_muon(self) -> bool:
        return self.route.rule == MUON

    @property
    def numel(self) -> int:
        if not self.is_muon:
            return self.stop - self.start
        return self.matrix_shape[0] * self.matrix_shape[1]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        shape = self.route.shape[1:] if self.expert is not None else self.route.shape
        return shape[0], int(torch.Size(shape[1:]).numel())

    @property
    def ns_shape(self) -> tuple[int, int]:
        """``(m, n)`` of Newton-Schulz's iterate: the matrix in its wide orientation (``m <= n``)."""
        rows, cols = self.matrix_shape
        return min(rows, cols), max(rows, cols)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This unit's part of a parameter-shaped tensor (the parameter, its gradient): a view, never a copy."""
        if not self.is_muon:
            return tensor.view(-1)[self.start : self.stop]
        matrix = tensor[self.expert] if self.expert is not None else tensor
        return matrix.view(self.matrix_shape)

    def flops(self) -> int:
        return newton_schulz_flops(*self.matrix_shape, steps=NS_STEPS) if self.is_muon else 0


@dataclass(eq=False)
class Piece:
    """Elements ``start:stop`` of a unit's flattened view: the grain of storage (state, reduce-scatter, all-gather)."""

    unit: Unit
    start: int
    stop: int
    key: str

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.unit.view(tensor).reshape(-1)[self.start : self.stop]


@dataclass(frozen=True)
class Task:
    """Rows ``lo:hi`` of a matrix's Newton-Schulz iterates, computed on ``rank``."""

    rank: int
    lo: int
    hi: int


def pieces_of(unit: Unit) -> list[Piece]:
    """A unit's storage pieces; a unit of at most ``PIECE`` elements is one piece keyed like the unit."""
    if unit.numel <= PIECE:
        return [Piece(unit, 0, unit.numel, unit.key)]
    return [Piece(unit, s, min(s + PIECE, unit.numel), f"{unit.key}~{i}")
            for i, s in enumerate(range(0, unit.numel, PIECE))]


def build_units(model: nn.Module) -> list[Unit]:
    """Cut every trainable parameter into units (deterministic; independent of the world size)."""
    params = dict(model.named_parameters())
    units = []
    for route in route_parameters(model):
        param = params[route.name]
        if route.rule == MUON and route.per_expert:
            # Keys carry the *global* expert index (an expert-parallel shard knows its offset), so the state
            # reshards across expert-parallel degrees as it does across data-parallel ones.
            offset = getattr(model.get_submodule(route.name.rpartition(".")[0]), "expert_offset", 0)
            units += [Unit(f"{route.name}#{offset + e}", route, param, expert=e) for e in range(route.shape[0])]
        elif route.rule == MUON:
            units.append(Unit(route.name, route, param))
        else:
            units += adamw_chunks(route, param)
    return units


def adamw_chunks(route: Route, param: nn.Parameter) -> list[Unit]:
    numel = param.numel()
    return [Unit(f"{route.name}@{i}", route, param, start=s, stop=min(s + PIECE, numel))
            for i, s in enumerate(range(0, numel, PIECE))]


def build_units_all_adamw(model: nn.Module) -> list[Unit]:
    """Units for plain ZeRO-1 AdamW: every parameter chunked as AdamW (the baseline Muon is compared with)."""
    params = dict(model.named_parameters())
    return [unit for route in route_parameters(model)
            # per_expert stays: expert parameters are sharded over their expert-data group, as under Muon.
            for unit in adamw_chunks(Route(route.name, route.shape, ADAMW, per_expert=route.per_expert,
                                           weight_decay=route.weight_decay),
                                     params[route.name])]


@dataclass
class Plan:
    """The storage and compute layout of a list of units over ``world`` ranks (see the module docstring).

    Args:
        units: The units, in a deterministic order (every rank builds the same list).
        world: Ranks of the group the units are sharded over.
        base_flops: Newton-Schulz FLOPs each rank already carries from another plan (its experts), or None.
        ns_bytes: Bytes of an element of ``ns_dtype`` (what the compute-layout all-to-alls carry).
    """

    units: list[Unit]
    world: int
    base_flops: list[int] | None = None
    ns_bytes: int = 2
    tasks: dict[Unit, list[Task]] = field(init=False)
    stored: list[list[Piece]] = field(init=False)
    home: dict[Piece, int] = field(init=False)
    segment: int = field(init=False)

    def __post_init__(self):
        self.base_flops = list(self.base_flops) if self.base_flops is not None else [0] * self.world
        self.muon = [u for u in self.units if u.is_muon]
        self.order = {u: i for i, u in enumerate(self.units)}
        self.pieces = {u: pieces_of(u) for u in self.units}
        self._assign_tasks()
        self._assign_homes()

    # ----- planning -------------------------------------------------------------------------------------------

    def _assign_tasks(self) -> None:
        """Split the costly matrices into row blocks, then deal the tasks largest-first (LPT) to the least loaded
        rank holding no other task of the same matrix."""
        # The threshold is a share of the *room* a rank has on average above its base load (the mean of these
        # units' FLOPs): a task bigger than that room lands on a rank already carrying its base, so it alone would
        # push that rank above the mean.
        mean = sum(u.flops() for u in self.muon) / self.world
        pending = []
        for unit in self.muon:
            m = unit.ns_shape[0]
            k = min(m, self.world, max(1, math.ceil(unit.flops() / (TASK_SHARE * mean)))) if mean else 1
            bounds = [i * m // k for i in range(k + 1)]
            pending += [(unit, lo, hi, unit.flops() * (hi - lo) // m) for lo, hi in zip(bounds, bounds[1:])]
        pending.sort(key=lambda t: (-t[3], t[0].key, t[1]))
        heap = [(load, rank) for rank, load in enumerate(self.base_flops)]
        heapq.heapify(heap)
        self.tasks = {u: [] for u in self.muon}
        for unit, lo, hi, flops in pending:
            taken = {t.rank for t in self.tasks[unit]}
            skipped = []
            load, rank = heapq.heappop(heap)
            while rank in taken:
                skipped.append((load, rank))
                load, rank = heapq.heappop(heap)
            self.tasks[unit].append(Task(rank, lo, hi))
            heapq.heappush(heap, (load + flops, rank))
            for item in skipped:
                heapq.heappush(heap, item)
        for tasks in self.tasks.values():
            tasks.sort(key=lambda t: t.lo)

    def _assign_homes(self) -> None:
        """Home each matrix's pieces on its compute ranks while they have room below the even share; deal the rest
        (AdamW chunks and the overflow), largest first, to the rank with the fewest elements."""
        total = sum(u.numel for u in self.units)
        capacity = math.ceil(total / self.world)
        load = [0] * self.world
        self.stored = [[] for _ in range(self.world)]
        self.home = {}

        def place(piece: Piece, rank: int) -> None:
            self.stored[rank].append(piece)
            self.home[piece] = rank
            load[rank] += piece.numel

        rest = [p for u in self.units if not u.is_muon for p in self.pieces[u]]
        for unit in sorted(self.muon, key=lambda u: (-u.flops(), u.key)):
            ranks = [t.rank for t in self.tasks[unit]]
            pieces = self.pieces[unit]
            for i, piece in enumerate(pieces):
                rank = ranks[i * len(ranks) // len(pieces)]
                if load[rank] + piece.numel <= capacity:
                    place(piece, rank)
                else:
                    rest.append(piece)
        heap = [(elements, rank) for rank, elements in enumerate(load)]
        heapq.heapify(heap)
        for piece in sorted(rest, key=lambda p: (-p.numel, p.key)):
            elements, rank = heapq.heappop(heap)
            place(piece, rank)
            heapq.heappush(heap, (elements + piece.numel, rank))
        for rank_pieces in self.stored:  # a fixed order inside a segment: by unit order, then by offset
            rank_pieces.sort(key=lambda p: (self.order[p.unit], p.start))
        self.segment = max(load, default=0)

    # ----- who sends what (identical on every rank) ----------------------------------------------------------------

    def compute_ranks(self, unit: Unit) -> list[int]:
        return [t.rank for t in self.tasks[unit]]

    def update_moves(self):
        """``(piece, source, destination)``: pieces of the Newton-Schulz input a compute rank does not hold."""
        for unit in self.muon:
            for rank in self.compute_ranks(unit):
                for piece in self.pieces[unit]:
                    if self.home[piece] != rank:
                        yield piece, self.home[piece], rank

    def result_moves(self):
        """``(piece, source, destination)``: orthogonalized pieces sent back to a home that computed nothing."""
        for unit in self.muon:
            ranks = self.compute_ranks(unit)
            for piece in self.pieces[unit]:
                if self.home[piece] not in ranks:
                    yield piece, ranks[0], self.home[piece]

    def row_moves(self):
        """``(unit, task, destination)``: each split matrix's row blocks, sent to its other compute ranks after
        every product (the Gram rows, then the iterate's rows)."""
        for unit in self.muon:
            tasks = self.tasks[unit]
            if len(tasks) > 1:
                for task in tasks:
                    for other in tasks:
                        if other.rank != task.rank:
                            yield unit, task, other.rank

    @property
    def has_split(self) -> bool:
        return any(len(tasks) > 1 for tasks in self.tasks.values())

    # ----- accounting (per rank) -----------------------------------------------------------------------------------

    def ns_flops(self) -> list[int]:
        """Newton-Schulz FLOPs each rank computes for these units (base load excluded)."""
        flops = [0] * self.world
        for unit, tasks in self.tasks.items():
            for task in tasks:
                flops[task.rank] += unit.flops() * (task.hi - task.lo) // unit.ns_shape[0]
        return flops

    def state_bytes(self, element_bytes: int = 4) -> list[int]:
        """Optimizer-state bytes each rank holds: momentum (Muon), two moments and an fp64 step (AdamW), stored in
        ``element_bytes`` per element."""
        return [sum(element_bytes * (1 if p.unit.is_muon else 2) * p.numel + (0 if p.unit.is_muon else 8)
                    for p in pieces) for pieces in self.stored]

    def owned_numel(self) -> list[int]:
        """Elements each rank homes (its share of the fp32 master weights of a lower-precision model)."""
        return [sum(p.numel for p in pieces) for pieces in self.stored]

    def comm_bytes(self, reduce_bytes: int = 4, param_bytes: int = 4, both_directions: bool = False) -> list[int]:
        """Bytes each rank moves per step: the reduce-scatter input (``world x segment`` in the reduce dtype) and the
        all-gather output (the same in the parameters' dtype), ZeRO-1's convention, plus the larger of what it sends
        and what it receives in the compute-layout all-to-alls (links are full duplex: the busier direction sets the
        time). ``both_directions`` counts what a rank sends plus what it receives everywhere: twice the collectives'
        bytes (a rank sends and receives ``(world - 1) / world`` of each), plus both directions of the all-to-alls.
        """
        base = self.world * self.segment * (reduce_bytes + param_bytes) if self.world > 1 else 0
        sent, received = [0] * self.world, [0] * self.world
        for moves in (self.update_moves(), self.result_moves()):
            for piece, source, destination in moves:
                sent[source] += piece.numel * self.ns_bytes
                received[destination] += piece.numel * self.ns_bytes
        for unit, task, destination in self.row_moves():
            m, n = unit.ns_shape
            size = NS_STEPS * (task.hi - task.lo) * (m + n) * self.ns_bytes
            sent[task.rank] += size
            received[destination] += size
        if both_directions:
            return [2 * base + s + r for s, r in zip(sent, received)]
        return [base + max(s, r) for s, r in zip(sent, received)]

    def even_comm_bytes(self) -> int:
        """ZeRO-1 AdamW's bytes per rank with an even flat partition (DeepSpeed's ``ceil(total / world)``)."""
        total = sum(u.numel for u in self.units)
        return 2 * self.world * math.ceil(total / self.world) * 4 if self.world > 1 else 0
