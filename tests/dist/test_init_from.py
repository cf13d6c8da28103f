"""Per-part initialization (train/init_from.py): each part from its own source, the parts' values equal to a plain
import, rank-local reading under expert and pipeline parallelism, and errors that name the tensor and both shapes.

Sources are real files: a tiny DeepseekV3ForCausalLM written by ``save_pretrained`` (Moonlight's format: sharded,
one Linear per expert on disk) and checkpoints written by our CheckpointManager.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.hf import hf_config, import_state_dict, load_safetensors
from model.hf_files import SafetensorsCheckpoint
from model.registry import build_model
from model.vlm import KimiVL
from tests.forked import run_ranks
from train.loss import linear_cross_entropy_by_group
from tests.unit.test_model_hf import ARGS, _perturb_norms
from train.checkpoint import CheckpointManager, ModelState
from config.init_sources import parse_init_from
from train.init_from import InitError, load_parts

SEED = 7


@pytest.fixture(scope="module")
def moonlight_dir(tmp_path_factory) -> str:
    """A tiny Moonlight-format checkpoint (DeepseekV3ForCausalLM.save_pretrained: index + shards, per-expert)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    directory = tmp_path_factory.mktemp("moonlight")
    config = {k: v for k, v in hf_config("deepseek_v3", ARGS).items() if k != "architectures"}
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).eval()
    _perturb_norms(reference)
    reference.save_pretrained(directory, max_shard_size="30KB")
    assert (directory / "model.safetensors.index.json").exists()
    return str(directory)


def _saved_model(tmp_path: Path, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    model = build_model(ARGS, seed=seed)
    location = CheckpointManager(tmp_path / f"ours{seed}", keep_last=1).save(5, {"model": ModelState(model)})
    return str(location), {k: v.clone() for k, v in model.state_dict().items()}


def _fresh(part: str) -> dict[str, torch.Tensor]:
    """What ``scratch`` gives ``part``: the run's seeded values (model/init.py)."""
    return {k: v for k, v in build_model(ARGS, seed=SEED).state_dict().items() if k.startswith(part + ".")}


def test_each_part_from_its_own_source(tmp_path: Path, moonlight_dir):
    location, saved = _saved_model(tmp_path, seed=3)
    model = build_model(ARGS, seed=11)  # whatever the model held before: every part is replaced
    sources = parse_init_from({"vision": location, "projector": "scratch", "decoder": f"hf:{moonlight_dir}",
                               "coca": "drop"}, [], ["a"])
    done = load_parts(model, ARGS, sources, [], None, SEED)
    assert done["decoder"] == f"hf:{moonlight_dir}" and done["vision"] == location
    state = model.state_dict()
    want_decoder = import_state_dict(load_safetensors(moonlight_dir), "deepseek_v3", ARGS)
    assert all(torch.equal(state[n], t) for n, t in want_decoder.items())
    assert all(torch.equal(state[n], t) for n, t in saved.items() if n.startswith("vision."))
    for part in ("projector", "coca"):
        assert all(torch.equal(state[n], t) for n, t in _fresh(part).items()), part
    # The loaded decoder computes what the reference computes.
    from transformers import DeepseekV3ForCausalLM

    reference = DeepseekV3ForCausalLM.from_pretrained(moonlight_dir).eval()
    ids = torch.randint(0, ARGS.decoder.vocab_size, (2, 9))
    with torch.no_grad():
        error = float((model.decoder.logits(model.decoder(ids)[0]) - reference(ids).logits).abs().max())
    assert error <= 1e-4


def test_stage_sources_resolve_to_their_final_checkpoints(tmp_path: Path):
    location, saved = _saved_model(tmp_path, seed=4)
    model = build_model(ARGS, seed=SEED)
    asked = []

    def locate(stage: str) -> str:
        asked.append(stage)
        return location

    sources = parse_init_from({"vision": "previous", "decoder": "stage_a"}, ["stage_a", "stage_b"],
                              ["stage_a", "stage_b", "here"])
    load_parts(model, ARGS, sources, ["stage_a", "stage_b"], locate, SEED)
    assert asked == ["stage_b", "stage_a"]
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in saved.items() if n.startswith(("vision.", "decoder.")))
    assert all(torch.equal(state[n], t) for n, t in _fresh("projector").items())  # not named: scratch
    with pytest.raises(ValueError, match="does not come before"):
        parse_init_from({"decoder": "here"}, ["stage_a"], ["stage_a", "here"])
    # A defined stage this run leaves out of its order (a prefix of the curriculum) provides nothing: scratch.
    from config import load_config

    cfg = load_config(["recipe=debug", "curriculum.order=[vit_coca,vit_align]"])
    assert cfg.curriculum.stages["vit_align"].init_from["decoder"] == "text_pretrain"
    assert parse_init_from(cfg.curriculum.stages["vit_align"].init_from, ["vit_coca"], cfg.curriculum.order,
                           list(cfg.curriculum.stages)) == {"vision": "vit_coca", "projector": "scratch",
                                                            "decoder": "scratch", "coca": "drop"}


