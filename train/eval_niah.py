"""Needle in a haystack, as in the Kimi-VL report's Table 2: recall per haystack-length bucket, needles placed
uniformly over depth, for a text haystack and an image-sequence (video) haystack.

Every trial builds one prompt of a given total length: haystack, the needle at a given depth, then the question,
whose answer is the needle's value. The needle is a key-value fact, ``The pass code of vault 17 is river.``, and
the prompt ends with the answer's lead-in, ``... Answer: The pass code of vault 17 is``, so the next tokens must
be the value.

Haystacks:
- ``text``: long documents (``long_doc``, then ``text``) of the evaluation root, tokenized back to back.
- ``image_caption``: a video of frames (``<t=12.0s>`` then the image, as the loader renders videos) drawn from the
  root's images; the needle is a caption fact written after one frame.
- ``image_frame``: the same video; the needle is a frame showing ``vault 17: river`` as rendered text, so the model
  has to read it out of the image (the report's video haystack).

Scoring (``mode``):
- ``choice`` (default): the value against ``num_candidates - 1`` distractor values of the same form, ranked by the
  model's log-likelihood of each continuation; a hit needs the true value strictly above every distractor (a model
  with no information ties and misses). Chance is ``1 / num_candidates``, which gives small or barely trained
  models a measurable, calibrated signal.
- ``generate``: greedy decoding of as many tokens as the value has; a hit is an exact match (the report's protocol;
  near 0 for models that are not trained for it).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw, ImageFont
from torch import nn

from config.model import VisionArgs
from data.images import image_to_patches
from data.samples import Document, ImagePatches
from data.tokenizer import TextTokenizer
from train.eval_data import HeldOutData, continuation_logprobs, greedy_decode, image_span_document

HAYSTACKS = ("text", "image_caption", "image_frame")
MODES = ("choice", "generate")
# The report's buckets (Table 2): (0, 2K], (2K, 4K], ..., (64K, 128K].
REPORT_EDGES = [2048 * 2**k for k in range(7)]
# Needle values: everyday words that byte-level BPE vocabularies keep as single tokens after a space.
VALUES = ("river stone cloud garden lamp window paper music bridge forest tiger silver morning harbor candle valley "
          "letter planet engine market winter summer orchard ladder basket mirror signal island").split()
# Fewer haystack tokens than this and the trial measures the question, not retrieval.
MIN_HAYSTACK_TOKENS = 16


def length_buckets(context: int) -> list[tuple[int, int]]:
    """``(low, high]`` token-length buckets up to ``context``: the report's, cut at the context; below 8K tokens
    (debug models) three doubling buckets ending at the context instead."""
    edges = [e for e in REPORT_EDGES if e < context] + [context]
    if len(edges) < 3:
        edges = [context // 4, context // 2, context]
    return list(zip([0, *edges[:-1]], edges))


class PromptTooShort(ValueError):
    """The prompt length leaves no room for a haystack."""


@dataclass
class Trial:
    """One prompt: where its needle went and how the model did."""

    haystack: str
    bucket: str
    length: int  # tokens of the whole prompt, answer lead-in included
    depth: float  # where the needle starts, as a share of the haystack (0: first, 1: last)
    needle_index: int  # token index of the needle's first token in the prompt
    value_index: int  # token index where the value's tokens start inside the needle (text needles; -1 for frames)
    value: str
    hit: bool = False
    scores: list[float] = field(default_factory=list)  # choice: log-likelihood of each candidate (truth first)
    generated: str = ""


class NeedleBench:
    """Builds the haystack prompts from an evaluation root and scores a model on them.

    Args:
        data: The evaluation root (haystack documents and images).
        tokenizer: The model's tokenizer.
        vision: The model's vision hyper-parameters.
        seed: Trials (lengths, haystack windows, values, distractors) are a function of it.
        frame_patches: Patch cap of each haystack frame (a 64-patch frame is 16 image tokens).
        num_candidates: Values ranked in ``choice`` mode (the truth and ``num_candidates - 1`` distractors).
    """

    def __init__(self, data: HeldOutData, tokenizer: TextTokenizer, vision: VisionArgs, seed: int = 0,
                 frame_patches: int = 64, num_candidates: int = 10):
        if not 2 <= num_candidates <= len(VALUES):
            raise ValueError(f"num_candidates={num_candidates}: allowed is 2..{len(VALUES)}")
        self.num_candidates = num_candidates
        self.data = data
        self.tok = tokenizer
        self.vision = vision
        self.seed = seed
        self.frame_patches = frame_patches
        self._stream: list[int] | None = None
        self._frames: list[ImagePatches] | None = None
        self._sentence_end: dict[int, bool] = {}

    # ----- haystack material ------------------------------------------------------------------------------------

    def text_stream(self) -> list[int]:
        """The evaluation root's long documents (then short texts) as one token stream."""
        if self._stream is None:
            stream: list[int] = []
            for source in ("long_doc", "text"):
                if source not in self.data.source_names:
                    continue
                for sample in self.data.samples(source, 64):
                    text = "\n".join(s["text"] for s in sample.meta["segments"] if "text" in s)
                    stream += self.tok.encode(text + "\n\n")
            if len(stream) < MIN_HAYSTACK_TOKENS:
                raise ValueError(f"{self.data.storage.url} has no long_doc or text source to build haystacks from")
            self._stream = stream
        return self._stream

    def frames(self) -> list[ImagePatches]:
        """Images of the evaluation root (video frames first), each capped at ``frame_patches`` patches."""
        if self._frames is None:
            frames: list[ImagePatches] = []
            for source in ("video", "caption", "interleaved"):
                if source in self.data.source_names:
                    for sample in self.data.samples(source, 64, self.frame_patches):
                        frames += list(sample.images.values())
            if not frames:
                raise ValueError(f"{self.data.storage.url} has no images to build an image haystack from")
            self._frames = frames
        return self._frames

    def _ends_sentence(self, token: int) -> bool:
        if token not in self._sentence_end:
            self._sentence_end[token] = self.tok.decode([token]).rstrip(" ").endswith((".", "\n"))
        return self._sentence_end[token]

    def _needle_frame(self, vault: int, value: str) -> ImagePatches:
        image = Image.new("RGB", (168, 56), (255, 255, 255))
        try:
            font = ImageFont.load_default(size=22)
        except TypeError:  # Pillow < 10.1
            font = ImageFont.load_default()
        ImageDraw.Draw(image).text((6, 16), f"vault {vault}: {value}", fill=(0, 0, 0), font=font)
        # Never downscaled below its native 12 x 4 patches: the text must stay legible.
        patches, grid = image_to_patches(image, self.vision.patch_size, self.vision.merge_size, 48)
        return ImagePatches(patches, grid, image.size)

    # ----- prompts ----------------------------------------------------------------------------------------------

    def build(self, haystack: str, length: int, depth: float, rng: random.Random
              ) -> tuple[Document, Trial, list[list[int]]]:
        """A prompt of ``length`` tokens with the needle at ``depth``; returns it, its :class:`Trial` record and
        the candidate continuations (truth first)."""
        vault, value = rng.randint(10, 99), rng.choice(VALUES)
        key = self.tok.encode(f" The pass code of vault {vault} is")
        answer = self.tok.encode(f" {value}")
        if haystack == "image_frame":
            question = self.tok.encode(f"\n\nQuestion: one frame shows the pass code of vault {vault}. What is it?"
                                       "\nAnswer:") + key
        else:
            question = self.tok.encode(f"\n\nQuestion: what is the pass code of vault {vault}?\nAnswer:") + key
        needle = key + answer + self.tok.encode(".")
        if haystack == "text":
            doc, needle_index, share = self._text_prompt(length, depth, needle, question, rng)
            value_index = needle_index + len(key)
        else:
            extra = self._needle_frame(vault, value) if haystack == "image_frame" else needle
            doc, needle_index, share = self._video_prompt(length, depth, extra, question, rng)
            value_index = needle_index + len(key) if haystack == "image_caption" else -1
        trial = Trial(haystack, "", len(doc.tokens), share, needle_index, value_index, value)
        distractors = rng.sample([v for v in VALUES if v != value], self.num_candidates - 1)
        return doc, trial, [answer] + [self.tok.encode(f" {v}") for v in distractors]

    def _text_prompt(self, length: int, depth: float, needle: list[int], question: list[int], rng: random.Random
                     ) -> tuple[Document, int, float]:
        stream = self.text_stream()
        budget = length - 1 - len(needle) - len(question)
        if budget < MIN_HAYSTACK_TOKENS:
            raise PromptTooShort(f"a prompt of {length} tokens leaves no room for a haystack")
        start = rng.randrange(len(stream))
        hay = [stream[(start + i) % len(stream)] for i in range(budget)]
        cut = round(depth * budget)
        # Needles go between sentences (the nearest sentence end at or after the depth, within 64 tokens).
        for probe in range(cut, min(budget, cut + 64)):
            if probe == 0 or self._ends_sentence(hay[probe - 1]):
                cut = probe
                break
        tokens = [self.tok.bos_id, *hay[:cut], *needle, *hay[cut:], *question]
        return Document(tokens, [False] * len(tokens)), 1 + cut, cut / budget

    def _video_prompt(self, length: int, depth: float, needle: list[int] | ImagePatches, question: list[int],
                      rng: random.Random) -> tuple[Document, int, float]:
        """Frames ``<t=..s> <image>`` at one per second until the length is reached; the needle (a frame, or a
        caption written after a frame) at ``depth`` of the frames."""
        merge = self.vision.merge_size
        frames = self.frames()
        needle_cost = len(needle) if isinstance(needle, list) else \
            (needle.grid[0] // merge) * (needle.grid[1] // merge) + 2
        # Slack for timestamps that grow a token when the needle frame shifts the later ones by a second.
        budget = length - 1 - needle_cost - len(question) - 8
        parts: list[list[int] | ImagePatches] = []
        used, second, offset = 0, 0, rng.randrange(len(frames))
        while True:
            frame = frames[(offset + second) % len(frames)]
            stamp = self.tok.encode(f"<t={second:.1f}s>")
            cost = len(stamp) + (frame.grid[0] // merge) * (frame.grid[1] // merge) + 2
            if used + cost > budget:
                break
            parts += [stamp, frame]
            used, second = used + cost, second + 1
        if second < 2:
            raise PromptTooShort(f"a prompt of {length} tokens holds fewer than two frames")
        at = round(depth * second)  # the needle comes after ``at`` frames
        if isinstance(needle, list):
            parts.insert(2 * at, needle)
        else:  # the needle frame takes the next timestamp; later frames shift by one second
            parts.insert(2 * at, needle)
            parts.insert(2 * at, self.tok.encode(f"<t={at:.1f}s>"))
            for i in range(2 * at + 2, len(parts), 2):
                parts[i] = self.tok.encode(f"<t={i // 2:.1f}s>")
        head = image_span_document([self.tok.bos_id], self.tok, merge, parts[: 2 * at])
        needle_index = len(head.tokens)
        doc = image_span_document([self.tok.bos_id], self.tok, merge, parts + [question])
        return doc, needle_index, at / second

    # ----- scoring ----------------------------------------------------------------------------------------------

    def score(self, model: nn.Module, doc: Document, trial: Trial, candidates: list[list[int]], mode: str) -> None:
        """Fill ``trial.hit`` (and its scores or generated text)."""
        if mode == "choice":
            trial.scores = continuation_logprobs(model, doc, candidates, self.tok, self.vision)
            trial.hit = all(trial.scores[0] > other for other in trial.scores[1:])
        else:
            generated = greedy_decode(model, doc, len(candidates[0]), self.tok, self.vision)
            trial.generated = self.tok.decode(generated)
            trial.hit = generated == candidates[0]

    def run(self, model: nn.Module, haystack: str, buckets: list[tuple[int, int]], trials_per_bucket: int,
            mode: str = "choice") -> dict:
        """Recall of ``model`` per bucket on one haystack kind.

        Each bucket gets ``trials_per_bucket`` prompts, needles at evenly spaced depths from 0 to 1 and lengths
        drawn uniformly inside the bucket (at least the shortest prompt that holds a haystack).

        Returns:
            ``{"buckets": {"(lo, hi]": recall or None (too short for this haystack)}, "recall": overall,
            "chance": ..., "trials": [...]}``.
        """
        if haystack not in HAYSTACKS or mode not in MODES:
            raise ValueError(f"haystack must be one of {HAYSTACKS} and mode one of {MODES}")
        rng = random.Random(f"{self.seed}/{haystack}")
        trials, recall = [], {}
        for low, high in buckets:
            name, hits = f"({low}, {high}]", []
            for i in range(trials_per_bucket):
                depth = i / max(trials_per_bucket - 1, 1)
                # The first bucket starts at half its top: shorter prompts are mostly question, little haystack.
                length = rng.randint(low + 1 if low else high // 2 + 1, high)
                try:
                    doc, trial, candidates = self.build(haystack, length, depth, rng)
                    if trial.length <= low:  # whole frames fell short of the bucket: take its top length
                        doc, trial, candidates = self.build(haystack, high, depth, rng)
                except PromptTooShort:
                    break  # a bucket too short for this haystack (tiny debug contexts): reported as None
                trial.bucket = name
                self.score(model, doc, trial, candidates, mode)
                hits.append(trial.hit)
                trials.append(asdict(trial))
            recall[name] = sum(hits) / len(hits) if hits else None
        if not trials:
            raise PromptTooShort(f"no bucket up to {buckets[-1][1]} tokens holds a {haystack} haystack")
        return {"mode": mode, "chance": 1 / self.num_candidates if mode == "choice" else 0.0,
                "recall": sum(t["hit"] for t in trials) / len(trials), "buckets": recall, "trials": trials}
