"""Mixed-precision ZeRO-1: bf16 parameters, fp32 masters on the owning rank, fp32 gradient accumulation.

* forked gloo ranks (dp2, dp4) equal one process, master weights within 1e-6 over 20 steps with clipping active;
* DeepSpeed's bf16 optimizer (``bf16`` + ZeRO stage 1: fp32 master partitions, fp32 gradient accumulation) gives
  the same training as ours: an implementation we did not write;
* checkpoints hold the fp32 masters: a bf16 run resumes bit-exactly, a bf16 checkpoint loads into an fp32 run and
  the reverse, each side getting the other's exact master values.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from optim.distributed import ZeroOptimizer
from optim.muon import AdamWHParams, MuonHParams
from tests.dist.test_zero_optimizer import mixed_model
from tests.dist.test_zero_vs_deepspeed import deepspeed_zero1, loss_of, make_model
from tests.forked import run_ranks

LR, WD, CLIP, STEPS, MICRO = 0.01, 0.1, 0.5, 20, 3
MUON = MuonHParams(ns_dtype=torch.float32)


def bf16_model() -> nn.Module:
    model = mixed_model()
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model


def micro_batch_grads(model: nn.Module, step: int, rank: int, micro: int) -> None:
    """Backward of ``sum(param * g)`` so the gradient ``g`` arrives through autograd (the accumulation hook). ``g`` is
    dyadic with 6 significant bits: exact in bf16, and any sum of a few of them exact in fp32, so the order of
    accumulation and reduction cannot blur the comparison."""
    generator = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    loss = sum((param.float() * (torch.randint(-32, 32, param.shape, generator=generator) / 256)).sum()
               for param in model.parameters())
    loss.backward()


def masters_by_name(optimizer: ZeroOptimizer) -> dict[str, tuple[str, int, int, torch.Tensor]]:
    """This rank's master pieces: ``{piece key: (parameter name, start, stop in the flattened parameter, fp32
    values)}``."""
    state = optimizer.state_dict()
    pieces = {}
    for piece in optimizer.owned_pieces():
        unit = piece.unit
        base = unit.start + (unit.expert * unit.numel if unit.expert is not None else 0)
        pieces[piece.key] = (unit.route.name, base + piece.start, base + piece.stop, state[piece.key]["master"].clone())
    return pieces


def assemble(pieces: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole flattened fp32 parameters from master pieces (NaN where no piece landed)."""
    whole = {name: torch.full((p.numel(),), float("nan")) for name, p in model.named_parameters()}
    for name, start, stop, values in pieces.values():
        whole[name][start:stop] = values
    return whole


def train_bf16(rank: int, world: int, steps: int, sharded: bool = False) -> dict:
    model = bf16_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, muon=MUON,
                              group=dist.group.WORLD if world > 1 else None, accumulate_sharded=sharded)
    norms, full_size_fp32 = [], []
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(MICRO):
            if micro and sharded:
                optimizer.accumulate()
            micro_batch_grads(model, step, rank, micro)
        # What the micro-batches left on the parameters before the step: bf16 gradients only when sharded.
        full_size_fp32 += [getattr(p, "main_grad", None) is not None or p.grad.dtype == torch.float32
                           for p in model.parameters()]
        norms.append(optimizer.step(max_grad_norm=CLIP))
    return {"masters": masters_by_name(optimizer), "norms": norms,
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "master_bytes": optimizer.master_bytes(), "full_size_fp32_grads": any(full_size_fp32)}


def single_process_bf16(world: int, steps: int) -> dict:
    model = bf16_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, muon=MUON)
    norms = []
    for step in range(steps):
        optimizer.zero_grad()
        for rank in range(world):
            for micro in range(MICRO):
                micro_batch_grads(model, step, rank, micro)
        norms.append(optimizer.step(max_grad_norm=CLIP))
    return {"masters": masters_by_name(optimizer), "norms": norms,
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "master_bytes": optimizer.master_bytes()}


