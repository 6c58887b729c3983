"""The built-in scenes: coloured shapes on a noisy background, and their captions, boxes, questions and pair
statements.

Every scene is a pure function of (seed, split, index), so the data set is reproducible byte for byte. Some
colour-shape combinations never occur in ``train``/``val``; the ``test_compositional`` split puts at least one of
them in every scene. ``probe="small_colour"`` (``data=synthetic_control``) draws an image positive control instead:
every scene with a tiny dot, and a foil caption that differs from the caption only in the dot's colour
(`probe_sample`). `vlm.data.synthetic` writes them as shards.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 225, 45),
    "green": (45, 175, 70),
    "blue": (45, 95, 235),
    "purple": (150, 60, 205),
    "white": (242, 242, 242),
}
SIZES = {"small": (0.14, 0.20), "large": (0.27, 0.35)}  # object diameter as a fraction of the shorter side
# One held-out shape per colour (orange is never held out): seen separately in training, never together.
HELD_OUT = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "star"), ("purple", "diamond"), ("white", "cross")}
)
SPLITS = {"train": 0, "val": 1, "test_compositional": 2}
NUMBERS = ("zero", "one", "two", "three", "four")
PROBES = ("none", "small_colour")
# small_colour's dot: its diameter as a fraction of the shorter side, at most 7 px where the shorter side is 96
# (data=synthetic_control, compare_embedders): under a quarter of a 32-pixel patch or a stride-32 cell
DOT = (0.05, 0.075)
DOT_PHRASES = ("there is also a tiny {c} dot.", "a tiny {c} dot as well.", "and one tiny {c} dot.")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # pixel x1, y1, x2, y2 (exclusive)

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def phrase(self, rng: np.random.Generator, with_size: bool | None = None) -> str:
        if with_size is None:
            with_size = rng.random() < 0.5
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


def _combos(split: str) -> list[tuple[str, str]]:
    every = [(c, s) for c in COLORS for s in SHAPES]
    if split == "test_compositional":
        return sorted(HELD_OUT)
    return [cs for cs in every if cs not in HELD_OUT]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + w / 2, y1 + h / 2
    r = min(w, h) / 2
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], fill=fill)
    elif shape == "cross":
        t = w / 3
        draw.rectangle([x1 + t, y1, x2 - 1 - t, y2 - 1], fill=fill)
        draw.rectangle([x1, y1 + t, x2 - 1, y2 - 1 - t], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(a: Obj, b: Obj) -> str:
    (ax, ay), (bx, by) = a.center, b.center
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def scene_caption(objs: list[Obj], rng: np.random.Generator) -> str:
    if len(objs) == 1:
        o = objs[0]
        templates = ("{a}.", "there is {a}.", "{a} on a dark background.", "one {p} and nothing else.")
        p = o.phrase(rng)
        return templates[rng.integers(len(templates))].format(a=with_article(p), p=p)
    order = list(rng.permutation(len(objs)))
    a, b = objs[order[0]], objs[order[1]]
    rel = _relation(a, b)
    if rng.random() < 0.5:
        head = f"{with_article(a.phrase(rng))} {rel} {with_article(b.phrase(rng))}"
    else:
        head = f"the {a.phrase(rng)} is {rel} the {b.phrase(rng)}"
    rest = [objs[i] for i in order[2:]]
    if not rest:
        text = head + "."
    elif rng.random() < 0.5:
        text = head + ", and " + " and ".join(with_article(o.phrase(rng)) for o in rest) + "."
    else:
        text = head + ". there is also " + " and ".join(with_article(o.phrase(rng)) for o in rest) + "."
    if rng.random() < 0.3:
        text = f"{NUMBERS[len(objs)]} shapes: " + text
    return text


def _questions(objs: list[Obj], rng: np.random.Generator, combos: list[tuple[str, str]]) -> list[dict]:
    qa = [{"question": "how many shapes are there?", "answer": NUMBERS[len(objs)], "type": "count"}]
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    unique_shape = [o for o in objs if shapes.count(o.shape) == 1]
    if unique_shape:
        o = unique_shape[rng.integers(len(unique_shape))]
        qa.append({"question": f"what color is the {o.shape}?", "answer": o.color, "type": "color"})
    unique_color = [o for o in objs if colors.count(o.color) == 1]
    if unique_color:
        o = unique_color[rng.integers(len(unique_color))]
        qa.append({"question": f"what shape is the {o.color} object?", "answer": o.shape, "type": "shape"})
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        c, s = sorted(present)[rng.integers(len(present))]  # sorted: a set's order changes with each process's hash seed
        qa.append({"question": f"is there {with_article(c)} {s}?", "answer": "yes", "type": "exist"})
    else:
        absent = [cs for cs in combos if cs not in present]
        c, s = absent[rng.integers(len(absent))]
        qa.append({"question": f"is there {with_article(c)} {s}?", "answer": "no", "type": "exist"})
    return qa


def _pair_statement(left: list[Obj], right: list[Obj], rng: np.random.Generator) -> tuple[str, bool]:
    kind = rng.integers(4)
    if kind == 0:
        return "the left image has more shapes than the right image.", len(left) > len(right)
    if kind == 1:
        c = list(COLORS)[rng.integers(len(COLORS))]
        truth = any(o.color == c for o in left) and any(o.color == c for o in right)
        return f"both images contain {with_article(c)} shape.", truth
    if kind == 2:
        s = SHAPES[rng.integers(len(SHAPES))]
        truth = any(o.shape == s for o in left) != any(o.shape == s for o in right)
        return f"exactly one image contains a {s}.", truth
    o = (left + right)[rng.integers(len(left) + len(right))]
    return f"the right image contains {with_article(o.color)} {o.shape}.", any((p.color, p.shape) == (o.color, o.shape) for p in right)


def _pair_template(left: list[Obj], rng: np.random.Generator) -> tuple[str, Callable[[list[Obj]], bool]]:
    """A pair statement chosen from the left scene alone, and its truth as a function of the right scene's
    objects. Chosen so that either truth is reachable with some right scene."""
    kind = rng.integers(4)
    if kind == 0:  # "more" in the direction the left count leaves open
        n = len(left)
        if n <= 2:
            return "the right image has more shapes than the left image.", lambda right: len(right) > n
        return "the left image has more shapes than the right image.", lambda right: n > len(right)
    if kind == 1 and left:
        c = left[rng.integers(len(left))].color
        return f"both images contain {with_article(c)} shape.", lambda right: any(o.color == c for o in right)
    if kind == 2:
        s = SHAPES[rng.integers(len(SHAPES))]
        has = any(o.shape == s for o in left)
        return f"exactly one image contains a {s}.", lambda right: any(o.shape == s for o in right) != has
    o = left[rng.integers(len(left))] if left else Obj("circle", "red", "small", (0, 0, 1, 1))
    return (f"the right image contains {with_article(o.color)} {o.shape}.",
            lambda right: any((p.color, p.shape) == (o.color, o.shape) for p in right))


def balanced_statement(seed: int, split: str, index: int, partner: int) -> tuple[str, bool, int]:
    """A pair statement about scene ``index`` (left) whose label carries nothing the wording can give away,
    as NLVR2 intends: the truth and the statement are drawn independently (the statement from the left scene
    alone), then the right scene is searched for among the split's generator, starting at ``partner``, until
    the statement has the drawn truth (experiments/downstream/text_prior.py measures the text-only prior).
    Returns (statement, label, right scene index); a pure function of its arguments."""
    left = layout(seed, split, index)[2]
    rng = np.random.default_rng([seed, SPLITS[split], index, 3])
    want = bool(rng.random() < 0.5)
    statement, truth_of = _pair_template(left, rng)
    right = partner
    for _ in range(1000):
        truth = truth_of(layout(seed, split, right)[2])
        if truth == want:
            break
        right = int(rng.integers(10**7))
    return statement, truth, right


CANVAS_SHAPES = ("default", "wide")


def layout(seed: int, split: str, index: int, aspect: str = "default") -> tuple[int, int, list[Obj]]:
    """Canvas size and objects of one scene, a pure function of its arguments (no pixels drawn).

    ``aspect``: ``default`` draws the shorter side in 112-176 px and the longer up to 1.75x it; ``wide`` draws what
    web images span, the longer side in 96-512 px and the aspect ratio log-uniform in 1:3-3:1 (the shorter side
    kept >= 64 px, so that every shape stays readable), to measure what padding costs and packing saves."""
    if aspect not in CANVAS_SHAPES:
        raise ValueError(f"aspect must be one of {', '.join(CANVAS_SHAPES)}, got {aspect!r}")
    rng = np.random.default_rng([seed, SPLITS[split], index, 0])
    if aspect == "wide":
        long = int(rng.integers(96, 513))
        short = max(64, int(round(long / math.exp(rng.uniform(0.0, math.log(3.0))))))
        long = max(long, short)
    else:
        short = int(rng.integers(112, 177))
        long = int(round(short * rng.uniform(1.0, 1.75)))
    w, h = (long, short) if rng.random() < 0.6 else (short, long)
    combos = _combos(split)
    objs: list[Obj] = []
    for k in range(int(rng.integers(1, 5))):
        if split == "test_compositional" and k == 0:
            color, shape = combos[rng.integers(len(combos))]
        else:
            allowed = _combos("train")
            color, shape = allowed[rng.integers(len(allowed))]
        size = "small" if rng.random() < 0.5 else "large"
        lo, hi = SIZES[size]
        d = int(round(min(w, h) * rng.uniform(lo, hi)))
        for _attempt in range(40):
            x, y = int(rng.integers(2, w - d - 1)), int(rng.integers(2, h - d - 1))
            box = (x, y, x + d, y + d)
            if all(_apart(box, o.box) for o in objs):
                objs.append(Obj(shape, color, size, box))
                break
    return w, h, objs


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 3) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


@dataclass(frozen=True)
class Dot:
    """The small_colour probe's deciding object: a tiny circle, the colour its foil caption gives it instead, and
    its sentence (``{c}``: the colour)."""

    obj: Obj
    foil: str
    phrase: str


def probe_layout(seed: int, split: str, index: int, aspect: str = "default",
                 swap: bool = False) -> tuple[int, int, list[Obj], Dot]:
    """A scene of the ``small_colour`` probe: the scene's canvas and shapes (``layout``, at most three) and a tiny
    dot placed clear of them. The dot's colour and its foil's are drawn as an ordered pair of two colours,
    apart from everything else in the scene, so that a caption and its foil are equally likely either way round:
    only the dot's pixels tell them apart. ``swap``: the same scene with the dot in the foil's colour (the scene
    the foil describes)."""
    w, h, objs = layout(seed, split, index, aspect)
    objs = objs[:3]
    rng = np.random.default_rng([seed, SPLITS[split], index, 5])
    names = list(COLORS)
    said, other = (names[k] for k in rng.choice(len(names), size=2, replace=False))
    if swap:
        said, other = other, said
    phrase = DOT_PHRASES[int(rng.integers(len(DOT_PHRASES)))]
    d = max(3, round(min(w, h) * rng.uniform(*DOT)))
    while True:
        for _attempt in range(100):
            x, y = int(rng.integers(2, w - d - 1)), int(rng.integers(2, h - d - 1))
            box = (x, y, x + d, y + d)
            if all(_apart(box, o.box) for o in objs):
                return w, h, objs, Dot(Obj("circle", said, "tiny", box), other, phrase)
        objs = objs[:-1]  # no room for the dot: the last shape gives up its place


def render(seed: int, split: str, index: int, w: int, h: int, objs: list[Obj]) -> Image.Image:
    """Muted noisy background, thin grey clutter strokes, then the shapes."""
    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    bg = rng.integers(25, 100, size=3)
    bg = (bg * 0.5 + bg.mean() * 0.5).astype(np.int16)  # muted, never a shape colour
    noise = rng.integers(-6, 7, size=(h, w, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        g = int(rng.integers(60, 170))
        xy = [int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(w)), int(rng.integers(h))]
        draw.line(xy, fill=(g, g, g), width=int(rng.integers(1, 3)))
    for o in objs:
        draw_shape(draw, o.shape, o.box, COLORS[o.color])
    return img


def jpeg(img: Image.Image) -> bytes:
    """A scene's file bytes (the same for the same pixels: PIL's encoder is deterministic)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def scene_jpeg(seed: int, split: str, index: int, aspect: str = "default") -> bytes:
    """The bytes of scene ``index``'s ``KEY.jpg``, drawn again rather than read (a pure function of its arguments)."""
    return jpeg(render(seed, split, index, *layout(seed, split, index, aspect)))


