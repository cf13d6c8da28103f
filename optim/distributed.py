"""ZeRO-1 distributed Muon + AdamW: optimizer state split over the data-parallel group, exact single-process math.

Design: **whole-matrix ownership with load balancing** (rather than "Muon is Scalable" Algorithm 1's element
partition plus a gather of each matrix for Newton-Schulz). The parameters are cut into *units*:

* a Muon unit is one whole matrix (each expert's matrix of a stacked expert tensor on its own);
* an AdamW unit is a fixed chunk of at most ``ADAMW_CHUNK`` elements of a flattened tensor (AdamW is
  elementwise, so it can be cut anywhere).

Every unit has exactly one owner rank. Muon units are dealt largest-first to the rank with the fewest Newton-Schulz
FLOPs so far; AdamW chunks then fill the ranks with the fewest elements, which evens out the bytes. Each rank's units
form one segment of a flat buffer (padded to the longest segment), so one step is:

1. ``reduce_scatter`` of the gradients: each rank receives the summed gradients of exactly the units it owns;
2. the global gradient norm from the owned segments (one all-reduce of a scalar), clipping;
3. each owner applies Muon (the whole matrix is local: no gather for Newton-Schulz) or AdamW to its units;
4. ``all_gather`` of the updated segments into every rank's parameters.

That moves the same bytes as ZeRO-1 AdamW (a reduce-scatter and an all-gather of all parameters), up to the
padding of the longest segment, where Algorithm 1 needs an extra gather per Muon matrix. Unit keys depend only on
parameter names and shapes, never on the world size, so the state reshards: a checkpoint saved at one data-parallel
size loads at another (each rank reads the keys of the units it owns now).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from optim.build import ADAMW, MUON, Route, route_parameters
from optim.muon import AdamWHParams, MuonHParams, adamw_update_, muon_update_, newton_schulz_flops

# AdamW chunk size (elements): small enough to balance bytes across ranks, large enough to keep few units.
ADAMW_CHUNK = 1 << 18


@dataclass
class Unit:
    """One independently optimized piece of a parameter."""

    key: str
    route: Route
    param: nn.Parameter
    expert: int | None = None  # Muon: index along dim 0 of a stacked expert tensor
    start: int = 0  # AdamW: element range of the flattened parameter
    stop: int = 0

    @property
    def numel(self) -> int:
        if self.route.rule == ADAMW:
            return self.stop - self.start
        return self.matrix_shape[0] * self.matrix_shape[1]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        shape = self.route.shape[1:] if self.expert is not None else self.route.shape
        return shape[0], int(torch.Size(shape[1:]).numel())

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This unit's part of a parameter-shaped tensor (the parameter, its gradient): a view, never a copy."""
        if self.route.rule == ADAMW:
            return tensor.view(-1)[self.start : self.stop]
        matrix = tensor[self.expert] if self.expert is not None else tensor
        return matrix.view(self.matrix_shape)

    def flops(self) -> int:
        return newton_schulz_flops(*self.matrix_shape) if self.route.rule == MUON else 0


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
    return [Unit(f"{route.name}@{i}", route, param, start=s, stop=min(s + ADAMW_CHUNK, numel))
            for i, s in enumerate(range(0, numel, ADAMW_CHUNK))]


def build_units_all_adamw(model: nn.Module) -> list[Unit]:
    """Units for plain ZeRO-1 AdamW: every parameter chunked as AdamW (the baseline Muon is compared with)."""
    params = dict(model.named_parameters())
    return [unit for route in route_parameters(model)
            for unit in adamw_chunks(Route(route.name, route.shape, ADAMW, weight_decay=route.weight_decay),
                                     params[route.name])]


