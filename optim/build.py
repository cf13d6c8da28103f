"""Which parameter is optimized how: Muon for weight matrices, AdamW for everything else.

The split is explicit and inspectable (:func:`describe_routing`, ``python -m optim.build``):

* **Muon**: 2-D weight matrices of linear layers; each routed expert's matrix of a stacked ``[E, out, in]`` expert
  tensor on its own; the patch-embedding convolution as its ``[out, in * k * k]`` matrix.
* **AdamW**: embeddings and vocabulary output heads (Moonlight keeps them off Muon), learned position tables and
  the CoCa pooling query, norms, biases, the SigLIP temperature and bias. Vectors and scalars get no weight decay.
  (The MoE router's balancing bias is a buffer moved by its own rule, not optimized.)

A parameter that fits none of these (e.g. an unknown 3-D tensor) is an error naming it, never a silent guess.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import nn

from model.moe import GroupedExperts

MUON, ADAMW = "muon", "adamw"
# Learned tables used like embeddings (looked up or added, not multiplied): AdamW, as embeddings.
EMBEDDING_LIKE = ("pos_table", "text_pos", "caption_pos", "pool_query")


@dataclass(frozen=True)
class Route:
    name: str
    shape: tuple[int, ...]
    rule: str  # MUON or ADAMW
    # Muon: each slice along dim 0 is its own matrix (stacked experts).
    per_expert: bool = False
    weight_decay: bool = True


def _vocab_sizes(model: nn.Module) -> set[int]:
    sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    # A pipeline stage holding the output head but not the embedding still knows its vocabulary from its args.
    decoder_args = getattr(getattr(model, "args", None), "decoder", None)
    if decoder_args is not None:
        sizes.add(decoder_args.vocab_size)
    return sizes


def route_parameters(model: nn.Module, trainable_only: bool = True) -> list[Route]:
    """The optimizer rule of every (trainable) parameter, in ``named_parameters`` order."""
    vocab = _vocab_sizes(model)
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = module
    routes = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        routes.append(_route(name, param, owners[name], vocab))
    return routes


def _route(name: str, param: nn.Parameter, module: nn.Module, vocab: set[int]) -> Route:
    shape = tuple(param.shape)
    if param.ndim < 2:
        return Route(name, shape, ADAMW, weight_decay=False)
    if isinstance(module, nn.Embedding) or name.rsplit(".", 1)[-1] in EMBEDDING_LIKE:
        return Route(name, shape, ADAMW)
    if isinstance(module, nn.Linear) and module.out_features in vocab:
        return Route(name, shape, ADAMW)  # vocabulary output head
    if isinstance(module, GroupedExperts) and param.ndim == 3:
        return Route(name, shape, MUON, per_expert=True)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return Route(name, shape, MUON)
    raise ValueError(f"cannot route parameter '{name}' of shape {list(shape)} (module {type(module).__name__}) to "
                     "Muon or AdamW: add its module type to optim/build.py:_route")


def describe_routing(model: nn.Module) -> str:
    """A table of every trainable parameter and its rule, for people."""
    lines = [f"{'parameter':<60} {'shape':<22} rule"]
    for route in route_parameters(model):
        rule = route.rule + (" (per expert)" if route.per_expert else "") + ("" if route.weight_decay else ", no wd")
        lines.append(f"{route.name:<60} {str(list(route.shape)):<22} {rule}")
    return "\n".join(lines)


def main() -> None:
    from model.registry import FLAVORS, build_model

    parser = argparse.ArgumentParser(description="Print which parameter Muon or AdamW optimizes.")
    parser.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    args = parser.parse_args()
    print(describe_routing(build_model(FLAVORS[args.flavor], device="meta")))


if __name__ == "__main__":
    main()