def test_mismatches_fail_before_reading_naming_tensor_and_shapes(tmp_path: Path, moonlight_dir):
    model = build_model(ARGS, seed=SEED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((Path(moonlight_dir) / "config.json").read_text())
    state = load_safetensors(moonlight_dir)
    name = "model.layers.1.self_attn.o_proj.weight"
    state[name] = torch.zeros(state[name].shape[0], 7)
    save_file(state, broken / "model.safetensors")
    sources = {"vision": "scratch", "projector": "scratch", "decoder": f"hf:{broken}", "coca": "scratch"}
    expected = tuple(load_safetensors(moonlight_dir)[name].shape)
    with pytest.raises(InitError) as error:
        load_parts(model, ARGS, sources, [], None, SEED)
    assert f"tensor '{name}'" in str(error.value) and f"expected shape {expected}, found (32, 7)" in str(error.value)
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(InitError, match=r"lacks 1 tensors .*experts\.5\.up_proj"):
        load_parts(model, ARGS, sources, [], None, SEED)
    with pytest.raises(InitError, match="holds no vision"):
        load_parts(model, ARGS, {**sources, "vision": f"hf:{moonlight_dir}"}, [], None, SEED)
    # Our checkpoint of another model: the tensor, the shape expected and the one found.
    other = ARGS.__class__(**{**ARGS.__dict__, "decoder": ARGS.decoder.__class__(
        **{**ARGS.decoder.__dict__, "hidden_size": 48})})
    location = CheckpointManager(tmp_path / "other", keep_last=1).save(1, {"model": ModelState(build_model(other))})
    with pytest.raises(InitError, match=r"tensor 'decoder\.embed_tokens\.weight' .*expected shape \(97, 32\), "
                                        r"found \(97, 48\)"):
        load_parts(model, ARGS, {**sources, "decoder": str(location)}, [], None, SEED)
    # Nothing was written by a failed check (the projector and CoCa come after the decoder in the order checked).
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items() if n.startswith("decoder."))


# --- rank-local loading under expert and pipeline parallelism ---------------------------------------------------


def _parallel_model(pp: int, ep: int):
    """This rank's model as the trainer builds it: on meta, then ``parallelize`` (experts sharded, stages pruned)."""
    import torch.distributed as dist

    from parallel.dims import ParallelDims
    from parallel.parallelize import PipelineOptions, parallelize
    from config import ParallelConfig

    dims = ParallelDims.from_config(ParallelConfig(pp_degree=pp, ep_degree=ep), dist.get_world_size(), ARGS, [32])
    groups = dims.build_groups("cpu")
    with torch.device("meta"):
        model = KimiVL(ARGS)
    parallel = parallelize(model, dims, groups, "cpu", SEED, PipelineOptions("1f1b", 2, 32, linear_cross_entropy_by_group))
    return parallel.model, groups.expert_mesh


def _load_on_rank(rank: int, world: int, decoder: str, location: str, pp: int, ep: int) -> dict:
    model, expert_mesh = _parallel_model(pp, ep)
    read: list[str] = []
    original_get, original_rows = SafetensorsCheckpoint.get, SafetensorsCheckpoint.get_rows

    def get(self, name):  # records what this rank reads; reads it as before
        read.append(name)
        return original_get(self, name)

    def get_rows(self, name, start, stop):
        read.append(f"{name}[{start}:{stop}]")
        return original_rows(self, name, start, stop)

    SafetensorsCheckpoint.get, SafetensorsCheckpoint.get_rows = get, get_rows
    sources = {"vision": location, "projector": "scratch", "decoder": decoder, "coca": "drop"}
    load_parts(model, ARGS, sources, [], None, SEED, expert_mesh)
    offsets = {n: m.expert_offset for n, m in model.named_modules() if hasattr(m, "expert_offset")}
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "read": read, "offsets": offsets}


@pytest.mark.parametrize(("pp", "ep", "decoder"), [(1, 2, "hf"), (2, 1, "hf"), (1, 2, "ours")])
def test_ranks_read_only_what_they_hold_and_equal_one_process(tmp_path: Path, moonlight_dir, pp, ep, decoder):
    location, _ = _saved_model(tmp_path, seed=3)
    decoder = f"hf:{moonlight_dir}" if decoder == "hf" else _saved_model(tmp_path, seed=5)[0]
    whole = build_model(ARGS, seed=SEED)
    load_parts(whole, ARGS, {"vision": location, "projector": "scratch", "decoder": decoder, "coca": "drop"}, [],
               None, SEED)
    want = whole.state_dict()
    ranks = run_ranks(_load_on_rank, 2, decoder, location, pp, ep)
    experts = ARGS.decoder.num_routed_experts
    for rank, result in enumerate(ranks):
        state, read = result["state"], result["read"]
        assert state, rank
        for name, tensor in state.items():
            module = name.rpartition(".")[0]
            if module in result["offsets"]:  # this rank's slice of the experts, at their global index
                first = result["offsets"][module]
                assert torch.equal(tensor, want[name][first:first + tensor.shape[0]]), (rank, name)
            else:
                assert torch.equal(tensor, want[name]), (rank, name)
        read_experts = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
        held_layers = {n.split(".")[2] for n in state if n.startswith("decoder.layers.")}
        read_layers = {n.split(".")[2] for n in read if n.startswith("model.layers.")}
        if not decoder.startswith("hf:"):
            continue  # our checkpoints: DCP reads each rank's shard (the values above prove the slice)
        assert read_layers == held_layers, rank  # pruned layers are never read
        if ep > 1:
            local = experts // ep
            assert read_experts == set(range(rank * local, (rank + 1) * local)), rank
        else:
            assert read_experts == set(range(experts)) or not held_layers - {"0"}
        if pp > 1:
            assert len(held_layers) < ARGS.decoder.num_layers
    if pp > 1:  # together the stages hold every layer
        assert set.union(*({n.split(".")[2] for n in r["state"] if n.startswith("decoder.layers.")}
                           for r in ranks)) == {str(i) for i in range(ARGS.decoder.num_layers)}