@pytest.mark.parametrize(("world", "sharded"), [(2, False), (4, False), (2, True), (4, True)])
def test_bf16_zero1_equals_the_bf16_single_process(world, sharded):
    """Micro-batches accumulated in each parameter's fp32 ``main_grad``, or reduce-scattered one by one into the
    owners' fp32 segments (``accumulate_sharded``: no full-size fp32 gradient on any rank)."""
    results = run_ranks(train_bf16, world, STEPS, sharded)
    assert all(r["full_size_fp32_grads"] != sharded for r in results)
    reference = single_process_bf16(world, STEPS)
    model = bf16_model()
    expected = assemble(reference["masters"], model)
    merged = {}
    for result in results:
        assert result["norms"] == pytest.approx(reference["norms"], rel=1e-9)
        assert not set(merged) & set(result["masters"]), "a piece has two owners"
        merged.update(result["masters"])
    got = assemble(merged, model)
    assert set(merged) == set(reference["masters"])
    for name, values in expected.items():
        assert torch.isfinite(got[name]).all(), f"{name}: a piece has no owner"
        error = float((got[name] - values).norm() / values.norm())
        assert error <= 1e-6, f"{name}: master relative error {error:.2e}"
    for result in results:  # every rank's bf16 parameters are its masters rounded (the all-gather moved bf16)
        for name, param in result["params"].items():
            assert param.dtype == torch.bfloat16
            assert torch.equal(param.reshape(-1), expected[name].to(torch.bfloat16)), name
    assert any(norm > CLIP for norm in reference["norms"])  # clipping was active
    # Masters are split: each rank holds about 1/world of them, fp32.
    assert sum(r["master_bytes"] for r in results) == reference["master_bytes"]
    assert reference["master_bytes"] == 4 * sum(p.numel() for p in model.parameters())


def test_micro_batches_accumulate_in_fp32_not_bf16():
    """Two micro-batch gradients whose bf16 sum rounds: the fp32 main gradient keeps the low bits."""
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    optimizer = ZeroOptimizer(model, lr=1.0, weight_decay=0.0, use_muon=False)
    for value in (1.0, 2.0**-9):  # bf16(1 + 2^-9) == 1
        (model.weight.float() * value).sum().backward()
    assert model.weight.grad is None and model.weight.main_grad.dtype == torch.float32
    assert float(model.weight.main_grad) == 1.0 + 2.0**-9
    bf16_reduce = ZeroOptimizer(nn.Linear(1, 1, bias=False).to(torch.bfloat16), lr=1.0, weight_decay=0.0,
                                reduce_dtype=torch.bfloat16, use_muon=False)
    weight = bf16_reduce.params[0]
    for value in (1.0, 2.0**-9):
        (weight.float() * value).sum().backward()
    assert float(weight.grad) == 1.0  # the reduce dtype is the accumulation dtype
    del optimizer


def test_optimizer_state_in_bf16_is_stored_in_bf16_and_updated_in_fp32():
    fp32_state, bf16_state = bf16_model(), bf16_model()
    reference = ZeroOptimizer(fp32_state, lr=LR, weight_decay=WD, muon=MUON)
    ours = ZeroOptimizer(bf16_state, lr=LR, weight_decay=WD, muon=MUON, state_dtype=torch.bfloat16)
    for step in range(5):
        for model, optimizer in ((fp32_state, reference), (bf16_state, ours)):
            optimizer.zero_grad()
            micro_batch_grads(model, step, 0, 0)
            optimizer.step(max_grad_norm=CLIP)
    assert all(t.dtype == torch.bfloat16 for s in ours.state.values() for k, t in s.items() if k != "step")
    assert ours.state_bytes() < 0.55 * reference.state_bytes()
    for key, master in reference.master.items():
        error = float((ours.master[key] - master).norm() / master.norm())
        assert error <= 2e-2, f"{key}: {error:.2e}"  # bf16 moments: close, not equal


# ----- an independent reference: DeepSpeed's bf16 ZeRO-1 ------------------------------------------------------------


