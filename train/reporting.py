"""What a run reports beyond its metrics file: model FLOPs utilization, loss-curve PNGs and Weights & Biases.

MFU = achieved model FLOPs per second per process ÷ the device's peak. Model FLOPs of a step are counted from the
model and the batch, not from the kernels: ``6 x`` (activated parameters touched per token) per token, plus the
attention scores and values over each document's causal context (``6 x layers x heads x (d_qk + d_v)`` per
attended pair, counted from ``cu_seqlens``). On CPU the peak is measured with a matmul probe at start-up (there is no
spec sheet); on GPU it is ``log.peak_tflops``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from config.model import ModelArgs
from data.batch import ImageTextBatch, PackedBatch
from model.attention import document_lengths
from model.vision import grid_cu_seqlens
from train.metrics import source_names


def measure_peak_flops(size: int = 1024, repeats: int = 5, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of this process's best ``dtype`` matmul on ``device``: the practical peak to divide achieved FLOP/s
    by (the CPU's, or the GPU's)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm up the BLAS threads / the kernel choice
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _matrix_params(hidden_in: int, hidden_out: int) -> int:
    return hidden_in * hidden_out


def decoder_active_params_per_token(args: ModelArgs) -> int:
    """Weights a token multiplies in the decoder (embedding lookup excluded; routed experts: only its top-k)."""
    d = args.decoder
    heads = d.num_heads
    attention = (_matrix_params(d.hidden_size, heads * (d.qk_nope_head_dim + d.qk_rope_head_dim))
                 + _matrix_params(d.hidden_size, d.kv_lora_rank + d.qk_rope_head_dim)
                 + _matrix_params(d.kv_lora_rank, heads * (d.qk_nope_head_dim + d.v_head_dim))
                 + _matrix_params(heads * d.v_head_dim, d.hidden_size))
    dense_mlp = 3 * d.hidden_size * d.dense_ffn_size
    moe_mlp = 3 * d.hidden_size * d.moe_ffn_size * (d.num_experts_per_token + d.num_shared_experts)
    router = d.hidden_size * d.num_routed_experts
    moe_layers = d.num_layers - d.num_dense_layers
    layers = d.num_layers * attention + d.num_dense_layers * dense_mlp + moe_layers * (moe_mlp + router)
    return layers + d.hidden_size * d.vocab_size  # + the output head


def vision_params_per_patch(args: ModelArgs) -> int:
    v = args.vision
    block = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.mlp_hidden_size
    return v.num_layers * block + v.in_channels * v.patch_size**2 * v.hidden_size


def _attended_pairs(cu_seqlens: torch.Tensor | tuple[int, ...], causal: bool) -> int:
    lengths = document_lengths(cu_seqlens)
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def step_model_flops(args: ModelArgs, batches: list[PackedBatch | ImageTextBatch]) -> float:
    """Model FLOPs (forward + backward) of this rank's micro-batches for the vision tower and the decoder.

    The CoCa towers of the first stage are small next to the ViT and are left out, so MFU there is a lower bound.
    """
    v, d = args.vision, args.decoder
    vision_attention = 6 * v.num_layers * v.hidden_size * 2  # scores + values, d_qk = d_v = head dim
    decoder_attention = 6 * d.num_layers * d.num_heads * (d.qk_nope_head_dim + d.qk_rope_head_dim + d.v_head_dim)
    total = 0.0
    for batch in batches:
        patches = batch.pixel_values.shape[0]
        if patches:
            total += 6 * vision_params_per_patch(args) * patches
            total += vision_attention * _attended_pairs(grid_cu_seqlens(batch.image_grid_hw), causal=False)
        if isinstance(batch, PackedBatch):
            total += 6 * decoder_active_params_per_token(args) * batch.num_tokens
            total += decoder_attention * _attended_pairs(batch.cu_seqlens, causal=True)
    return total


def plot_losses(records: list[dict[str, Any]], path: Path, title: str, skipped: list[int] | None = None) -> None:
    """A PNG of the loss, its parts and its per-source losses over the steps of one stage, the steps skipped by
    spike recovery (``skipped``) marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    parts = [k for k in ("loss", "lm_loss", "siglip_loss", "caption_loss", "aux_loss") if k in records[0]]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in records]
    for part in parts:
        axis.plot(steps, [r[part] for r in records], label=part, linewidth=1.5 if part == "loss" else 1.0)
    for source in source_names(records):  # per-source next-token loss, at the steps that had its tokens
        seen = [r for r in records if f"loss/{source}" in r]
        axis.plot([r["step"] for r in seen], [r[f"loss/{source}"] for r in seen], label=source, linewidth=0.8,
                  linestyle="--", marker="." if len(seen) < 50 else None)
    for index, step in enumerate(skipped or []):
        axis.axvline(step, color="red", alpha=0.4, linewidth=1.0, label="skipped (spike)" if index == 0 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


class WandbLogger:
    """Weights & Biases, offline unless ``WANDB_MODE`` says otherwise (rank 0 only; a no-op when disabled).

    The run id is derived from the run directory, so a resumed run continues the same W&B run.
    """

    def __init__(self, enabled: bool, project: str, run_dir: Path, config: dict[str, Any]):
        self.run = None
        if not enabled:
            return
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        run_id = "".join(c if c.isalnum() else "-" for c in str(run_dir.resolve()))[-64:]
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config)

    def log(self, record: dict[str, Any], global_step: int) -> None:
        if self.run is not None:
            stage = record["stage"]
            self.run.log({f"{stage}/{k}": v for k, v in record.items() if isinstance(v, (int, float))},
                         step=global_step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
