"""Checkpoints: asynchronous saves, the S3 store (moto's server over HTTP, with injected faults), atomic commits,
keep-last-k, the metadata each checkpoint carries, and whole runs that checkpoint to S3 in the background and resume
to the uninterrupted run's exact parameters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import boto3
import pytest
import torch
import torch.distributed as dist
from torch import nn

from config import load_config
from storage import S3Options, S3Storage
from train.__main__ import main
from train.checkpoint import CheckpointManager, ModelState, load_checkpoint, read_checkpoint_info
from train.checkpoint_store import LocalCheckpointStore, S3CheckpointStore
from train.metrics import read_metrics
from train.stages import checkpoint_location, checkpoints_of

STAGES = ["text_pretrain", "vit_coca", "vit_align", "joint_pretrain", "joint_cooldown", "long_ctx_32k",
          "long_ctx_128k"]


@pytest.fixture(scope="module")
def single_process_group():
    """A one-process group and a second gloo group for background saves, as the trainer builds them."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.new_group(backend="gloo")
    if created and dist.is_initialized():  # a trainer run in this module leaves the group it joined
        dist.destroy_process_group()


@pytest.fixture()
def bucket(s3_endpoint, request):
    name = "ckpt-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-50:].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(64, 96)
        self.second = nn.Linear(96, 8)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_async_save_holds_the_state_of_its_step_while_training_goes_on(where, single_process_group, tmp_path,
                                                                          s3_endpoint, bucket):
    """The state is staged at the call: parameters changed right after it do not reach the checkpoint. The save
    commits in the background, keep-last-k prunes, and each checkpoint carries its checkpoint.json."""
    store = (LocalCheckpointStore(tmp_path / "ckpt") if where == "local"
             else S3CheckpointStore(f"s3://{bucket}/runs/a/stage", S3Options(endpoint_url=s3_endpoint)))
    manager = CheckpointManager(store, keep_last=2, async_group=single_process_group)
    torch.manual_seed(0)
    model = Net()
    saved = {}
    for step in (1, 2, 3):
        saved[step] = params_of(model)
        manager.save(step, {"model": ModelState(model)}, {"stage": "stage", "step": step}, blocking=False)
        assert manager.saving == step
        with torch.no_grad():  # training goes on while the save is in flight
            for param in model.parameters():
                param.mul_(-3.0).add_(1.0)
    manager.wait()
    assert manager.saving is None
    assert manager.committed_steps() == [2, 3]
    for step in (2, 3):
        restored = Net()
        manager.load(step, {"model": ModelState(restored)})
        assert all(torch.equal(restored.state_dict()[k], v) for k, v in saved[step].items())
        assert manager.info(step) == {"stage": "stage", "step": step}
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000002", "step-00000003"]


def test_s3_checkpoints_commit_with_their_metadata_and_leftovers_are_removed(single_process_group, s3_endpoint,
                                                                              bucket):
    """A step prefix without DCP's .metadata (a save that died) is no checkpoint, is never loaded, and is deleted
    at the next commit; a committed checkpoint loads from its URL."""
    url = f"s3://{bucket}/run/stage"
    options = S3Options(endpoint_url=s3_endpoint)
    storage = S3Storage(url, options)
    storage.write("step-00000007/__0_0.distcp", b"half a file")  # a save interrupted after its first upload
    manager = CheckpointManager(S3CheckpointStore(url, options), keep_last=1)
    assert manager.committed_steps() == []
    model = Net()
    manager.save(5, {"model": ModelState(model)}, {"step": 5})
    assert manager.committed_steps() == [5]
    assert not any(key.startswith("step-00000007") for key in storage.list(""))
    with pytest.raises(FileNotFoundError, match="not a committed checkpoint"):
        load_checkpoint(f"{url}/step-00000007", {"model": ModelState(Net())}, options)
    restored = Net()
    load_checkpoint(f"{url}/step-00000005", {"model": ModelState(restored)}, options)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())
    assert read_checkpoint_info(f"{url}/step-00000005", options) == {"step": 5}


def test_s3_checkpoints_survive_storage_faults(single_process_group, s3_endpoint, bucket):
    """503 SlowDown, 500, connection resets, cut answers and latency on every kind of request (uploads, copies,
    deletes, ranged reads): the save commits and reads back bit-identical."""
    from tests.integration.fault_proxy import FaultProxy

    schedule = ["ok", "503", "ok", "truncate", "ok", "500", "ok", "reset", "slow", "ok"]
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]), schedule, fault_writes=True) as proxy:
        options = S3Options(endpoint_url=f"http://127.0.0.1:{proxy.port}", backoff_base_s=0.001, max_attempts=10)
        manager = CheckpointManager(S3CheckpointStore(f"s3://{bucket}/faulty", options), keep_last=1,
                                    async_group=single_process_group)
        model = Net()
        for step in (1, 2):
            manager.save(step, {"model": ModelState(model)}, {"step": step}, blocking=False)
        manager.wait()
        restored = Net()
        manager.load(2, {"model": ModelState(restored)})
    assert manager.committed_steps() == [2]
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())
    assert all(proxy.injected.get(fault, 0) > 0 for fault in ("503", "500", "truncate", "reset", "slow"))
    methods = {method for _, method, _ in proxy.requests}
    assert {"PUT", "GET", "POST"} <= methods  # uploads, reads and batch deletes all went through the faults


