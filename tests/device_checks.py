"""Tools that prove device placement on a CPU-only machine (see ../shared/PLATFORM_NOTES.md).

* :func:`fake_world`: a fake process group of N ranks (collectives are no-ops), for whole steps on ``meta``.
* :func:`fake_cuda`: a ``FakeTensorMode`` in which tensors can live on a fake ``cuda`` device. Mixing such a
  tensor with a CPU tensor raises ``FakeTensorDeviceMismatchError``. Two gaps of CPU-only builds are bridged:
  Python indexing (``t[...]``) of a fake CUDA tensor enters a CUDA device guard the build lacks, so
  :class:`_FakeCudaIndexing` runs it on a ``meta`` stand-in after checking that every index tensor is on the same
  device; and data-dependent reads of host metadata (``cu_seqlens.tolist()`` after tensor math on it) take their
  values from the real CPU tensors (``fake_tensor_propagate_real_tensors``).
* :class:`UndevicedFactoryCheck`: on real CPU tensors, flags every factory call of ours made without a device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.overrides import TorchFunctionMode
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten, tree_map

from data.batch import HOST_FIELDS

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """A fake process group of ``world_size`` ranks (this process is rank 0) for the duration of the block."""
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


class _FakeCudaIndexing(TorchFunctionMode):
    """``Tensor.__getitem__`` / ``__setitem__`` on fake CUDA tensors, run on a ``meta`` stand-in.

    An index tensor on another device than the indexed one raises, as the strictest real-device rule would (a CPU
    index tensor into CUDA data is a hidden host tensor in the step)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            return func(*args, **kwargs)
        target = args[0]
        if not (isinstance(target, FakeTensor) and target.device.type == "cuda"):
            return func(*args, **kwargs)
        others = [t for t in tree_flatten(args[1:])[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        for other in others:
            if other.device != target.device:
                raise RuntimeError(f"indexing a tensor on {target.device} with a tensor on {other.device}")
        to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
        result = func(*tree_map(to_meta, args), **kwargs)
        if result is None:  # __setitem__: the shapes are all a fake tensor has
            return None
        return torch.empty_strided(result.shape, result.stride(), dtype=result.dtype, device=target.device)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """A fake-tensor mode where ``device="cuda"`` works on this CPU-only build (see the module docstring)."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with functorch_config.patch(fake_tensor_propagate_real_tensors=True), mode, _FakeCudaIndexing():
        yield mode


def place_on_fake_cuda(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every parameter and buffer of ``model`` (built on meta) by an empty fake CUDA tensor, in place
    (call inside :func:`fake_cuda`). Parameters do not require gradients: autograd cannot run on fake CUDA here."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device="cuda"),
                                                    requires_grad=False)
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cuda")
    return model


def batch_on_fake_cuda(batch):
    """``batch`` with its device data as empty fake CUDA tensors and its index metadata left on the host (call
    inside :func:`fake_cuda`)."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return type(batch)(**{name: value if name in HOST_FIELDS
                          else torch.empty(value.shape, dtype=value.dtype, device="cuda")
                          for name, value in fields.items()})


class UndevicedFactoryCheck(TorchFunctionMode):
    """Flags every factory call (``torch.zeros``, ``arange``, ``tensor``, ``empty``, ...) that this repository's
    code makes without naming a device, while real CPU tensors run the step.

    A torch-function mode rather than a dispatch mode: at dispatch the ``device`` argument is already filled in
    with the default, so "no device given" is only visible where the call is made. Calls made by torch itself
    (schedules, collectives) are not ours to fix and are not flagged. Data-dependent paths (expert all-to-all
    splits, pipeline schedules) run for real here, which ``meta`` and fake tensors cannot do. The first finding
    raises, naming the line.
    """

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and not (
                func in (torch.as_tensor, torch.asarray) and isinstance(args[0], torch.Tensor)):
            caller = traceback.extract_stack()[-2]
            if caller.filename.startswith(str(REPO)) and "/.venv/" not in caller.filename:
                where = f"{Path(caller.filename).relative_to(REPO)}:{caller.lineno} {caller.line}"
                self.found.append(f"{func.__name__} at {where}")
                raise RuntimeError(f"torch.{func.__name__} without a device at {where}")
        return func(*args, **kwargs)
