"""ZeRO-1 distributed Muon + AdamW: optimizer state split over the data-parallel group, exact single-process math.

The layout of the work is planned by :mod:`optim.plan` (a pure function of shapes and the group size): parameters
are cut into units (whole Muon matrices, AdamW chunks) and units into storage pieces of at most ``PIECE``
elements, each with one home rank; every Muon matrix gets one or more compute ranks. One step is:

1. ``reduce_scatter`` of the gradients into equal rank segments: each rank receives the summed gradients of exactly
   the pieces it homes (segments differ by at most a piece: no padding to the largest matrix);
2. the global gradient norm from the owned segments (one all-reduce of a scalar), clipping;
3. AdamW on the homed AdamW pieces; Muon's momentum and Nesterov update on the homed Muon pieces (elementwise);
4. Newton-Schulz: a matrix whose pieces are all homed on its one compute rank (most of them) runs locally; pieces
   homed elsewhere travel to the compute ranks in one all-to-all (``ns_dtype``), a matrix split into row-block tasks
   swaps its Gram and iterate rows between its compute ranks after each product (one all-to-all per product for
   all split matrices at once), and results for homes that computed nothing travel back in one all-to-all;
5. every home applies weight decay and the scaled orthogonalized step to its pieces; ``all_gather`` of the updated
   segments into every rank's parameters.

Mixed precision: parameters may be bf16 (the model's compute dtype). Then each home keeps an fp32 master copy of
its pieces, and updates the master, never the bf16 parameter, which is the master rounded and all-gathered (in
bf16: half the bytes). Gradients accumulate over micro-batches in ``reduce_dtype`` (an fp32 ``main_grad`` beside
a bf16 parameter, filled by a post-accumulate hook, as Megatron does) and are reduce-scattered in it; or, with
``accumulate_sharded``, every micro-batch's gradients are reduce-scattered at once and accumulate in each rank's
``reduce_dtype`` segment, so no full-size fp32 gradient exists (FSDP2's way; one reduce-scatter per micro-batch).
The norm,
clipping and the update are fp32; Muon momentum and AdamW moments are stored in ``state_dtype`` and updated in fp32.

Every number a rank computes is computed as in one process (elementwise rules on pieces; Newton-Schulz row blocks
are full-length dot products of the same operands), so the result equals the single-process optimizer's. Piece keys
depend only on parameter names and shapes, never on the world size, so the state reshards: a checkpoint saved at one
data-parallel size loads at another (each rank reads the keys of the pieces it homes now).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn

from optim.muon import (
    AdamWHParams,
    MuonHParams,
    adamw_update_,
    muon_apply_,
    muon_momentum_,
    newton_schulz,
    ns_gram_rows,
    ns_prepare,
    ns_step_rows,
)
from optim.plan import Piece, Plan, Unit, build_units, build_units_all_adamw

__all__ = ["Partition", "Unit", "ZeroOptimizer", "build_units", "build_units_all_adamw", "shards_micro_batches"]


class Partition:
    """The units reduced and sharded over one process group: a :class:`~optim.plan.Plan` and its execution.

    Communication is bucketed: each collective moves about ``bucket_elements`` elements (``bucket_elements / world``
    of every rank's segment), so the temporary buffers stay bounded whatever the model and world sizes, and the
    packing of the next bucket overlaps the collective of the previous one (at most two in flight).

    Args:
        units: The units of this partition (the same list, in the same order, on every rank of ``group``).
        group: The process group (None: one process).
        bucket_elements: Elements of each collective (all ranks' slices together).
        base_flops: Newton-Schulz FLOPs each rank of ``group`` carries from another partition (its experts).
        ns_dtype: Newton-Schulz's dtype (what the compute-layout all-to-alls carry).
        reduce_dtype: The dtype of the gradient reduce-scatter.
    """

    def __init__(self, units: list[Unit], group: dist.ProcessGroup | None, bucket_elements: int = 1 << 24,
                 base_flops: list[int] | None = None, ns_dtype: torch.dtype = torch.bfloat16,
                 reduce_dtype: torch.dtype = torch.float32):
        if bucket_elements < 1:
            raise ValueError(f"bucket_elements must be >= 1, got {bucket_elements}")
        self.group = group
        # Buffers live where the parameters do (all units of a partition share one device and one dtype).
        self.device = units[0].param.device if units else torch.device("cpu")
        dtypes = sorted({str(u.param.dtype) for u in units})
        if len(dtypes) > 1:
            raise ValueError(f"the parameters of one partition must share a dtype; found {', '.join(dtypes)}")
        self.param_dtype = units[0].param.dtype if units else torch.float32
        self.reduce_dtype = reduce_dtype
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.plan = Plan(units, self.world, base_flops, ns_bytes=ns_dtype.itemsize)
        self.segment = self.plan.segment
        self.bucket_elements = max(1, bucket_elements // self.world)  # of each rank's segment
        self.layout = []  # each rank's pieces with their offset inside the rank's segment
        for pieces in self.plan.stored:
            offsets, offset = [], 0
            for piece in pieces:
                offsets.append((piece, offset))
                offset += piece.numel
            self.layout.append(offsets)
        self._route_moves()

    def _route_moves(self) -> None:
        """This rank's share of the plan's moves, each list in the plan's global order (so that what a sender
        packs for a destination is what the destination expects from it)."""
        me, plan = self.rank, self.plan
        self.update_send: dict[int, list[Piece]] = {}
        self.update_recv: dict[int, list[Piece]] = {}
        self.result_send: dict[int, list[Piece]] = {}
        self.result_recv: dict[int, list[Piece]] = {}
        self.row_send: dict[int, list[Unit]] = {}
        self.row_recv: dict[int, list[tuple[Unit, int, int]]] = {}
        self.any_update_move = self.any_result_move = False
        for sends, receives, moves, flag in ((self.update_send, self.update_recv, plan.update_moves(), "update"),
                                             (self.result_send, self.result_recv, plan.result_moves(), "result")):
            for piece, source, destination in moves:
                setattr(self, f"any_{flag}_move", True)
                if source == me:
                    sends.setdefault(destination, []).append(piece)
                if destination == me:
                    receives.setdefault(source, []).append(piece)
        for unit, task, destination in plan.row_moves():
            if task.rank == me:
                self.row_send.setdefault(destination, []).append(unit)
            if destination == me:
                self.row_recv.setdefault(task.rank, []).append((unit, task.lo, task.hi))
        self.my_task = {unit: task for unit, tasks in plan.tasks.items() for task in tasks if task.rank == me}
        self.returned = {piece for pieces in self.result_send.values() for piece in pieces}

    @property
    def mine(self) -> list[Piece]:
        return self.plan.stored[self.rank]

    def buckets(self) -> list[tuple[int, int]]:
        """``[lo, hi)`` element ranges of a segment, one per collective."""
        return [(lo, min(lo + self.bucket_elements, self.segment)) for lo in range(0, self.segment,
                                                                                   self.bucket_elements)]

    def _pieces(self, rank: int, lo: int, hi: int):
        """``(piece, start, stop, at)``: elements ``start:stop`` of ``piece`` sit at ``at`` in the bucket
        ``[lo, hi)``."""
        for piece, offset in self.layout[rank]:
            start, stop = max(lo, offset), min(hi, offset + piece.numel)
            if start < stop:
                yield piece, start - offset, stop - offset, start - lo

    def _pack(self, source, lo: int, hi: int, ranks, dtype: torch.dtype) -> torch.Tensor:
        """The ``[lo, hi)`` slice of the segments of ``ranks``, rank after rank, in ``dtype`` (padding stays
        zero)."""
        width = hi - lo
        flat = torch.zeros(len(ranks) * width, dtype=dtype, device=self.device)
        for index, rank in enumerate(ranks):
            base = index * width
            for piece, start, stop, at in self._pieces(rank, lo, hi):
                flat[base + at : base + at + stop - start] = source(piece)[start:stop]
        return flat

    def reduce_scatter_gradients(self) -> torch.Tensor:
        """The gradients of this rank's pieces, summed over the group in ``reduce_dtype`` (missing gradients count
        as zeros)."""
        def grad_of(piece: Piece) -> torch.Tensor:
            grad = accumulated_grad(piece.unit.param)
            if grad is None:  # e.g. an expert no local token chose
                return torch.zeros(piece.numel, device=self.device)
            return piece.view(grad)

        mine = torch.zeros(self.segment, dtype=self.reduce_dtype, device=self.device)
        everyone = range(self.world)
        pending: list = []
        for lo, hi in self.buckets():
            flat = self._pack(grad_of, lo, hi, everyone, self.reduce_dtype)
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
        """Copy every home's updated pieces into every rank's parameters (in the parameters' dtype)."""
        if self.world == 1:
            return
        for lo, hi in self.buckets():
            segment = self._pack(lambda piece: piece.view(piece.unit.param.data), lo, hi, [self.rank],
                                 self.param_dtype)
            gathered = torch.empty(self.world * (hi - lo), dtype=self.param_dtype, device=self.device)
            dist.all_gather_single(gathered, segment, group=self.group)
            for rank in range(self.world):
                if rank == self.rank:  # already up to date
                    continue
                base = rank * (hi - lo)
                for piece, start, stop, at in self._pieces(rank, lo, hi):
                    piece.view(piece.unit.param.data)[start:stop] = gathered[base + at : base + at + stop - start]

    # ----- Newton-Schulz in the compute layout ---------------------------------------------------------------------

    def _exchange(self, send: dict[int, list[torch.Tensor]], receive: dict[int, int],
                  dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """One ``all_to_all_single`` over the group: ``send[d]`` (concatenated) goes to rank ``d``; returns what
        each source sent here (``receive[s]`` elements). Every rank of the group must call it."""
        in_splits = [sum(t.numel() for t in send.get(r, [])) for r in range(self.world)]
        out_splits = [receive.get(r, 0) for r in range(self.world)]
        parts = [t.reshape(-1).to(dtype) for r in range(self.world) for t in send.get(r, [])]
        flat_in = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=self.device)
        flat_out = torch.empty(sum(out_splits), dtype=dtype, device=self.device)
        dist.all_to_all_single(flat_out, flat_in, out_splits, in_splits, group=self.group)
        return dict(zip(range(self.world), flat_out.split(out_splits)))

    def _share_rows(self, mine: dict[Unit, torch.Tensor], width, dtype: torch.dtype) -> dict[Unit, torch.Tensor]:
        """Assemble each split matrix's whole ``m x width(unit)`` block from this rank's rows and the other
        compute ranks' rows."""
        send = {d: [mine[u] for u in units] for d, units in self.row_send.items()}
        sizes = {s: sum((hi - lo) * width(u) for u, lo, hi in blocks) for s, blocks in self.row_recv.items()}
        received = self._exchange(send, sizes, dtype)
        whole = {}
        for unit, rows in mine.items():
            task = self.my_task[unit]
            whole[unit] = torch.empty(unit.ns_shape[0], width(unit), dtype=dtype, device=self.device)
            whole[unit][task.lo : task.hi] = rows
        for source, blocks in self.row_recv.items():
            offset = 0
            for unit, lo, hi in blocks:
                size = (hi - lo) * width(unit)
                whole[unit][lo:hi] = received[source][offset : offset + size].view(hi - lo, width(unit))
                offset += size
        return whole

    def orthogonalize(self, updates: dict[Piece, torch.Tensor], hp: MuonHParams) -> dict[Piece, torch.Tensor]:
        """Newton-Schulz of every Muon matrix from its pieces' updates (``ns_dtype``, keyed by the pieces this rank
        homes); returns the orthogonalized pieces this rank homes. Every rank of the group must call it."""
        plan, dtype = self.plan, hp.ns_dtype
        received: dict[Piece, torch.Tensor] = {}
        if self.world > 1 and self.any_update_move:
            send = {d: [updates[p] for p in pieces] for d, pieces in self.update_send.items()}
            out = self._exchange(send, {s: sum(p.numel for p in ps) for s, ps in self.update_recv.items()}, dtype)
            for source, pieces in self.update_recv.items():
                received.update(zip(pieces, out[source].split([p.numel for p in pieces])))

        def whole_update(unit: Unit) -> torch.Tensor:
            flat = torch.empty(unit.numel, dtype=dtype, device=self.device)
            for piece in plan.pieces[unit]:
                flat[piece.start : piece.stop] = updates[piece] if piece in updates else received[piece]
            return flat.view(unit.matrix_shape)

        results: dict[Piece, torch.Tensor] = {}
        outgoing: dict[Piece, torch.Tensor] = {}

        def keep(unit: Unit, ortho: torch.Tensor) -> None:
            flat = ortho.reshape(-1)
            for piece in plan.pieces[unit]:
                if piece in updates:
                    results[piece] = flat[piece.start : piece.stop]
                elif piece in self.returned:
                    outgoing[piece] = flat[piece.start : piece.stop]

        # Split matrices: every product's rows are swapped between their compute ranks, all matrices at once.
        split = {u: ns_prepare(whole_update(u), hp) for u in self.my_task if len(plan.tasks[u]) > 1}
        if self.world > 1 and plan.has_split:
            xs = {u: x for u, (x, _) in split.items()}
            for _ in range(hp.ns_steps):
                grams = self._share_rows({u: ns_gram_rows(x, self.my_task[u].lo, self.my_task[u].hi)
                                          for u, x in xs.items()}, lambda u: u.ns_shape[0], dtype)
                xs = self._share_rows({u: ns_step_rows(x, grams[u], self.my_task[u].lo, self.my_task[u].hi, hp)
                                       for u, x in xs.items()}, lambda u: u.ns_shape[1], dtype)
            for unit, (_, transposed) in split.items():
                keep(unit, xs[unit].T if transposed else xs[unit])
        # Whole matrices, one at a time (bounded memory).
        for unit in self.my_task:
            if len(plan.tasks[unit]) == 1:
                keep(unit, newton_schulz(whole_update(unit), hp))
        if self.world > 1 and self.any_result_move:
            send = {d: [outgoing[p] for p in pieces] for d, pieces in self.result_send.items()}
            out = self._exchange(send, {s: sum(p.numel for p in ps) for s, ps in self.result_recv.items()}, dtype)
            for source, pieces in self.result_recv.items():
                results.update(zip(pieces, out[source].split([p.numel for p in pieces])))
        return results

    def communication_bytes(self) -> int:
        return self.plan.comm_bytes(self.reduce_dtype.itemsize, self.param_dtype.itemsize)[self.rank]


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
        bucket_elements: Elements of each reduce-scatter / all-gather, all ranks together (bounds temporary memory
            whatever the world size).
        reduce_dtype: Gradients accumulate over micro-batches and are reduce-scattered in this dtype.
        state_dtype: Storage dtype of Muon momentum and AdamW moments (updated in fp32 either way).
        accumulate_sharded: The caller runs :meth:`accumulate` between micro-batches (see the module docstring).
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, use_muon: bool = True,
                 muon: MuonHParams | None = None, adamw: AdamWHParams | None = None,
                 group: dist.ProcessGroup | None = None, expert_group: dist.ProcessGroup | None = None,
                 norm_group: dist.ProcessGroup | None = None, bucket_elements: int = 1 << 24,
                 reduce_dtype: torch.dtype = torch.float32, state_dtype: torch.dtype = torch.float32,
                 accumulate_sharded: bool = False):
        self.lr = lr
        self.accumulate_sharded = accumulate_sharded
        self._accumulated: list[torch.Tensor] | None = None
        self.reduce_dtype, self.state_dtype = reduce_dtype, state_dtype
        self.weight_decay = weight_decay
        self.muon = muon or MuonHParams()
        self.adamw = adamw or AdamWHParams()
        self.norm_group = norm_group if norm_group is not None else group
        self.units = build_units(model) if use_muon else build_units_all_adamw(model)
        dense = [u for u in self.units if not u.route.per_expert]
        experts = [u for u in self.units if u.route.per_expert]
        self.partitions = []
        base = None
        if experts:
            expert_group = expert_group if expert_group is not None else group
            self.partitions.append(Partition(experts, expert_group, bucket_elements, ns_dtype=self.muon.ns_dtype,
                                             reduce_dtype=reduce_dtype))
            base = _expert_base_flops(self.partitions[0], group, expert_group)
        self.partitions.insert(0, Partition(dense, group, bucket_elements, base, ns_dtype=self.muon.ns_dtype,
                                            reduce_dtype=reduce_dtype))
        self.params = list(dict.fromkeys(u.param for u in self.units))
        if not accumulate_sharded:
            for param in self.params:
                _maybe_accumulate_main_grad(param, reduce_dtype)
        self.state = {p.key: self._fresh_state(p) for p in self.owned_pieces()}
        # fp32 master weights of the owned pieces of lower-precision parameters (fp32 parameters are their own).
        self.master = {p.key: p.view(p.unit.param.data).float().clone() for p in self.owned_pieces()
                       if p.unit.param.dtype != torch.float32}
        # AdamW's step count mirrored on the host: its bias correction is a Python scalar, read without waiting
        # for the device (the tensor in ``state`` is what checkpoints hold).
        self._adamw_steps = {key: 0 for key, state in self.state.items() if "step" in state}

    def owned_pieces(self) -> list[Piece]:
        """The pieces whose optimizer state lives on this rank."""
        return [piece for partition in self.partitions for piece in partition.mine]

    def _fresh_state(self, piece: Piece) -> dict[str, torch.Tensor]:
        zeros = torch.zeros(piece.numel, dtype=self.state_dtype, device=piece.unit.param.device)
        if piece.unit.is_muon:
            return {"momentum": zeros}
        return {"exp_avg": zeros, "exp_avg_sq": zeros.clone(),
                "step": torch.zeros((), dtype=torch.float64, device=piece.unit.param.device)}

    # ----- the step ------------------------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None
            param.main_grad = None

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

    def accumulate(self) -> None:
        """Between micro-batches (``accumulate_sharded``): reduce-scatter the gradients of the micro-batch just done
        into this rank's segments, in ``reduce_dtype``, and drop the local ones. Every rank of the groups calls it."""
        if not self.accumulate_sharded:
            raise RuntimeError("accumulate() needs ZeroOptimizer(accumulate_sharded=True)")
        grads = [partition.reduce_scatter_gradients() for partition in self.partitions]
        if self._accumulated is None:
            self._accumulated = grads
        else:
            for total, grad in zip(self._accumulated, grads, strict=True):
                total.add_(grad)
        for param in self.params:
            param.grad = None

    def reduce_gradients(self) -> list[torch.Tensor]:
        """Each partition's gradients of the units this rank owns, summed over its group (and over the micro-batches
        :meth:`accumulate` reduced already), in fp32."""
        grads = [partition.reduce_scatter_gradients() for partition in self.partitions]
        if self._accumulated is not None:
            grads = [total.add_(grad) for total, grad in zip(self._accumulated, grads, strict=True)]
            self._accumulated = None
        return [grad.float() for grad in grads]

    def global_squared_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The squared global gradient norm (fp64, on the device): every unit is owned exactly once in the world."""
        total = sum(g.double().pow(2).sum() for g in grads)
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(total, group=self.norm_group)
        return total

    def apply_updates(self, grads: list[torch.Tensor], squared_norm: torch.Tensor, max_grad_norm: float) -> None:
        """Clip (``clip_grad_norm_``'s rule, as a device scalar: no wait), update the homed pieces (Newton-Schulz in
        the compute layout) and all-gather them into every rank's parameters."""
        coefficient = None
        if max_grad_norm > 0:
            coefficient = (max_grad_norm / (squared_norm.sqrt() + 1e-6)).clamp(max=1.0).float()
        for partition, grad in zip(self.partitions, grads):
            if coefficient is not None:
                grad.mul_(coefficient)
            updates = {}
            for piece, offset in partition.layout[partition.rank]:
                piece_grad = grad[offset : offset + piece.numel]
                if piece.unit.is_muon:
                    with _in_fp32(self.state[piece.key]["momentum"]) as (momentum,):
                        update = muon_momentum_(piece_grad, momentum, self.muon)
                        updates[piece] = update.to(self.muon.ns_dtype)
                else:
                    self._adamw(piece, piece_grad)
            orthogonalized = partition.orthogonalize(updates, self.muon)
            for piece in updates:
                decay = self.weight_decay if piece.unit.route.weight_decay else 0.0
                muon_apply_(self._weights(piece), orthogonalized[piece], self.lr, decay, piece.unit.matrix_shape)
                self._round_into_parameter(piece)
            partition.all_gather_parameters()

    @torch.no_grad()
    def take_parameters_as_masters(self) -> None:
        """Set the fp32 masters to the parameters' current values: after weights are loaded into the model from
        elsewhere than this optimizer's state (a stage's ``init_from``), which would otherwise leave the masters at
        the values the parameters had when the optimizer was built."""
        for piece in self.owned_pieces():
            master = self.master.get(piece.key)
            if master is not None:
                master.copy_(piece.view(piece.unit.param.data))

    def _weights(self, piece: Piece) -> torch.Tensor:
        """What the update changes: the fp32 master of a lower-precision parameter's piece, else the piece itself."""
        master = self.master.get(piece.key)
        return master if master is not None else piece.view(piece.unit.param.data)

    def _round_into_parameter(self, piece: Piece) -> None:
        master = self.master.get(piece.key)
        if master is not None:
            piece.view(piece.unit.param.data).copy_(master)

    def _adamw(self, piece: Piece, grad: torch.Tensor) -> None:
        state = self.state[piece.key]
        decay = self.weight_decay if piece.unit.route.weight_decay else 0.0
        state["step"] += 1
        self._adamw_steps[piece.key] += 1
        with _in_fp32(state["exp_avg"], state["exp_avg_sq"]) as (exp_avg, exp_avg_sq):
            adamw_update_(self._weights(piece), grad, exp_avg, exp_avg_sq, self._adamw_steps[piece.key], self.lr,
                          decay, self.adamw)
        self._round_into_parameter(piece)

    def _non_finite_names(self, grads: list[torch.Tensor]) -> list[str]:
        bad = []
        for partition, grad in zip(self.partitions, grads):
            for piece, offset in partition.layout[partition.rank]:
                if not torch.isfinite(grad[offset : offset + piece.numel]).all():
                    bad.append(piece.unit.route.name)
        group = self.norm_group
        if group is not None and dist.get_world_size(group) > 1:
            everyone: list[list[str]] = [[] for _ in range(dist.get_world_size(group))]
            dist.all_gather_object(everyone, bad, group=group)
            bad = [name for names in everyone for name in names]
        return sorted(set(bad))

    # ----- accounting and state ------------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (moments and momentum, without master weights)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())

    def master_bytes(self) -> int:
        """Bytes of fp32 master weights this rank holds (none when the parameters are fp32)."""
        return sum(t.numel() * t.element_size() for t in self.master.values())

    def communication_bytes(self) -> int:
        """Bytes one step moves on this rank (see :meth:`optim.plan.Plan.comm_bytes`)."""
        return sum(partition.communication_bytes() for partition in self.partitions)

    def ns_flops(self) -> int:
        """Newton-Schulz FLOPs this rank computes per step."""
        return sum(partition.plan.ns_flops()[partition.rank] for partition in self.partitions)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state of the pieces this rank owns with their fp32 master weights (``master``: the reshardable truth
        of the parameters, whatever their dtype), keyed by layout-independent piece keys (reshardable with DCP)."""
        pieces = {piece.key: piece for piece in self.owned_pieces()}
        return {key: {**state, "master": self.master[key] if key in self.master
                      else pieces[key].view(pieces[key].unit.param.data).clone()}
                for key, state in self.state.items()}

    def load_state_dict(self, state_dict: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load the owned pieces' state and master weights; the masters overwrite the parameters (rounded to their
        dtype), which are then all-gathered: load the model first, then this (every rank of the groups calls it).
        """
        masters = {}
        for key in self.state:
            loaded = state_dict.get(key, {}).get("master")
            if loaded is None:
                raise KeyError(f"optimizer state has no master weights for '{key}': it was saved for another model "
                               "or by a version without them")
            masters[key] = loaded
        self._load_moments(state_dict)
        for piece in self.owned_pieces():
            if piece.key in self.master:
                if masters[piece.key] is not self.master[piece.key]:
                    self.master[piece.key].copy_(masters[piece.key])
                self._round_into_parameter(piece)
            else:
                piece.view(piece.unit.param.data).copy_(masters[piece.key])
        with torch.no_grad():
            for partition in self.partitions:
                partition.all_gather_parameters()

    def _load_moments(self, state_dict: dict[str, dict[str, torch.Tensor]]) -> None:
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