def partner_of(seed: int, split: str, index: int, total: int) -> int:
    """The scene a scene's pair statement is about (any other scene of the split)."""
    return (index + 1 + int(np.random.default_rng([seed, 99, SPLITS[split], index]).integers(total - 1))) % total


def make_sample(seed: int, split: str, index: int, partner: int, aspect: str = "default",
                probe: str = "none") -> tuple[str, bytes, dict]:
    if probe == "small_colour":
        return probe_sample(seed, split, index, aspect)
    if probe != "none":
        raise ValueError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
    w, h, objs = layout(seed, split, index, aspect)
    img = render(seed, split, index, w, h, objs)
    partner_objs = layout(seed, split, partner, aspect)[2]
    rng = np.random.default_rng([seed, SPLITS[split], index, 2])
    statement, label = _pair_statement(objs, partner_objs, rng)
    key = f"{split}-{index:07d}"
    meta = {
        "caption": scene_caption(objs, rng),
        "width": img.width,
        "height": img.height,
        "boxes": [list(o.box) for o in objs],
        "labels": [SHAPES.index(o.shape) for o in objs],
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size} for o in objs],
        "qa": _questions(objs, rng, _combos(split)),
        "pair": {"partner": f"{split}-{partner:07d}", "statement": statement, "label": label},
    }
    return key, jpeg(img), meta


