"""A real byte-level BPE tokenizer (the ``tokenizers`` library) with the framework's special tokens.

A data root may also name a tokenizer of its own (any ``tokenizer.json``, or a tiktoken-style BPE file as Moonlight
ships, data/tokenizer/tiktoken_bpe.py) in its manifest, with the tokens that play each special role (image and video
placeholders, ChatML roles, ...) mapped by name: :func:`load_root_tokenizer`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Their order fixes their ids (0..9): changing it invalidates every trained tokenizer.
SPECIAL_TOKENS = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|image_start|>",
    "<|image|>",
    "<|image_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|im_start|>",
    "<|im_end|>",
)
_ATTRIBUTES = ("pad_id", "bos_id", "eos_id", "image_start_id", "image_id", "image_end_id", "box_start_id",
               "box_end_id", "im_start_id", "im_end_id")
# The roles the loader and the model rely on, and the token that plays each in the framework's own tokenizers.
SPECIAL_ROLES = dict(zip((name.removesuffix("_id") for name in _ATTRIBUTES), SPECIAL_TOKENS, strict=True))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the special tokens come first, with ids 0..9."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class TextTokenizer:
    """Encoding and decoding plus the ids of the special tokens the loader and the model rely on.

    Args:
        tokenizer: The ``tokenizers`` tokenizer.
        special_tokens: ``{role: token}`` for the roles of :data:`SPECIAL_ROLES` whose token differs from the
            framework's (e.g. ``{"image": "<|media_pad|>"}``); a role's token missing from the vocabulary raises
            ``ValueError`` naming both.
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: Mapping[str, str] | None = None):
        unknown = sorted(set(special_tokens or {}) - set(SPECIAL_ROLES))
        if unknown:
            raise ValueError(f"unknown special-token roles {unknown}: allowed are {sorted(SPECIAL_ROLES)}")
        self.tokenizer = tokenizer
        self.special_tokens = {**SPECIAL_ROLES, **(special_tokens or {})}
        for (role, token), attribute in zip(self.special_tokens.items(), _ATTRIBUTES, strict=True):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no token {token!r} for the special role '{role}': train one "
                                 "with python -m data.tokenizer, or map the role to a token it has "
                                 f"(tokenizer_special_tokens: {{{role}: ...}} in the manifest)")
            setattr(self, attribute, token_id)

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: Mapping[str, str] | None = None) -> TextTokenizer:
        if not Path(path).exists():
            raise FileNotFoundError(f"no tokenizer at {path}")
        return cls(Tokenizer.from_file(str(path)), special_tokens)

    @classmethod
    def from_bytes(cls, data: bytes, special_tokens: Mapping[str, str] | None = None) -> TextTokenizer:
        """A tokenizer from the contents of a ``tokenizer.json`` (e.g. read from object storage)."""
        return cls(Tokenizer.from_str(data.decode("utf-8")), special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special token is added (special-token strings in the text are recognized)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of each text, in one call into the tokenizer (without offsets: nothing reads them).
        Runs on the library's thread pool unless ``TOKENIZERS_PARALLELISM=false`` (loader workers set it: they are
        the parallelism); a single text is encoded as by :meth:`encode`, starting no pool."""
        if len(texts) == 1:
            return [self.encode(texts[0])]
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def tokenizer_id(data: bytes) -> str:
    """How the manifest names a tokenizer: the SHA-256 of its ``tokenizer.json`` (first 16 hex digits)."""
    return hashlib.sha256(data).hexdigest()[:16]


def load_root_tokenizer(storage, manifest: dict) -> TextTokenizer:
    """The tokenizer a data root's manifest names.

    Manifest keys: ``tokenizer`` (a path in the root), ``tokenizer_format`` (``tokenizers``: a ``tokenizer.json``,
    the default; ``tiktoken``: a tiktoken BPE file, with ``tokenizer_pattern``, its split regex, and
    ``tokenizer_added_tokens``, ``{token: id}`` of its special tokens), ``tokenizer_special_tokens`` (``{role:
    token}``, see :class:`TextTokenizer`).

    Raises:
        ValueError: An unknown format, a tiktoken file without its pattern, or a role's token missing.
    """
    data = storage.read(manifest["tokenizer"])
    special = manifest.get("tokenizer_special_tokens")
    kind = manifest.get("tokenizer_format", "tokenizers")
    if kind == "tokenizers":
        return TextTokenizer.from_bytes(data, special)
    if kind == "tiktoken":
        from data.tokenizer.tiktoken_bpe import parse_tiktoken_bpe, tokenizer_from_tiktoken

        if not manifest.get("tokenizer_pattern"):
            raise ValueError("a tiktoken tokenizer needs its split regex: set tokenizer_pattern in the manifest")
        tokenizer = tokenizer_from_tiktoken(parse_tiktoken_bpe(data), manifest["tokenizer_pattern"],
                                            manifest.get("tokenizer_added_tokens", {}))
        return TextTokenizer(tokenizer, special)
    raise ValueError(f"unknown tokenizer_format {kind!r} in the manifest: allowed are 'tokenizers' and 'tiktoken'")