def shards_micro_batches(param_dtype: torch.dtype, reduce_dtype: torch.dtype, pipelined: bool) -> bool:
    """Whether a run accumulates its micro-batches sharded (:meth:`ZeroOptimizer.accumulate`): when gradients are
    reduced in a wider dtype than the parameters', so that no full-size wide gradient exists. A pipeline schedule
    runs its micro-batches inside one call, so it accumulates in ``main_grad`` instead."""
    return reduce_dtype.itemsize > param_dtype.itemsize and not pipelined


def accumulated_grad(param: torch.Tensor) -> torch.Tensor | None:
    """A parameter's gradient summed over the micro-batches: its ``main_grad`` (in the reduce dtype) when it has one,
    with any gradient autograd left in ``grad`` outside the hook (e.g. a pipeline's weight pass) added in."""
    main = getattr(param, "main_grad", None)
    if main is None:
        return param.grad
    if param.grad is not None:
        main.add_(param.grad)
        param.grad = None
    return main


def _maybe_accumulate_main_grad(param: nn.Parameter, dtype: torch.dtype) -> None:
    """Hook ``param`` so its gradients add up in ``main_grad`` (``dtype``) when ``dtype`` is wider than the
    parameter's. One hook per parameter, whatever number of optimizers (one per stage) it has seen."""
    hooked = getattr(param, "main_grad_dtype", None)
    if hooked is not None:
        if hooked != dtype:
            raise ValueError(f"a parameter accumulates gradients in {hooked} already; asked for {dtype}")
        return
    if param.requires_grad and param.dtype.itemsize < dtype.itemsize:
        param.register_post_accumulate_grad_hook(functools.partial(_accumulate_main_grad, dtype=dtype))
        param.main_grad_dtype = dtype