def short_curriculum(out: Path, demo_root: Path, *extra: str) -> list[str]:
    args = ["recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo_root}", "log.progress_bar=false",
            "log.peak_tflops=1"]
    for name in STAGES:
        args += [f"curriculum.stages.{name}.steps=3", f"curriculum.stages.{name}.checkpoint_interval=1",
                 f"curriculum.stages.{name}.lr.warmup_steps=1"]
    return args + list(extra)


def final_params(location: str, options: S3Options | None = None) -> dict[str, torch.Tensor]:
    from model.registry import build_model

    info = read_checkpoint_info(location, options)
    cfg = load_config([f"recipe={info['config']['recipe']}"])
    model = build_model(cfg.model)
    load_checkpoint(location, {"model": ModelState(model)}, options)
    return params_of(model)


def test_a_run_checkpointing_to_s3_in_the_background_resumes_exactly(demo_root, tmp_path, s3_endpoint, bucket):
    """The whole debug curriculum with asynchronous checkpoints to S3 every step, left every 2 steps and rerun
    with the same command: every stage's losses and the final parameters equal an uninterrupted run with
    synchronous local checkpoints, and the checkpoints say what they hold."""
    straight = short_curriculum(tmp_path / "local", demo_root)
    assert main(straight) == 0
    s3 = short_curriculum(tmp_path / "s3", demo_root, f"checkpoint.url=s3://{bucket}/ckpts",
                          f"checkpoint.endpoint_url={s3_endpoint}", "checkpoint.async_save=true")
    invocations = 0
    while not (tmp_path / "s3" / "run" / "summary.json").exists():
        assert main([*s3, "exit_after_steps=2"]) == 0
        invocations += 1
        assert invocations <= 12
    assert invocations == 11  # 7 stages x 3 steps, 2 steps per invocation
    assert not (tmp_path / "s3" / "run" / "joint_pretrain" / "checkpoints").exists()  # nothing local
    for name in STAGES:
        expected = read_metrics(tmp_path / "local" / "run" / name / "metrics.jsonl")
        got = read_metrics(tmp_path / "s3" / "run" / name / "metrics.jsonl")
        assert [r["loss"] for r in got] == [r["loss"] for r in expected], name
    cfg = load_config(s3)
    assert checkpoint_location(cfg, "long_ctx_128k") == f"s3://{bucket}/ckpts/run/long_ctx_128k"
    options = S3Options(endpoint_url=s3_endpoint)
    s3_manager = checkpoints_of(cfg, "long_ctx_128k")
    assert s3_manager.committed_steps() == [2, 3]  # keep_last=2
    final = s3_manager.location(3)
    info = read_checkpoint_info(final, options)
    assert (info["stage"], info["step"], info["seq_len"], info["rope_theta"]) == (
        "long_ctx_128k", 3, cfg.curriculum.stages["long_ctx_128k"].seq_len,
        cfg.curriculum.stages["long_ctx_128k"].rope_theta)
    assert info["layout"] == {"world_size": 1, "dp": 1, "cp": 1, "ep": 1, "pp": 1}
    local_final = checkpoints_of(load_config(straight), "long_ctx_128k").location(3)
    a, b = final_params(local_final), final_params(final, options)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((Path(local_final) / "checkpoint.json").read_text())["step"] == 3
    # Evaluation reads what it needs (config, stage, RoPE base) from the checkpoint itself, here straight from S3.
    from train.eval import evaluate

    from_s3 = evaluate(f"s3://{bucket}/ckpts/run/long_ctx_128k", ["heldout_loss"], samples_per_source=2,
                       endpoint_url=s3_endpoint)
    from_disk = evaluate(local_final, ["heldout_loss"], samples_per_source=2)
    assert from_s3["checkpoint"] == final and (from_s3["stage"], from_s3["step"]) == ("long_ctx_128k", 3)
    assert from_s3["rope_theta"] == cfg.curriculum.stages["long_ctx_128k"].rope_theta
    assert from_s3["tasks"]["heldout_loss"] == from_disk["tasks"]["heldout_loss"]
