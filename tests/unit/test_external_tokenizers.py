"""A data root may name its own tokenizer: any tokenizer.json, or a tiktoken BPE file (as Moonlight ships), with the
special roles mapped to its tokens by name."""

from __future__ import annotations

import base64
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from data.tokenizer import SPECIAL_ROLES, load_root_tokenizer, train_tokenizer
from data.tokenizer.tiktoken_bpe import parse_tiktoken_bpe, tokenizer_from_tiktoken
from storage import LocalStorage

# A split pattern of tiktoken's kind (cl100k's shape, without possessive quantifiers).
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Kimi-VL reads 1024 images, 12,345 tokens and more!",
         "naïve café — déjà vu; emojis 🙂🚀 and CJK 你好世界", "  spaces\tand\nnew lines\r\n  ", "don't we'll THEY'RE"]
KIMI_ROLES = {"bos": "[BOS]", "eos": "[EOS]", "pad": "[PAD]", "image": "<|media_pad|>",
              "image_start": "<|media_start|>", "image_end": "<|media_end|>", "im_start": "<|im_user|>",
              "im_end": "<|im_end|>", "box_start": "<|box_start|>", "box_end": "<|box_end|>"}


def tiktoken_ranks(vocab_size: int = 700) -> dict[bytes, int]:
    """Byte-level BPE ranks learned from TEXTS (bytes first), as a tiktoken file stores them."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    from data.tokenizer.tiktoken_bpe import _bytes_to_unicode

    from_char = {c: b for b, c in _bytes_to_unicode().items()}
    by_id = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    return {bytes(from_char[c] for c in token): rank for rank, (token, _) in enumerate(by_id)}


def test_a_tiktoken_file_encodes_exactly_as_tiktoken_does():
    import tiktoken

    ranks = tiktoken_ranks()
    data = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()).encode()
    assert parse_tiktoken_bpe(data) == ranks
    specials = {token: len(ranks) + i for i, token in enumerate(KIMI_ROLES.values())}
    reference = tiktoken.Encoding("test", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    ours = tokenizer_from_tiktoken(ranks, PATTERN, specials)
    for text in [*TEXTS, "unseen words: zygote quixotic", "<|media_pad|> between <|im_end|> tokens"]:
        expected = reference.encode(text, allowed_special="all")
        assert ours.encode(text, add_special_tokens=False).ids == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text


def test_a_malformed_tiktoken_line_is_named():
    with pytest.raises(ValueError, match="line 2 of the tiktoken file"):
        parse_tiktoken_bpe(b"IQ== 0\nnot-base64!! x\n")


def write_root(tmp_path, manifest: dict, name: str, data: bytes) -> LocalStorage:
    (tmp_path / name).write_bytes(data)
    (tmp_path / "manifest.json").write_text(json.dumps({"sources": {}, "tokenizer": name, **manifest}))
    return LocalStorage(tmp_path)


def test_a_root_naming_a_tiktoken_file_maps_the_special_roles_by_name(tmp_path):
    ranks = tiktoken_ranks()
    data = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()).encode()
    added = {token: len(ranks) + i for i, token in enumerate(KIMI_ROLES.values())}
    storage = write_root(tmp_path, {"tokenizer_format": "tiktoken", "tokenizer_pattern": PATTERN,
                                    "tokenizer_added_tokens": added, "tokenizer_special_tokens": KIMI_ROLES},
                         "tiktoken.model", data)
    tokenizer = load_root_tokenizer(storage, json.loads(storage.read("manifest.json")))
    assert tokenizer.image_id == added["<|media_pad|>"] and tokenizer.im_start_id == added["<|im_user|>"]
    assert tokenizer.vocab_size == len(ranks) + len(added)
    assert tokenizer.encode("x<|media_pad|>y")[1] == tokenizer.image_id


def test_any_tokenizer_json_with_its_own_special_names(tmp_path):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=list(KIMI_ROLES.values()),
                                                             show_progress=False))
    storage = write_root(tmp_path, {"tokenizer_special_tokens": KIMI_ROLES}, "hub.json", tokenizer.to_str().encode())
    loaded = load_root_tokenizer(storage, json.loads(storage.read("manifest.json")))
    assert {role: getattr(loaded, f"{role}_id") for role in SPECIAL_ROLES} == {
        role: tokenizer.token_to_id(token) for role, token in KIMI_ROLES.items()}


def test_a_missing_special_token_fails_naming_the_role_and_the_token(tmp_path):
    own = train_tokenizer(TEXTS, vocab_size=400)
    storage = write_root(tmp_path, {"tokenizer_special_tokens": {"image": "<|media_pad|>"}}, "tokenizer.json",
                         own.to_str().encode())
    with pytest.raises(ValueError, match=r"no token '<\|media_pad\|>' for the special role 'image'"):
        load_root_tokenizer(storage, json.loads(storage.read("manifest.json")))
    with pytest.raises(ValueError, match="unknown special-token roles"):
        load_root_tokenizer(write_root(tmp_path, {"tokenizer_special_tokens": {"picture": "<|image|>"}},
                                       "tokenizer.json", own.to_str().encode()),
                            json.loads((tmp_path / "manifest.json").read_text()))