def _accumulate_main_grad(param: torch.Tensor, dtype: torch.dtype) -> None:
    """Move a freshly accumulated ``grad`` into ``main_grad`` (``dtype``), so micro-batches add up at its
    precision, not the parameter's."""
    if param.grad is None:
        return
    if getattr(param, "main_grad", None) is None:
        param.main_grad = param.grad.to(dtype)
    else:
        param.main_grad.add_(param.grad)
    param.grad = None


@contextlib.contextmanager
def _in_fp32(*tensors: torch.Tensor):
    """fp32 working copies of ``tensors`` (the tensors themselves when already fp32), written back on exit."""
    work = tuple(t.float() for t in tensors)
    yield work
    for tensor, copy in zip(tensors, work):
        if copy is not tensor:
            tensor.copy_(copy)


def _expert_base_flops(experts: Partition, group: dist.ProcessGroup | None,
                       expert_group: dist.ProcessGroup | None) -> list[int] | None:
    """Each dense rank's expert Newton-Schulz FLOPs, so that the dense plan fills around them.

    Every expert-data group holds the same shapes, so it has the same plan; rank ``r`` of the dense group is rank
    ``r // ep`` of its expert-data group in :class:`parallel.dims.ParallelDims`' layout (expert-parallel groups of
    ``ep`` consecutive dense ranks). Another layout gets no base load (the plans stay consistent either way: the
    check is agreed on by every dense rank)."""
    if group is None or expert_group is None:
        return None
    world, expert_world = dist.get_world_size(group), dist.get_world_size(expert_group)
    if world == expert_world or world % expert_world:
        return None
    ep = world // expert_world
    regular = torch.tensor([int(dist.get_rank(expert_group) == dist.get_rank(group) // ep)])
    dist.all_reduce(regular, op=dist.ReduceOp.MIN, group=group)
    if not int(regular):
        return None
    flops = experts.plan.ns_flops()
    return [flops[r // ep] for r in range(world)]