def assign_owners(units: list[Unit], world: int) -> list[list[Unit]]:
    """Deal units to ranks: Muon by Newton-Schulz FLOPs (largest first), then AdamW chunks by elements."""
    owned: list[list[Unit]] = [[] for _ in range(world)]
    flops = [0] * world
    elements = [0] * world
    muon = sorted((u for u in units if u.route.rule == MUON), key=lambda u: (-u.flops(), u.key))
    for unit in muon:
        rank = min(range(world), key=lambda r: (flops[r], elements[r], r))
        owned[rank].append(unit)
        flops[rank] += unit.flops()
        elements[rank] += unit.numel
    adamw = sorted((u for u in units if u.route.rule == ADAMW), key=lambda u: (-u.numel, u.key))
    for unit in adamw:
        rank = min(range(world), key=lambda r: (elements[r], r))
        owned[rank].append(unit)
        elements[rank] += unit.numel
    return owned


class Partition:
    """The units reduced and sharded over one process group, laid out as one flat buffer of equal rank segments.

    Communication is bucketed: the segments are processed ``bucket_elements`` at a time (each collective moves
    ``world x bucket`` elements), so the temporary buffers stay bounded whatever the model size, and the packing of
    the next bucket overlaps the collective of the previous one (at most two in flight).

    Args:
        units: The units of this partition.
        group: The process group (None: one process).
        bucket_elements: Elements of each rank's segment per collective.
    """

    def __init__(self, units: list[Unit], group: dist.ProcessGroup | None, bucket_elements: int = 1 << 24):
        if bucket_elements < 1:
            raise ValueError(f"bucket_elements must be >= 1, got {bucket_elements}")
        self.group = group
        # Buffers live where the parameters do (all units of a partition share one device).
        self.device = units[0].param.device if units else torch.device("cpu")
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.owned = assign_owners(units, self.world)
        self.segment = max((sum(u.numel for u in rank_units) for rank_units in self.owned), default=0)
        self.bucket_elements = bucket_elements
        # Each rank's units with their offset inside the rank's segment.
        self.layout = []
        for rank_units in self.owned:
            offsets, offset = [], 0
            for unit in rank_units:
                offsets.append((unit, offset))
                offset += unit.numel
            self.layout.append(offsets)

    @property
    def mine(self) -> list[Unit]:
        return self.owned[self.rank]

    def buckets(self) -> list[tuple[int, int]]:
        """``[lo, hi)`` element ranges of a segment, one per collective."""
        return [(lo, min(lo + self.bucket_elements, self.segment)) for lo in range(0, self.segment,
                                                                                   self.bucket_elements)]

    def _pieces(self, rank: int, lo: int, hi: int):
        """``(unit, start, stop, at)``: elements ``start:stop`` of ``unit`` sit at ``at`` in the bucket ``[lo, hi)``."""
        for unit, offset in self.layout[rank]:
            start, stop = max(lo, offset), min(hi, offset + unit.numel)
            if start < stop:
                yield unit, start - offset, stop - offset, start - lo

    def _pack(self, source, lo: int, hi: int, ranks) -> torch.Tensor:
        """The ``[lo, hi)`` slice of the segments of ``ranks``, rank after rank (padding stays zero)."""
        width = hi - lo
        flat = torch.zeros(len(ranks) * width, dtype=torch.float32, device=self.device)
        for index, rank in enumerate(ranks):
            base = index * width
            for unit, start, stop, at in self._pieces(rank, lo, hi):
                flat[base + at : base + at + stop - start] = source(unit).reshape(-1)[start:stop]
        return flat

    def reduce_scatter_gradients(self) -> torch.Tensor:
        """The gradients of this rank's units, summed over the group (missing gradients count as zeros)."""
        def grad_of(unit: Unit) -> torch.Tensor:
            if unit.param.grad is None:  # e.g. an expert no local token chose
                return torch.zeros(unit.numel, device=self.device)
            return unit.view(unit.param.grad)

        mine = torch.zeros(self.segment, dtype=torch.float32, device=self.device)
        everyone = range(self.world)
        pending: list = []
        for lo, hi in self.buckets():
            flat = self._pack(grad_of, lo, hi, everyone)
            if self.world == 1:
                mine[lo:hi] = flat
                continue
            pending.append(dist.reduce_scatter_single(mine[lo:hi], flat, group=self.group, async_op=True))
            if len(pending) > 1:  # keep at most two buckets in flight
                pending.pop(0).wait()
        for work in pending:
            work.wait()
        return mine

    def all_gather_parameters(self) -> None:
        """Copy every owner's updated units into every rank's parameters."""
        if self.world == 1:
            return
        for lo, hi in self.buckets():
            segment = self._pack(lambda unit: unit.view(unit.param.data), lo, hi, [self.rank])
            gathered = torch.empty(self.world * (hi - lo), dtype=torch.float32, device=self.device)
            dist.all_gather_single(gathered, segment, group=self.group)
            for rank in range(self.world):
                if rank == self.rank:  # already up to date
                    continue
                base = rank * (hi - lo)
                for unit, start, stop, at in self._pieces(rank, lo, hi):
                    target = unit.view(unit.param.data).reshape(-1)
                    target[start:stop] = gathered[base + at : base + at + stop - start]

    def communication_bytes(self) -> int:
        return 2 * self.world * self.segment * 4 if self.world > 1 else 0


