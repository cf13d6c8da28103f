"""CoCa towers of the ``vit_coca`` stage: attention-pooled image embedding, text encoder, caption decoder.

The stage trains MoonViT with ``L = L_siglip + 2 * L_caption``: a SigLIP sigmoid contrastive loss between the
pooled image embedding and the text embedding, and the next-token loss of a small caption decoder that
cross-attends to the image's patch features. The towers return embeddings and logits; both losses are in
train/loss.py. Texts are right-padded (``bos ... eos pad ...``, see :mod:`data.batch`); images arrive packed and
are padded per image here, with a key padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from config.model import CocaArgs
from model.init import ParamInit
from model.layers import init_default_weights

__all__ = ["CocaOutput", "CocaTowers", "pad_packed_images"]

LAYER_NORM_EPS = 1e-6
MLP_RATIO = 4


@dataclass
class CocaOutput:
    """Outputs of :meth:`CocaTowers.forward` for ``N`` image-text pairs.

    Attributes:
        image_embeds: ``[N, embed_dim]`` L2-normalized pooled image embeddings.
        text_embeds: ``[N, embed_dim]`` L2-normalized text embeddings.
        caption_logits: ``[N, L, vocab]`` next-token logits of the caption decoder.
        logit_scale: Scalar log-temperature (the loss uses ``exp(logit_scale)``).
        logit_bias: Scalar SigLIP bias.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    caption_logits: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor


