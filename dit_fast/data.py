"""A synthetic text-to-video dataset made on the fly: coloured shapes that move, with captions.

    from dit_fast.data import ShapesVideoDataset, VOCABULARY
    ds = ShapesVideoDataset(num_frames=8, size=32, split="train")
    item = ds[0]          # {"video": (3, T, H, W) float32 in [-1, 1], "caption": "a red circle moving right", ...}

Every item is a pure function of (seed, split, index): nothing is downloaded or cached, two
processes (DDP ranks, a resumed run) see the same clip for the same index, and the dataset is
as long as you ask it to be.

A clip is a black background and one object (or two, with ``two_object_prob``): one of
``COLORS`` x ``SHAPES``, moving by one of ``MOTIONS``. Captions read "a <color> <shape> <motion>",
"<motion>" being "moving left/right/up/down" or "bouncing", and two objects are joined by "and"
(only in datasets with ``two_object_prob`` > 0: the bundled model was trained on one object per clip,
so its prompts have one; ``describe_prompts`` says so for ``dit-fast vocab``).
``HELD_OUT`` is a fixed set of (color, shape, motion) combinations that the "train" split never
shows; the "heldout" split draws only those, to measure whether a model composes words it has
learned separately (benchmarks/eval_prompt_following.py).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

# Pure hues 60 degrees apart, so a hue classifier can tell them apart (RGB in [0, 1]).
COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: Tuple[str, ...] = ("left", "right", "up", "down", "bouncing")
# Unit direction of each straight motion in (x, y) image coordinates (y grows downwards).
DIRECTIONS: Dict[str, Tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Every word a caption can contain, in a fixed order (the tokenizer's ids follow it).
VOCABULARY: List[str] = ["a", "and", "moving", *COLORS, *SHAPES, *MOTIONS]

Combo = Tuple[str, str, str]  # (color, shape, motion)
ALL_COMBOS: List[Combo] = list(itertools.product(COLORS, SHAPES, MOTIONS))
# One combination in six is held out: (i_color + i_shape + i_motion) % 6 == 5 picks 15 of the 90,
# spread so that every colour, shape and motion, and every pair of them, still appears in training.
HELD_OUT: List[Combo] = [
    (c, s, m)
    for (ci, c), (si, s), (mi, m) in itertools.product(enumerate(COLORS), enumerate(SHAPES), enumerate(MOTIONS))
    if (ci + si + mi) % 6 == 5
]
TRAIN_COMBOS: List[Combo] = [c for c in ALL_COMBOS if c not in set(HELD_OUT)]
SPLITS = ("train", "heldout", "all")


def motion_phrase(motion: str) -> str:
    """The caption words for a motion: "moving left", ..., or "bouncing"."""
    return "bouncing" if motion == "bouncing" else f"moving {motion}"


def caption_for(objects: Sequence[Combo]) -> str:
    """"a red circle moving right" or "a red circle moving right and a blue square bouncing"."""
    return " and ".join(f"a {c} {s} {motion_phrase(m)}" for c, s, m in objects)


GRAMMAR = "a <color> <shape> <motion>"


def describe_prompts(two_objects: bool = False) -> str:
    """What a prompt may say, one fact per line: the grammar, each slot's words, an example, and
    whether two objects joined by "and" are understood (only by a model trained with two-object clips)."""
    lines = [f"prompts read: {GRAMMAR}",
             f"  <color>:  {' '.join(COLORS)}",
             f"  <shape>:  {' '.join(SHAPES)}",
             f"  <motion>: {', '.join(motion_phrase(m) for m in MOTIONS)}",
             f"e.g. {caption_for([('red', 'circle', 'right')])!r}"]
    if two_objects:
        lines.append(f"two objects: {GRAMMAR} and {GRAMMAR}, e.g. "
                     f"{caption_for([('red', 'circle', 'right'), ('blue', 'square', 'bouncing')])!r}")
    else:
        lines.append("one object per prompt: this model was trained without two-object clips, so 'and' is not "
                     "understood")
    return "\n".join(lines)


def prompt_words(caption: str) -> List[str]:
    """Lower-case words, punctuation dropped: the same split as ``dit_fast.models.text.Tokenizer``."""
    return re.findall(r"[a-z0-9']+", caption.lower())


def parse_caption(caption: str, max_objects: Optional[int] = None) -> List[Combo]:
    """The inverse of ``caption_for``; raises ValueError naming the word that does not fit.

    An unknown word gets a message that lists what each slot of the grammar takes. ``max_objects``:
    refuse captions with more objects (a model trained on one object per clip cannot draw two).
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    words = prompt_words(caption)
    slots = (f"<color> is one of {', '.join(COLORS)}; <shape> one of {', '.join(SHAPES)}; <motion> one of "
             f"{', '.join(motion_phrase(m) for m in MOTIONS)}")
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in {caption!r}: prompts read {GRAMMAR!r}, where {slots} "
                         f"(the vocabulary: {' '.join(VOCABULARY)})")
    objects: List[Combo] = []
    i = 0
    while i < len(words):
        if objects:
            if words[i] != "and":
                raise ValueError(f"expected 'and' or the end at word {i + 1} ({words[i]!r}) of {caption!r}: "
                                 f"prompts read {GRAMMAR!r}")
            i += 1
        head = words[i : i + 3]
        if len(head) < 3 or head[0] != "a" or head[1] not in COLORS or head[2] not in SHAPES:
            raise ValueError(f"expected 'a <color> <shape>' at word {i + 1} of {caption!r}: prompts read "
                             f"{GRAMMAR!r}, where {slots}")
        i += 3
        if i < len(words) and words[i] == "bouncing":
            motion, i = "bouncing", i + 1
        elif i + 1 < len(words) and words[i] == "moving" and words[i + 1] in DIRECTIONS:
            motion, i = words[i + 1], i + 2
        else:
            raise ValueError(f"expected <motion> (moving left|right|up|down, or bouncing) at word {i + 1} of "
                             f"{caption!r}: prompts read {GRAMMAR!r}")
        objects.append((head[1], head[2], motion))
    if not objects:
        raise ValueError(f"empty prompt {caption!r}: prompts read {GRAMMAR!r}, e.g. "
                         f"{caption_for([('red', 'circle', 'right')])!r}")
    if max_objects is not None and len(objects) > max_objects:
        raise ValueError(f"{caption!r} asks for {len(objects)} objects; this model draws at most {max_objects} "
                         f"(it was trained without two-object clips): prompts read {GRAMMAR!r}")
    return objects


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4  # sub-pixel samples per axis: anti-aliased edges


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> torch.Tensor:
    """Coverage in [0, 1] of a shape of radius ``r`` centred at (cx, cy) on a size x size grid.

    circle: |d| <= r; square: max(|dx|, |dy|) <= 0.8 r; triangle: apex up, base 2 r wide at y = cy + r.
    Fill ratios of their bounding boxes differ (pi/4, 1, 1/2): that is what the shape scorer reads.
    """
    n = size * _SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / _SUPERSAMPLE  # sub-pixel centres, in pixels
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r
    elif shape == "triangle":
        inside = (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    cov = inside.float().reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(dim=(1, 3))
    return cov


def trajectory(motion: str, num_frames: int, start: Tuple[float, float], distance: float) -> List[Tuple[float, float]]:
    """Object centre per frame. Straight motions cover ``distance`` pixels at constant speed;
    "bouncing" goes up by ``distance`` and back down, twice-rectified sine over the clip."""
    x0, y0 = start
    out = []
    for t in range(num_frames):
        f = t / max(num_frames - 1, 1)
        if motion == "bouncing":
            out.append((x0, y0 - distance * abs(math.sin(math.pi * f))))
        else:
            dx, dy = DIRECTIONS[motion]
            out.append((x0 + dx * distance * f, y0 + dy * distance * f))
    return out


def render_clip(objects: Sequence[Combo], num_frames: int, size: int, gen: torch.Generator,
                layout: Optional[List[dict]] = None) -> Tuple[torch.Tensor, List[dict]]:
    """Draw the clip: (3, T, H, W) in [-1, 1] and the per-object layout (radius, start, distance).

    Positions are drawn from ``gen`` so that the object stays fully inside the frame.
    """
    video = torch.zeros(3, num_frames, size, size)
    layouts = []
    for k, (color, shape, motion) in enumerate(objects):
        if color not in COLORS:
            raise ValueError(f"unknown color {color!r}; expected one of {list(COLORS)}")
        if motion not in MOTIONS:
            raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS}")
        if layout is not None:
            lay = layout[k]
        else:
            u = torch.rand(4, generator=gen).tolist()
            r = size * (0.14 + 0.05 * u[0])  # 4.5 .. 6 pixels at 32x32
            distance = size * (0.35 + 0.15 * u[1])  # 11 .. 16 pixels at 32x32
            margin = r + 1.0
            lo, hi = margin, size - margin
            dx, dy = DIRECTIONS.get(motion, (0, -1))
            span_x = (hi - lo) - (distance if dx else 0.0)
            span_y = (hi - lo) - (distance if dy else 0.0)
            x0 = lo + (distance if dx < 0 else 0.0) + u[2] * span_x
            y0 = lo + (distance if dy < 0 else 0.0) + u[3] * span_y
            lay = {"radius": r, "start": (x0, y0), "distance": distance}
        layouts.append(lay)
        rgb = torch.tensor(COLORS[color]).view(3, 1, 1)
        for t, (cx, cy) in enumerate(trajectory(motion, num_frames, lay["start"], lay["distance"])):
            cov = shape_mask(shape, cx, cy, lay["radius"], size)  # (H, W)
            # later objects are drawn over earlier ones
            video[:, t] = video[:, t] * (1 - cov) + rgb * cov
    return video * 2 - 1, layouts


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _item_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ShapesVideoDataset(torch.utils.data.Dataset):
    """Clips of coloured shapes with captions, deterministic per (seed, split, index).

    split: "train" draws from ``TRAIN_COMBOS``, "heldout" from ``HELD_OUT``, "all" from both.
    two_object_prob: chance that a clip holds a second object (its own combination from the split).
    length: what ``len()`` reports; any non-negative index works, so a trainer can stream forever.
    """

    def __init__(self, num_frames: int = 8, size: int = 32, split: str = "train", length: int = 1_000_000,
                 seed: int = 0, two_object_prob: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 (motion needs two frames), got {num_frames}")
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {size}")
        if not 0.0 <= two_object_prob <= 1.0:
            raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
        self.num_frames, self.size, self.split = num_frames, size, split
        self.length, self.seed, self.two_object_prob = length, seed, two_object_prob
        self.combos = {"train": TRAIN_COMBOS, "heldout": HELD_OUT, "all": ALL_COMBOS}[split]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        gen = torch.Generator().manual_seed(_item_seed(self.seed, self.split, index))
        n_obj = 2 if torch.rand((), generator=gen).item() < self.two_object_prob else 1
        picks = torch.randint(len(self.combos), (n_obj,), generator=gen).tolist()
        objects = [self.combos[p] for p in picks]
        video, layouts = render_clip(objects, self.num_frames, self.size, gen)
        return {"video": video, "caption": caption_for(objects), "objects": objects, "layouts": layouts}


def collate(items: Sequence[dict]) -> dict:
    """Stack videos into (B, 3, T, H, W); captions stay a list of strings."""
    return {"video": torch.stack([it["video"] for it in items]), "caption": [it["caption"] for it in items],
            "objects": [it["objects"] for it in items]}


# --------------------------------------------------------------------------------------------
# Scoring a generated clip (benchmarks/eval_prompt_following.py): the dataset read backwards
# --------------------------------------------------------------------------------------------

_HUES = {name: _h for name, _h in zip(COLORS, (0.0, 60.0, 120.0, 180.0, 240.0, 300.0))}


def _hue_degrees(rgb: torch.Tensor) -> float:
    r, g, b = (float(v) for v in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    if mx - mn < 1e-6:
        return float("nan")  # grey: no hue
    if mx == r:
        h = ((g - b) / (mx - mn)) % 6
    elif mx == g:
        h = (b - r) / (mx - mn) + 2
    else:
        h = (r - g) / (mx - mn) + 4
    return 60.0 * h


def score_clip(video: torch.Tensor, threshold: float = 0.35) -> dict:
    """Read (color, shape, motion) off a one-object clip (3, T, H, W) in [-1, 1].

    color:  hue of the mean colour of the object pixels (max channel above ``threshold``), nearest
            of the six hues in ``COLORS``.
    shape:  fill ratio of the object's bounding box, median over frames: square ~1, circle ~pi/4,
            triangle ~1/2; split at 0.93 and 0.69.
    motion: centroid of the object across frames: net displacement along the dominant axis gives
            left/right/up/down; a small net displacement with a large rise in between is "bouncing".
    Returns the three labels (None where the clip shows no object) and the raw measurements.
    """
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) clip, got {tuple(video.shape)}")
    rgb = ((video.detach().float().cpu() + 1) / 2).clamp(0, 1)  # (3, T, H, W)
    T, H, W = rgb.shape[1:]
    cov = rgb.max(dim=0).values  # (T, H, W) object coverage: the background is black
    mask = cov > threshold
    out = {"color": None, "shape": None, "motion": None, "hue": None, "fill": None, "displacement": None}
    if mask.sum() == 0:
        return out
    mean_rgb = (rgb * mask).sum(dim=(1, 2, 3)) / mask.sum()
    hue = _hue_degrees(mean_rgb)
    out["hue"] = hue
    if hue == hue:  # not NaN
        out["color"] = min(_HUES, key=lambda n: min(abs(hue - _HUES[n]), 360 - abs(hue - _HUES[n])))

    fills, centroids = [], []
    ys = torch.arange(H, dtype=torch.float32).view(H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, W)
    for t in range(T):
        m = mask[t]
        if m.sum() == 0:
            continue
        rows, cols = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
        box = (rows[-1] - rows[0] + 1).item() * (cols[-1] - cols[0] + 1).item()
        fills.append(m.sum().item() / box)
        w = cov[t] * m
        centroids.append(((w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()))
    fill = sorted(fills)[len(fills) // 2]
    out["fill"] = fill
    out["shape"] = "square" if fill > 0.93 else ("circle" if fill > 0.69 else "triangle")
    if len(centroids) >= 2:
        c = torch.tensor([[float(a), float(b)] for a, b in centroids])  # (T', 2) as (x, y)
        disp = c[-1] - c[0]
        rise = (c[0, 1] + c[-1, 1]) / 2 - c[:, 1].min()  # how far it went up in between, pixels
        out["displacement"] = (float(disp[0]), float(disp[1]))
        if disp.abs().max() < 0.15 * H and rise > 0.2 * H:
            out["motion"] = "bouncing"
        elif disp[0].abs() >= disp[1].abs():
            out["motion"] = "right" if disp[0] > 0 else "left"
        else:
            out["motion"] = "down" if disp[1] > 0 else "up"
    return out