class ZeroOptimizer:
    """Muon for matrices and AdamW for the rest, with optimizer state sharded ZeRO-1 style.

    Gradients on entry are each rank's local gradients of its share of the loss (the trainer scales by the global
    token count); :meth:`step` sums them over the groups. With no groups it is the single-process optimizer.

    Args:
        model: The model; its trainable parameters are optimized (frozen ones are never touched).
        lr: Initial learning rate (the trainer sets ``optimizer.lr`` every step).
        weight_decay: Decoupled weight decay of matrices and embeddings (not of vectors and scalars).
        use_muon: False puts every parameter on AdamW (plain ZeRO-1 AdamW).
        muon: Muon hyper-parameters; adamw: AdamW hyper-parameters.
        group: The group dense parameters are replicated over (data x context ranks), or None for one process.
        expert_group: The group holding the same routed experts (the expert-data group: data x context ranks
            divided by expert parallelism); defaults to ``group``.
        norm_group: The group whose owned units together cover every parameter exactly once (the whole world,
            pipeline stages included), for the global gradient norm; defaults to ``group``.
        bucket_elements: Elements of a rank's segment per reduce-scatter / all-gather (bounds temporary memory).
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, use_muon: bool = True,
                 muon: MuonHParams | None = None, adamw: AdamWHParams | None = None,
                 group: dist.ProcessGroup | None = None, expert_group: dist.ProcessGroup | None = None,
                 norm_group: dist.ProcessGroup | None = None, bucket_elements: int = 1 << 24):
        self.lr = lr
        self.weight_decay = weight_decay
        self.muon = muon or MuonHParams()
        self.adamw = adamw or AdamWHParams()
        self.norm_group = norm_group if norm_group is not None else group
        self.units = build_units(model) if use_muon else build_units_all_adamw(model)
        dense = [u for u in self.units if not u.route.per_expert]
        experts = [u for u in self.units if u.route.per_expert]
        self.partitions = [Partition(dense, group, bucket_elements)]
        if experts:
            self.partitions.append(Partition(experts, expert_group if expert_group is not None else group,
                                             bucket_elements))
        self.params = list(dict.fromkeys(u.param for u in self.units))
        self.state = {u.key: self._fresh_state(u) for u in self.owned_units()}
        # AdamW's step count mirrored on the host: its bias correction is a Python scalar, read without waiting
        # for the device (the tensor in ``state`` is what checkpoints hold).
        self._adamw_steps = {key: 0 for key, state in self.state.items() if "step" in state}

    def owned_units(self) -> list[Unit]:
        """The units whose optimizer state lives on this rank."""
        return [unit for partition in self.partitions for unit in partition.mine]

    def _fresh_state(self, unit: Unit) -> dict[str, torch.Tensor]:
        zeros = torch.zeros(unit.numel, dtype=torch.float32, device=unit.param.device)
        if unit.route.rule == MUON:
            return {"momentum": zeros.view(unit.matrix_shape)}
        return {"exp_avg": zeros, "exp_avg_sq": zeros.clone(),
                "step": torch.zeros((), dtype=torch.float64, device=unit.param.device)}

    # ----- the step ------------------------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, max_grad_norm: float = 0.0) -> float:
        """Reduce gradients, clip them to ``max_grad_norm`` (0: no clipping), update, and share the new parameters.

        Raises:
            FloatingPointError: A gradient is not finite (raised before any parameter changes).

        Returns:
            The global gradient norm before clipping.
        """
        grads = self.reduce_gradients()
        squared_norm = self.global_squared_norm(grads)
        if not torch.isfinite(squared_norm):  # the step's one wait for the device
            raise FloatingPointError(f"non-finite gradients in: {', '.join(self._non_finite_names(grads))}")
        self.apply_updates(grads, squared_norm, max_grad_norm)
        return float(squared_norm.sqrt())

    def reduce_gradients(self) -> list[torch.Tensor]:
        """Each partition's gradients of the units this rank owns, summed over its group."""
        return [partition.reduce_scatter_gradients() for partition in self.partitions]

    def global_squared_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The squared global gradient norm (fp64, on the device): every unit is owned exactly once in the world."""
        total = sum(g.double().pow(2).sum() for g in grads)
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(total, group=self.norm_group)
        return total

    def apply_updates(self, grads: list[torch.Tensor], squared_norm: torch.Tensor, max_grad_norm: float) -> None:
        """Clip (``clip_grad_norm_``'s rule, as a device scalar: no wait), update the owned units and all-gather
        them into every rank's parameters."""
        coefficient = None
        if max_grad_norm > 0:
            coefficient = (max_grad_norm / (squared_norm.sqrt() + 1e-6)).clamp(max=1.0).float()
        for partition, grad in zip(self.partitions, grads):
            if coefficient is not None:
                grad.mul_(coefficient)
            offset = 0
            for unit in partition.mine:
                self._apply(unit, grad[offset : offset + unit.numel])
                offset += unit.numel
            partition.all_gather_parameters()

    def _apply(self, unit: Unit, grad: torch.Tensor) -> None:
        state = self.state[unit.key]
        target = unit.view(unit.param.data)
        decay = self.weight_decay if unit.route.weight_decay else 0.0
        if unit.route.rule == MUON:
            muon_update_(target, grad.view(unit.matrix_shape), state["momentum"], self.lr, decay, self.muon)
        else:
            state["step"] += 1
            self._adamw_steps[unit.key] += 1
            adamw_update_(target, grad, state["exp_avg"], state["exp_avg_sq"], self._adamw_steps[unit.key], self.lr,
                          decay, self.adamw)

    def _non_finite_names(self, grads: list[torch.Tensor]) -> list[str]:
        bad = []
        for partition, grad in zip(self.partitions, grads):
            offset = 0
            for unit in partition.mine:
                if not torch.isfinite(grad[offset : offset + unit.numel]).all():
                    bad.append(unit.route.name)
                offset += unit.numel
        group = self.norm_group
        if group is not None and dist.get_world_size(group) > 1:
            everyone: list[list[str]] = [[] for _ in range(dist.get_world_size(group))]
            dist.all_gather_object(everyone, bad, group=group)
            bad = [name for names in everyone for name in names]
        return sorted(set(bad))

    # ----- accounting and state ------------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())

    def communication_bytes(self) -> int:
        """Bytes one step hands to collectives on this rank (reduce-scatter input + all-gather output)."""
        return sum(partition.communication_bytes() for partition in self.partitions)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state of the units this rank owns, keyed by layout-independent unit keys (reshardable with DCP)."""
        return self.state

    def load_state_dict(self, state_dict: dict[str, dict[str, torch.Tensor]]) -> None:
        for key, fresh in self.state.items():
            if key not in state_dict:
                raise KeyError(f"optimizer state has no entry for '{key}': it was saved for another model")
            for name, tensor in fresh.items():
                loaded = state_dict[key].get(name)
                if loaded is None or tuple(loaded.shape) != tuple(tensor.shape):
                    got = None if loaded is None else list(loaded.shape)
                    raise ValueError(f"optimizer state '{key}.{name}' has shape {got}, expected "
                                     f"{list(tensor.shape)}: it was saved for another model")
                if loaded is not tensor:
                    tensor.copy_(loaded)
            if key in self._adamw_steps:
                self._adamw_steps[key] = int(fresh["step"])