def pad_packed_images(features: torch.Tensor, grid_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack ``[patches, D]`` features into ``[N, max_len, D]`` (zeros after each image) and a ``[N, max_len]``
    bool mask that is True on real patches. Differentiable with respect to ``features``."""
    sizes = [h * w for h, w in grid_hw.tolist()]  # grids are host metadata: read in Python, no device wait
    images, max_len = len(sizes), max(sizes)
    lengths = torch.tensor(sizes, dtype=torch.int64, device=features.device)
    # The output size is known on the host: the repeat needs no wait for the device.
    image_of = torch.repeat_interleave(torch.arange(images, device=features.device), lengths,
                                       output_size=features.shape[0])
    starts = torch.cumsum(lengths, 0) - lengths
    slot = torch.arange(features.shape[0], device=features.device) - starts[image_of]
    padded = features.new_zeros(images, max_len, features.shape[-1]).index_put((image_of, slot), features)
    mask = torch.zeros(images, max_len, dtype=torch.bool, device=features.device).index_put(
        (image_of, slot), torch.ones_like(slot, dtype=torch.bool))
    return padded, mask


class MultiHeadAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself for self-attention), batched with SDPA.

    Args:
        dim: Width of ``x`` and of the output.
        num_heads: Number of heads (must divide ``dim``).
        context_dim: Width of ``context``; ``dim`` if None.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"CoCa attention width {dim} is not divisible by its {num_heads} heads.")
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(context_dim or dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """Attend from ``x`` to ``context``.

        Args:
            x: Queries' source ``[N, Lq, dim]``.
            context: Keys' and values' source ``[N, Lk, context_dim]``.
            key_mask: ``bool [N, Lk]``, True where a key may be attended; None for all.
            causal: Whether query ``i`` only sees keys ``<= i``.

        Returns:
            ``[N, Lq, dim]``.
        """
        n, lq, _ = x.shape
        lk = context.shape[1]
        q = self.q_proj(x).view(n, lq, -1, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(context).view(n, lk, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if causal and mask is not None:
            mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=x.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, -1))


class TextBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to image features, GELU MLP.

    Args:
        dim: Text width.
        num_heads: Attention heads.
        cross_attention: Whether the block attends to image features (caption decoder) or not (text encoder).
    """

    def __init__(self, dim: int, num_heads: int, cross_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS) if cross_attention else None
        self.cross_attn = MultiHeadAttention(dim, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        causal: bool,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Text states ``[N, L, dim]``.
            key_mask: ``bool [N, L]`` keys the self-attention may see, or None.
            causal: Causal self-attention (caption decoder) or bidirectional (text encoder).
            image: Image features ``[N, P, dim]`` for the cross-attention (caption decoder only).
            image_mask: ``bool [N, P]`` True on real patches.

        Returns:
            ``[N, L, dim]``.
        """
        h = self.norm1(x)
        x = x + self.self_attn(h, h, key_mask, causal=causal)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), image, image_mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CocaTowers(nn.Module):
    """Image pooling head, text encoder and caption decoder on top of MoonViT features.

    Args:
        args: CoCa hyper-parameters.
        vision_hidden: Width of the vision features (the pooling attention uses ``text_num_heads`` heads on it).
        vocab_size: Vocabulary of the text tower and the caption decoder (the decoder's tokenizer).
    """

    def __init__(self, args: CocaArgs, vision_hidden: int, vocab_size: int):
        super().__init__()
        width = args.text_hidden_size
        self.text_max_len = args.text_max_len
        self.init_logit_scale = args.init_logit_scale
        self.init_logit_bias = args.init_logit_bias
        # Attention pooling (SigLIP's MAP head): one learned query attends over each image's patches.
        self.pool_query = nn.Parameter(torch.empty(1, 1, vision_hidden))
        self.pool_attn = MultiHeadAttention(vision_hidden, args.text_num_heads)
        self.pool_norm = nn.LayerNorm(vision_hidden, eps=LAYER_NORM_EPS)
        self.image_proj = nn.Linear(vision_hidden, args.embed_dim, bias=False)
        # Text encoder (bidirectional, pooled at EOS).
        self.text_embed = nn.Embedding(vocab_size, width)
        self.text_pos = nn.Parameter(torch.empty(args.text_max_len, width))
        self.text_blocks = nn.ModuleList(
            TextBlock(width, args.text_num_heads, cross_attention=False) for _ in range(args.text_num_layers))
        self.text_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.text_proj = nn.Linear(width, args.embed_dim, bias=False)
        # Caption decoder (causal, cross-attends to the image's patch features).
        self.caption_embed = nn.Embedding(vocab_size, width)
        self.caption_pos = nn.Parameter(torch.empty(args.text_max_len, width))
        self.image_to_text = nn.Linear(vision_hidden, width)
        self.caption_blocks = nn.ModuleList(
            TextBlock(width, args.caption_num_heads, cross_attention=True) for _ in range(args.caption_num_layers))
        self.caption_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.caption_head = nn.Linear(width, vocab_size, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.logit_bias = nn.Parameter(torch.empty(()))

    @torch.no_grad()
    def init_weights(self, init: ParamInit | None = None, std: float = 0.02) -> None:
        """Initialize every parameter; SigLIP temperature and bias to their init values.

        Args:
            init: The initializer named at these towers (None: seeded from torch's global generator).
            std: Standard deviation of weight matrices, embeddings, the pooling query and the position tables.
        """
        init = init or ParamInit.from_global_rng()
        init_default_weights(self, std, init)
        for name in ("pool_query", "text_pos", "caption_pos"):
            init.normal_(getattr(self, name), std, name)
        self.logit_scale.fill_(self.init_logit_scale)
        self.logit_bias.fill_(self.init_logit_bias)

    def embed_image(self, image: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """Pool padded image features ``[N, P, Dv]`` (mask ``[N, P]``) into L2-normalized ``[N, embed_dim]``."""
        query = self.pool_query.expand(image.shape[0], -1, -1)
        pooled = self.pool_attn(query, image, image_mask).squeeze(1)
        return F.normalize(self.image_proj(self.pool_norm(pooled)).float(), dim=-1)

    def embed_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Encode ``[N, L]`` texts into L2-normalized ``[N, embed_dim]``, pooled at the last real token (EOS)."""
        length = text_ids.shape[1]
        x = self.text_embed(text_ids) + self.text_pos[:length]
        # Key 0 (BOS) always stays visible so that no attention row is fully masked (an empty text gives no NaN).
        positions = torch.arange(length, device=text_ids.device)
        key_mask = text_mask | (positions == 0)
        for block in self.text_blocks:
            x = block(x, key_mask, causal=False)
        x = self.text_norm(x)
        last = (text_mask.long() * positions).argmax(-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), last]
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def caption(self, text_ids: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[N, L, vocab]`` of the texts given their images' padded features."""
        length = text_ids.shape[1]
        x = self.caption_embed(text_ids) + self.caption_pos[:length]
        context = self.image_to_text(image)
        # Texts are right-padded, so causal masking alone already keeps padding away from every real token.
        for block in self.caption_blocks:
            x = block(x, None, causal=True, image=context, image_mask=image_mask)
        return self.caption_head(self.caption_norm(x))

    def forward(
        self, vision_features: torch.Tensor, grid_hw: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> CocaOutput:
        """Run the three heads.

        Args:
            vision_features: ``[patches, Dv]`` packed MoonViT features.
            grid_hw: ``int64 [N, 2]`` patch grid of each image.
            text_ids: ``int64 [N, L]`` paired texts (``bos ... eos``, then padding).
            text_mask: ``bool [N, L]`` True on real tokens.

        Returns:
            A :class:`CocaOutput`.
        """
        if text_ids.shape[1] > self.text_max_len:
            raise ValueError(f"texts of length {text_ids.shape[1]} exceed coca.text_max_len={self.text_max_len}: "
                             "truncate them in the loader or raise model.coca.text_max_len.")
        if text_ids.shape[0] != grid_hw.shape[0]:
            raise ValueError(f"{grid_hw.shape[0]} images but {text_ids.shape[0]} texts: CoCa needs one per image.")
        image, image_mask = pad_packed_images(vision_features, grid_hw)
        # The embeddings are normalized and the SigLIP temperature and bias applied in fp32 whatever the parameter
        # dtype: the loss compares every pair's logit, and bf16 rounds a logit of 10 to a step of 0.06.
        return CocaOutput(
            image_embeds=self.embed_image(image, image_mask),
            text_embeds=self.embed_text(text_ids, text_mask),
            caption_logits=self.caption(text_ids, image, image_mask),
            logit_scale=self.logit_scale.float(),
            logit_bias=self.logit_bias.float(),
        )
