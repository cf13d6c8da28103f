"""Structured sample kinds turned into plain segments: video, agent trajectories, and coordinates as text.

``video``: ``frames`` is an ordered list of ``{"image": "<ext>", "time": seconds}``; each frame becomes its
timestamp as text followed by the image (``<t=1.5s>`` then ``<|image_start|>...``), before the sample's own
segments (a caption or a question about the clip).

``agent``: the sample's segments state the task; ``steps`` is an ordered list of ``{"image": "<ext>"?, "action":
...}`` where the image is the screenshot the action was taken on. Actions are text with coordinates on the
0..1000 grid of that screenshot: ``click``/``double_click`` (``point``), ``drag`` (``point`` to ``to``), ``type``
(``text``), ``scroll`` (``direction``), ``done``.

Coordinates are written ``<|box_start|>(x,y)<|box_end|>`` for a point and ``<|box_start|>(x0,y0),(x1,y1)<|box_end|>``
for a box, always relative to the image they belong to, so they survive any resize of it.
"""

from __future__ import annotations

# Grounding coordinates are written as integers on a 0..1000 grid of the image, independent of its resolution.
BOX_GRID = 1000
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
ACTIONS = {"click": ("point",), "double_click": ("point",), "drag": ("point", "to"), "type": ("text",),
           "scroll": ("direction",), "done": ()}
SCROLL_DIRECTIONS = ("up", "down", "left", "right")


class SampleError(ValueError):
    """A corrupt or invalid sample: skipped by the loader, counted and logged with its shard and key."""


class DataError(RuntimeError):
    """The data cannot feed the run (missing sources, too many corrupt samples)."""


def _is_xy(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def expand_segments(meta: dict) -> None:
    """Validate ``frames`` (video) / ``steps`` (agent) and expand them into ``meta["segments"]`` in place.

    Raises:
        SampleError: A malformed frame list or step (the loader skips and logs the sample).
    """
    kind = meta.get("kind")
    if kind == "video":
        frames = meta.get("frames")
        if not isinstance(frames, list) or not frames:
            raise SampleError("missing field: a video needs a non-empty 'frames' list")
        expanded, last = [], -1.0
        for frame in frames:
            time = frame.get("time") if isinstance(frame, dict) else None
            if not isinstance(time, (int, float)) or time < last or not isinstance(frame.get("image"), str):
                raise SampleError(f"bad video frame {frame!r}: expected {{'image': ext, 'time': seconds}}, "
                                  "times non-decreasing")
            last = float(time)
            expanded += [{"text": f"<t={time:.1f}s>"}, {"image": frame["image"]}]
        meta["segments"] = expanded + list(meta["segments"])
    elif kind == "agent":
        steps = meta.get("steps")
        if not isinstance(steps, list) or not steps:
            raise SampleError("missing field: an agent trajectory needs a non-empty 'steps' list")
        expanded, screen = list(meta["segments"]), None
        for step in steps:
            action = step.get("action") if isinstance(step, dict) else None
            if action not in ACTIONS or any(field not in step for field in ACTIONS[action]):
                raise SampleError(f"bad agent step {step!r}: actions are {sorted(ACTIONS)} with their fields")
            if "image" in step:
                screen = step["image"]
                expanded.append({"image": screen})
            if ("point" in ACTIONS[action]) and screen is None:
                raise SampleError(f"agent step {step!r} has coordinates but no screenshot before it")
            expanded.append({"action": {k: v for k, v in step.items() if k != "image"}, "screen": screen})
        meta["segments"] = expanded


def check_actions(meta: dict, sizes: dict[str, tuple[int, int]]) -> None:
    """Every coordinate of an agent action lies on its screenshot (``sizes``: image ext -> (width, height))."""
    for segment in meta["segments"]:
        action = segment.get("action")
        if action is None:
            continue
        for name in ("point", "to"):
            if name in action:
                width, height = sizes[segment["screen"]]
                if not (_is_xy(action[name]) and 0 <= action[name][0] < width and 0 <= action[name][1] < height):
                    raise SampleError(f"agent {action['action']} {name} {action[name]} outside the "
                                      f"{width}x{height} screenshot")


def check_point(point, size: tuple[int, int]) -> None:
    width, height = size
    if not (_is_xy(point) and 0 <= point[0] < width and 0 <= point[1] < height):
        raise SampleError(f"point {point} outside the {width}x{height} image")


def _grid(value: float, side: int) -> int:
    return round(value * BOX_GRID / side)


def format_point(point: list[float], size: tuple[int, int]) -> str:
    """A pixel point as text on the 0..1000 grid: ``<|box_start|>(x,y)<|box_end|>`` (the pixel's centre)."""
    width, height = size
    return f"{BOX_START}({_grid(point[0] + 0.5, width)},{_grid(point[1] + 0.5, height)}){BOX_END}"


def format_box(box: list[float], size: tuple[int, int]) -> str:
    """A pixel box as text on the resolution-independent 0..1000 grid: ``(x0,y0),(x1,y1)``."""
    width, height = size
    x0, y0, x1, y1 = (_grid(v, s) for v, s in zip(box, (width, height, width, height)))
    return f"({x0},{y0}),({x1},{y1})"


def format_action(action: dict, size: tuple[int, int] | None) -> str:
    """One agent action as text, e.g. ``Action: click <|box_start|>(512,300)<|box_end|>``."""
    name = action["action"]
    if name in ("click", "double_click"):
        text = f"{name} {format_point(action['point'], size)}"
    elif name == "drag":
        text = f"drag {format_point(action['point'], size)} to {format_point(action['to'], size)}"
    elif name == "type":
        text = f'type "{action["text"]}"'
    elif name == "scroll":
        text = f"scroll {action['direction']}"
    else:
        text = "done"
    return f"Action: {text}"


def grounding_text(objects: list[dict], size: tuple[int, int]) -> str:
    """Grounded objects as text: each label with its box and/or point."""
    parts = []
    for obj in objects:
        text = obj["label"]
        if "box" in obj:
            text += f" {BOX_START}{format_box(obj['box'], size)}{BOX_END}"
        if "point" in obj:
            text += f" {format_point(obj['point'], size)}"
        parts.append(text)
    return " ".join(parts)
