"""tiktoken-style BPE files (the format Moonlight and Kimi ship, ``tiktoken.model``) as ``tokenizers`` tokenizers.

The file holds one ``base64(token bytes) rank`` line per token; the split pattern and the special tokens (ids above
the ranks) come from the model's code, so a data root's manifest names them. Ranks are merge priorities: a BPE whose
merges are ordered by the rank of their result, over byte-level symbols, encodes exactly as tiktoken does (checked
against the ``tiktoken`` package in tests). Each merge is recovered by running tiktoken's BPE on the token itself
with only lower ranks allowed: the last two parts are the pair that merges into it.
"""

from __future__ import annotations

import base64

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

__all__ = ["parse_tiktoken_bpe", "tokenizer_from_tiktoken"]


def parse_tiktoken_bpe(data: bytes) -> dict[bytes, int]:
    """``{token bytes: rank}`` of a tiktoken BPE file; a malformed line raises ``ValueError`` naming it."""
    ranks = {}
    for number, line in enumerate(data.decode("ascii").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as error:
            raise ValueError(f"line {number} of the tiktoken file is not 'base64 rank': {line[:60]!r}") from error
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters (what byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _split(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's BPE of ``token`` using only merges of rank ``< below``."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < below and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def tokenizer_from_tiktoken(ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` that encodes exactly as ``tiktoken.Encoding(pat_str=pattern,
    mergeable_ranks=ranks, special_tokens=special_tokens)``.

    Args:
        ranks: Token bytes -> rank (= id), every single byte included.
        pattern: The pre-tokenization regex (tiktoken's ``pat_str``).
        special_tokens: Special token string -> id.
    """
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"the tiktoken ranks lack {len(missing)} single bytes (e.g. {missing[:3]}): not a byte-level "
                         "BPE")
    to_char = _bytes_to_unicode()
    spell = lambda token: "".join(to_char[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token of rank {rank} is not the merge of two lower-ranked tokens")
        merges.append((spell(parts[0]), spell(parts[1])))
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does before merging.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    for token, token_id in sorted(special_tokens.items(), key=lambda item: item[1]):
        if token_id != tokenizer.get_vocab_size():
            raise ValueError(f"special token {token!r} has id {token_id}, but the next free id is "
                             f"{tokenizer.get_vocab_size()}: list special tokens with consecutive ids after the ranks")
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return tokenizer