class DyadicObjective(nn.Module):
    """``make_model``'s parameters under the objective ``sum(param * g)``, ``g`` dyadic and drawn from the seed it is
    given: gradients that do not depend on the weights, so a bf16 rounding flip in one implementation cannot feed
    back into the next step's gradients and the optimizers are compared over many steps; ``seed < 0`` is the real
    next-token loss on the step's tokens instead."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, seed: torch.Tensor) -> torch.Tensor:
        step, rank = divmod(abs(int(seed)), 100)
        if int(seed) < 0:
            return loss_of(self.net, step, rank)
        generator = torch.Generator().manual_seed(int(seed))
        return sum((p.float() * (torch.randint(-32, 32, p.shape, generator=generator) / 256)).sum()
                   for p in self.net.parameters())


def objective_seed(step: int, rank: int, real_first_step: bool) -> torch.Tensor:
    seed = 100 * step + rank
    return torch.tensor(-seed if real_first_step and step == 0 else seed)


DS_STEPS = 12


def deepspeed_bf16(rank: int, world: int, steps: int, real_first_step: bool) -> dict:
    torch.manual_seed(0)
    engine, optimizer = deepspeed_zero1(DyadicObjective(), rank, world, 29557, LR, WD, CLIP, bf16=True)
    from deepspeed.utils import safe_get_full_fp32_param

    losses = []
    for step in range(steps):
        loss = engine(objective_seed(step, rank, real_first_step))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    masters = {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()}
    return {"masters": masters, "losses": losses, "kind": type(optimizer).__name__,
            "params": {k: v.detach().clone() for k, v in engine.module.named_parameters()}}


def ours_bf16(rank: int, world: int, steps: int, real_first_step: bool) -> dict:
    torch.manual_seed(0)
    model = DyadicObjective()
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, use_muon=False, adamw=AdamWHParams(0.9, 0.95, 1e-8),
                              group=dist.group.WORLD)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(objective_seed(step, rank, real_first_step))
        (loss / world).backward()  # our reduction sums; DeepSpeed averages over ranks
        optimizer.step(max_grad_norm=CLIP)
        losses.append(float(loss))
    whole = assemble(run_gathered(masters_by_name(optimizer)), model)
    return {"masters": {name: whole[name].view(p.shape) for name, p in model.named_parameters()}, "losses": losses,
            "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def run_gathered(pieces: dict) -> dict:
    everyone: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, pieces)
    return {key: value for part in everyone for key, value in part.items()}


@pytest.mark.parametrize(("steps", "real_first_step"), [(1, True), (DS_STEPS, False)])
def test_bf16_adamw_matches_deepspeed_bf16_zero_stage1(steps, real_first_step):
    """One step of the real next-token loss, and many steps of weight-independent gradients with clipping."""
    theirs = run_ranks(deepspeed_bf16, 2, steps, real_first_step)
    ours = run_ranks(ours_bf16, 2, steps, real_first_step)
    assert theirs[0]["kind"] == "BF16_Optimizer"
    for rank in range(2):
        # The same bf16 weights give the same loss; later, a few weights a rounding apart move it in the 7th digit.
        assert ours[rank]["losses"][0] == theirs[rank]["losses"][0]
        assert ours[rank]["losses"] == pytest.approx(theirs[rank]["losses"], rel=1e-6)
        for name, expected in theirs[rank]["masters"].items():
            error = float((ours[rank]["masters"][name] - expected).norm() / expected.norm())
            assert error <= 1e-6, f"{name}: master relative error {error:.2e}"
            different = (ours[rank]["params"][name] != theirs[rank]["params"][name]).float().mean()
            assert different <= 0.01, f"{name}: {float(different):.1%} of the bf16 weights differ"


# ----- checkpoints hold the fp32 masters ---------------------------------------------------------------------------


def run_and_save(rank: int, world: int, dtype: torch.dtype, steps: int, path: str) -> dict:
    model = bf16_model() if dtype == torch.bfloat16 else mixed_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, muon=MUON, group=dist.group.WORLD)
    for step in range(steps):
        optimizer.zero_grad()
        micro_batch_grads(model, step, rank, 0)
        optimizer.step(max_grad_norm=CLIP)
        if step == 2 and path:
            dcp.save({"model": model.state_dict(), "optim": optimizer}, checkpoint_id=path)
    return {"masters": masters_by_name(optimizer), "params": {k: v.detach().clone() for k, v in
                                                             model.named_parameters()}}


def resume(rank: int, world: int, dtype: torch.dtype, steps: int, path: str) -> dict:
    model = bf16_model() if dtype == torch.bfloat16 else mixed_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, muon=MUON, group=dist.group.WORLD)
    state = model.state_dict()
    dcp.load({"model": state, "optim": optimizer}, checkpoint_id=path)
    loaded = {"masters": masters_by_name(optimizer),
              "params": {k: v.detach().clone() for k, v in model.named_parameters()}}
    for step in range(3, steps):
        optimizer.zero_grad()
        micro_batch_grads(model, step, rank, 0)
        optimizer.step(max_grad_norm=CLIP)
    return {"loaded": loaded, "masters": masters_by_name(optimizer),
            "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def test_a_bf16_run_resumes_bit_exactly(tmp_path):
    path = str(tmp_path / "ckpt")
    uninterrupted = run_ranks(run_and_save, 2, torch.bfloat16, 6, path)
    resumed = run_ranks(resume, 2, torch.bfloat16, 6, path)
    for before, after in zip(uninterrupted, resumed):
        assert before["masters"].keys() == after["masters"].keys()
        for key, (_, _, _, values) in before["masters"].items():
            assert torch.equal(after["masters"][key][3], values), key
        for name, param in before["params"].items():
            assert torch.equal(after["params"][name], param), name


def test_bf16_and_fp32_checkpoints_load_into_each_other_through_the_masters(tmp_path):
    for saved, loaded in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        path = str(tmp_path / f"{saved}-{loaded}".replace("torch.", ""))
        writer = run_ranks(run_and_save, 2, saved, 3, path)
        # Loaded at another data-parallel size too: the masters are keyed by piece, not by rank.
        reader = run_ranks(resume, 4, loaded, 3, path)
        model = mixed_model()
        written = assemble({k: v for r in writer for k, v in r["masters"].items()}, model)
        read = assemble({k: v for r in reader for k, v in r["loaded"]["masters"].items()}, model)
        for name, values in written.items():
            assert torch.equal(read[name], values), f"{saved} -> {loaded}: {name} master"
            for result in reader:  # the parameters are the masters, rounded to the run's dtype
                assert torch.equal(result["loaded"]["params"][name].reshape(-1), values.to(loaded)), name


def test_hf_export_of_a_bf16_checkpoint_writes_the_fp32_masters(tmp_path):
    """A bf16 run's checkpoint exports the masters it holds (the trained parameters), not their bf16 rounding; the
    parameters the stage froze come from the model entry."""
    from safetensors.torch import load_file

    from model.registry import FLAVORS, build_model
    from train.checkpoint import CheckpointManager, ModelState
    from train.hf_convert import main as hf_main

    model = build_model(FLAVORS["debug"], seed=0)
    model.coca.requires_grad_(False)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, muon=MUON)
    for step in range(2):
        optimizer.zero_grad()
        loss = sum((p.float() * 1e-3 * (step + 1)).sum() for p in model.parameters() if p.requires_grad)
        loss.backward()
        optimizer.step(max_grad_norm=CLIP)
    saved = CheckpointManager(tmp_path / "run", keep_last=1).save(1, {"model": ModelState(model), "optim": optimizer})
    hf_main(["export", "--format", "deepseek_v3", "--flavor", "debug", str(saved), str(tmp_path / "hf")])
    exported = {}
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        exported |= load_file(shard)
    masters = assemble(masters_by_name(optimizer), model)
    for ours, theirs in (("decoder.layers.0.attention.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
                         ("decoder.embed_tokens.weight", "model.embed_tokens.weight")):
        expected = masters[ours].view(model.get_parameter(ours).shape)
        assert exported[theirs].dtype == torch.float32
        assert torch.equal(exported[theirs], expected), ours
        assert not torch.equal(expected, model.get_parameter(ours).float())  # the masters hold more than bf16
