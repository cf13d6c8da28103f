"""Kimi-VL: MoonViT -> pixel-shuffle projector -> MoE decoder, plus the CoCa towers of the first stage.

The trainer freezes parts by the submodule names ``vision``, ``projector``, ``decoder`` and ``coca``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from config.model import ModelArgs
from model.coca import CocaOutput, CocaTowers
from model.decoder import MoEAux, MoEDecoder
from model.init import ParamInit
from model.projector import PatchMergerProjector
from model.vision import MoonViT

__all__ = ["KimiVL", "scatter_images"]


class KimiVL(nn.Module):
    """The whole vision-language model.

    Args:
        args: Hyper-parameters of every part.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vision = MoonViT(args.vision)
        self.projector = PatchMergerProjector(
            args.vision.hidden_size, args.vision.merge_size, args.decoder.hidden_size, args.vision.layer_norm_eps)
        self.decoder = MoEDecoder(args.decoder)
        self.coca = CocaTowers(args.coca, args.vision.hidden_size, args.decoder.vocab_size)

    def init_weights(self, init: ParamInit | None = None) -> None:
        """Initialize every parameter and buffer this model holds (parts a pipeline stage dropped are skipped).

        Weights ``normal(0, decoder.init_std)``, biases zeros, norms ones, the vision position table
        ``normal(0, 0.02)``, MoE balancing biases zeros, SigLIP temperature and bias to their init values. Each
        parameter's values depend only on the seed and its name (model/init.py), whatever else the model holds.

        Args:
            init: The root initializer (its seed); None draws the seed from torch's global generator.
        """
        init = init or ParamInit.from_global_rng()
        std = self.args.decoder.init_std
        for name in ("vision", "projector", "coca"):
            part = getattr(self, name)
            if part is not None:
                part.init_weights(init.child(name), std)
        if self.decoder is not None:
            self.decoder.init_weights(init.child("decoder"))

    def set_rope_theta(self, theta: float) -> None:
        """Change the decoder's RoPE base (curriculum stages); the vision tower's 2D RoPE is unaffected."""
        self.decoder.set_rope_theta(theta)

    def embed_images(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Packed image patches ``[patches, p*p*C]`` (uint8 raw or normalized floats, see
        ``MoonViT.embed_patches``) -> decoder-width image tokens ``[patches / m^2, hidden]``."""
        return self.projector(self.vision(pixel_values, grid_hw), grid_hw)

    def forward(self, *inputs: torch.Tensor | None, **named_inputs: torch.Tensor | None) -> tuple[torch.Tensor, MoEAux]:
        """Next-token logits ``[B, S, vocab]`` and the MoE side outputs: the output projection of
        :meth:`hidden_states`, which takes the same inputs."""
        hidden, aux = self.hidden_states(*inputs, **named_inputs)
        return self.decoder.logits(hidden), aux

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        image_token_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEAux]:
        """Final hidden states (after the last norm) of packed rows with images scattered into their placeholder
        positions. The training loss takes them from here, fused with the output projection (train/loss.py), so the
        whole logits never exist; :meth:`forward` adds the projection.

        Args:
            input_ids: ``int64 [B, S]``.
            position_ids: ``int64 [B, S]`` positions restarting at 0 in every document.
            cu_seqlens: ``int32 [docs + 1]`` document boundaries over the flattened ``B * S`` tokens (on the host).
            pixel_values: ``[patches, p*p*C]`` packed image patches (see ``MoonViT.embed_patches``), or None /
                empty for text-only batches.
            image_grid_hw: ``int64 [images, 2]`` patch grids.
            image_token_positions: ``int64 [image_tokens]`` flattened positions receiving the merged image tokens,
                in the order the projector emits them.

        Returns:
            ``(hidden [B, S, hidden], MoEAux)``.
        """
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_hw, image_token_positions)
        return self.decoder(position_ids=position_ids, cu_seqlens=cu_seqlens, inputs_embeds=embeds)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        image_token_positions: torch.Tensor | None = None,
        embed_images: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token embeddings ``[B, S, hidden]`` of packed rows with the image tokens scattered in.

        The first half of :meth:`hidden_states`; context parallelism shards its output (images are whole only before
        the sequence is cut).

        Args:
            input_ids, pixel_values, image_grid_hw, image_token_positions: As in :meth:`hidden_states`.
            embed_images: How the image tokens are computed, ``(pixel_values, image_grid_hw) -> [image tokens,
                hidden]`` in the projector's order; :meth:`embed_images` if None (context parallelism divides the
                images among its ranks).
        """
        embeds = self.decoder.embed_tokens(input_ids)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return embeds
        if image_grid_hw is None or image_token_positions is None:
            raise ValueError("pixel_values were given without image_grid_hw and image_token_positions.")
        image_tokens = (embed_images or self.embed_images)(pixel_values, image_grid_hw)
        return scatter_images(embeds, image_tokens, image_token_positions)

    def forward_coca(
        self,
        pixel_values: torch.Tensor,
        image_grid_hw: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> CocaOutput:
        """The ``vit_coca`` objective's forward: MoonViT features through the CoCa towers.

        Args:
            pixel_values: ``[patches, p*p*C]`` packed image patches (see ``MoonViT.embed_patches``).
            image_grid_hw: ``int64 [N, 2]`` patch grids.
            text_ids: ``int64 [N, L]`` paired texts.
            text_mask: ``bool [N, L]`` True on real tokens.

        Returns:
            A :class:`~model.coca.CocaOutput`.
        """
        return self.coca(self.vision(pixel_values, image_grid_hw), image_grid_hw, text_ids, text_mask)


def scatter_images(embeds: torch.Tensor, image_tokens: torch.Tensor,
                   image_token_positions: torch.Tensor) -> torch.Tensor:
    """Replace the placeholder embeddings of ``embeds [B, S, hidden]`` by ``image_tokens [N, hidden]`` at the
    flattened ``image_token_positions [N]`` (out of place, so gradients reach the vision tower and the projector)."""
    if image_tokens.shape[0] != image_token_positions.shape[0]:
        raise ValueError(f"the images yield {image_tokens.shape[0]} tokens but image_token_positions has "
                         f"{image_token_positions.shape[0]} placeholders: the loader must insert "
                         "(h / m) * (w / m) placeholders per image.")
    rows, seq, hidden = embeds.shape
    flat = embeds.reshape(rows * seq, hidden)
    flat = flat.index_put((image_token_positions,), image_tokens.to(flat.dtype))
    return flat.view(rows, seq, hidden)