def probe_sample(seed: int, split: str, index: int, aspect: str = "default",
                 swap: bool = False) -> tuple[str, bytes, dict]:
    """A ``small_colour`` scene: its shapes and the dot, a caption naming them all and a *foil*, the caption with
    the dot's colour changed (``KEY.json``'s ``foil``; ``dot``: its box, colour and foil colour). Matched against
    foils (``task.collate.itm_foil_fraction``), a model is right only where it reads the colour of an object a
    quarter of a patch wide. No questions or pair statements: the probe is for matching."""
    w, h, objs, dot = probe_layout(seed, split, index, aspect, swap)
    img = render(seed, split, index, w, h, [*objs, dot.obj])
    rng = np.random.default_rng([seed, SPLITS[split], index, 2])
    shapes = scene_caption(objs, rng).replace(" and nothing else", "") if objs else ""  # the dot is something else
    caption, foil = (f"{shapes} {dot.phrase.format(c=c)}".strip() for c in (dot.obj.color, dot.foil))
    every = [*objs, dot.obj]
    meta = {
        "caption": caption,
        "foil": foil,
        "width": img.width,
        "height": img.height,
        "boxes": [list(o.box) for o in every],  # the dot's too: region features pool it on its own box
        "labels": [SHAPES.index(o.shape) for o in every],
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size} for o in every],
        "dot": {"box": list(dot.obj.box), "color": dot.obj.color, "foil_color": dot.foil},
    }
    return f"{split}-{index:07d}", jpeg(img), meta
