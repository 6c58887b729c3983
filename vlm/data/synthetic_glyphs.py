"""A second built-in data set: coloured letters and digits on textured backgrounds, captioned with a relation.

It differs from the built-in scenes (`vlm.data.synthetic`) in what a caption asks a model to see: the scenes'
objects differ by outline (six solid shapes), these by *glyph identity* (18 capital letters and 8 digits in
Pillow's built-in sans-serif font, strokes about a tenth of the font size thick or bold, tilted by up to 15
degrees), so that telling a K from an X takes the strokes' arrangement, not a silhouette. Other differences:
1-3 glyphs rather than 1-4 shapes; eight colours, two of them new (cyan, pink) and no white; canvases with both
sides drawn independently in 96-192 pixels (aspect ratios up to 2:1 either way; the scenes' are 112-308); dark
*or* light backgrounds, each a low-saturation tint with a gradient, stripes, checks or clouds, rather than the
scenes' dark noise with grey strokes; other words ("letter", "digit", "character", "big", "sits") and
templates; and a relation between two glyphs named along the axis on which their boxes are further apart (the
scenes compare centres), so it always holds box to box. Held-out colour-glyph combinations (two per colour,
sixteen glyphs, each held out in one colour only) never occur in ``train``/``val``; every ``test_compositional``
scene holds at least one of them.

Written as the scenes are (webdataset ``KEY.jpg`` + ``KEY.json``: ``caption``, ``boxes`` (tight pixel boxes of
each glyph's ink), ``labels`` (indices into `GLYPHS`), ``objects``, ``qa``), so that the same loader and the same
recipe read them with ``data=glyphs``; each sample is a pure function of (seed, split, index). There are no pair
statements (``data=synthetic_nlvr2`` draws its pairs from the scenes' generator).

    python -m vlm.data.synthetic_glyphs --out data/glyphs
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm.data.synthetic import Generated, write_tar
from vlm.data.synthetic_scenes import NUMBERS, SPLITS, with_article

# Letters and digits a sans-serif font draws apart: no A (the article), I/O (1/0), S/Z (5/2), B/D (8/0), Q (O).
LETTERS = "CEFGHJKLMNPRTUVWXY"
DIGITS = "23456789"
GLYPHS = tuple(LETTERS + DIGITS)
COLORS = {
    "red": (220, 30, 35),
    "orange": (250, 130, 0),
    "yellow": (235, 205, 0),
    "green": (30, 160, 60),
    "cyan": (0, 185, 205),
    "blue": (35, 75, 225),
    "purple": (135, 45, 195),
    "pink": (245, 95, 175),
}
# font size as a fraction of the shorter side (the ink of a capital is ~0.7 of it: 22-29% / 34-43% of the side)
SIZES = {"small": (0.32, 0.42), "big": (0.48, 0.62)}
# Two glyphs per colour, each glyph in one colour only: seen in seven colours in training, never in this one.
HELD_OUT = frozenset({
    ("red", "K"), ("red", "7"), ("orange", "E"), ("orange", "3"), ("yellow", "H"), ("yellow", "9"),
    ("green", "R"), ("green", "4"), ("cyan", "M"), ("cyan", "6"), ("blue", "T"), ("blue", "2"),
    ("purple", "X"), ("purple", "8"), ("pink", "F"), ("pink", "5"),
})
TEXTURES = ("gradient", "stripes", "checks", "clouds")
GAP = 4  # pixels between any two glyphs' boxes, so that every pair is apart along at least one axis
STREAM = 55  # this generator's random streams, apart from the scenes' at the same (seed, split, index)


@dataclass(frozen=True)
class Glyph:
    char: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # pixel x1, y1, x2, y2 (exclusive) of the glyph's ink
    font_size: int
    stroke: int  # extra stroke width in pixels (0: the font's regular weight)
    angle: int  # degrees, counter-clockwise

    @property
    def kind(self) -> str:
        return "digit" if self.char.isdigit() else "letter"

    def phrase(self, rng: np.random.Generator) -> str:
        """``[small|big] colour [letter|digit] CHAR``: the colour is always there, the rest at random."""
        words = [self.size] if rng.random() < 0.4 else []
        words.append(self.color)
        if rng.random() < 0.5:
            words.append(self.kind)
        return " ".join([*words, self.char])


@cache
def _combos(split: str) -> tuple[tuple[str, str], ...]:
    if split == "test_compositional":
        return tuple(sorted(HELD_OUT))
    return tuple((c, g) for c in COLORS for g in GLYPHS if (c, g) not in HELD_OUT)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded Aileron Regular: no font file on disk


@lru_cache(maxsize=256)
def glyph_mask(char: str, font_size: int, stroke: int, angle: int) -> Image.Image:
    """The glyph's coverage (mode L), tilted and cropped to its ink (pixels over 96 of 255)."""
    font = _font(font_size)
    x1, y1, x2, y2 = font.getbbox(char, stroke_width=stroke)
    mask = Image.new("L", (x2 - x1 + 4, y2 - y1 + 4))
    ImageDraw.Draw(mask).text((2 - x1, 2 - y1), char, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    if angle:
        mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    ink = np.asarray(mask) > 96
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return mask.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def layout(seed: int, split: str, index: int) -> tuple[int, int, list[Glyph]]:
    """Canvas size and glyphs of one scene, a pure function of its arguments. Every (colour, glyph) occurs at most
    once in a scene, so a phrase names one glyph; a glyph that finds no free place in 40 tries is left out."""
    rng = np.random.default_rng([seed, STREAM, SPLITS[split], index, 0])
    w, h = int(rng.integers(96, 193)), int(rng.integers(96, 193))
    short = min(w, h)
    allowed = _combos("train")
    glyphs: list[Glyph] = []
    for k in range(int(rng.integers(1, 4))):
        if split == "test_compositional" and k == 0:
            held = _combos(split)
            color, char = held[rng.integers(len(held))]
        else:
            taken = {(g.color, g.char) for g in glyphs}
            free = [cg for cg in allowed if cg not in taken]
            color, char = free[rng.integers(len(free))]
        size = "small" if rng.random() < 0.5 else "big"
        font_size = round(short * rng.uniform(*SIZES[size]))
        stroke = round(font_size * rng.choice([0.0, 0.03, 0.06]))
        angle = int(rng.integers(-15, 16))
        mw, mh = glyph_mask(char, font_size, stroke, angle).size
        for _attempt in range(40):
            x, y = int(rng.integers(2, max(3, w - mw - 1))), int(rng.integers(2, max(3, h - mh - 1)))
            box = (x, y, x + mw, y + mh)
            if box[2] <= w and box[3] <= h and all(_apart(box, g.box) for g in glyphs):
                glyphs.append(Glyph(char, color, size, box, font_size, stroke, angle))
                break
    return w, h, glyphs


def background(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, str, str]:
    """A low-saturation tint, dark or light, blended with a second one by a texture, plus faint pixel noise: no
    pixel is near a glyph colour. Returns (image, tone, texture)."""
    tone = "dark" if rng.random() < 0.5 else "light"
    level = rng.uniform(25, 80) if tone == "dark" else rng.uniform(155, 205)
    first = level + rng.uniform(-14, 14, size=3)
    second = first + (1 if tone == "dark" else -1) * rng.uniform(10, 28) + rng.uniform(-6, 6, size=3)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    angle = rng.uniform(0, math.pi)
    along = xx * np.float32(math.cos(angle)) + yy * np.float32(math.sin(angle))
    if texture == "gradient":
        t = (along - along.min()) / max(1e-6, float(along.max() - along.min()))
    elif texture == "stripes":
        t = 0.5 + 0.5 * np.sin(along * np.float32(2 * math.pi / rng.uniform(5, 18)))
    elif texture == "checks":
        cell = int(rng.integers(6, 21))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:  # clouds: a coarse random grid, smoothly upsampled
        coarse = (rng.random((int(rng.integers(3, 8)), int(rng.integers(3, 8)))) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    noise = rng.integers(-4, 5, size=(h, w)).astype(np.float32)
    # a plane per channel: numpy broadcasts over a trailing axis of 3 several times slower
    planes = [np.clip(np.float32(first[c]) + np.float32(second[c] - first[c]) * t + noise, 0, 255).astype(np.uint8)
              for c in range(3)]
    return Image.merge("RGB", [Image.fromarray(p) for p in planes]), tone, texture


def render(seed: int, split: str, index: int, w: int, h: int, glyphs: list[Glyph]) -> tuple[Image.Image, str, str]:
    """The scene's pixels, and its background's tone and texture."""
    rng = np.random.default_rng([seed, STREAM, SPLITS[split], index, 1])
    img, tone, texture = background(rng, w, h)
    for g in glyphs:
        img.paste(COLORS[g.color], g.box, glyph_mask(g.char, g.font_size, g.stroke, g.angle))
    return img, tone, texture


def jpeg(img: Image.Image) -> bytes:
    """File bytes with full-resolution colour (4:4:4): a stroke a few pixels wide keeps its colour, which 4:2:0
    chroma subsampling would blend with the background's."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)
    return buf.getvalue()


def relation(a: Glyph, b: Glyph) -> str:
    """Where ``a`` is from ``b``, along the axis on which their boxes are further apart (always apart: `GAP`)."""
    gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
    gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
    if gap_x >= gap_y:
        return "to the left of" if a.box[2] <= b.box[0] else "to the right of"
    return "above" if a.box[3] <= b.box[1] else "below"


def caption(glyphs: list[Glyph], tone: str, rng: np.random.Generator) -> str:
    if len(glyphs) == 1:
        p = glyphs[0].phrase(rng)
        templates = ("{a}.", "there is {a}.", "{a} on a {tone} background.", "just one character: {a}.", "a single {p}.")
        return templates[rng.integers(len(templates))].format(a=with_article(p), p=p, tone=tone)
    order = list(rng.permutation(len(glyphs)))
    a, b = glyphs[order[0]], glyphs[order[1]]
    rel = relation(a, b)
    kind = rng.integers(3)
    if kind == 0:
        head = f"{with_article(a.phrase(rng))} {rel} {with_article(b.phrase(rng))}"
    elif kind == 1:
        head = f"the {a.phrase(rng)} is {rel} the {b.phrase(rng)}"
    else:
        head = f"{with_article(a.phrase(rng))} sits {rel} {with_article(b.phrase(rng))}"
    rest = [glyphs[i] for i in order[2:]]
    if not rest:
        text = head + "."
    elif rng.random() < 0.5:
        text = head + ", and " + " and ".join(with_article(g.phrase(rng)) for g in rest) + "."
    else:
        text = head + ". there is also " + " and ".join(with_article(g.phrase(rng)) for g in rest) + "."
    if rng.random() < 0.3:
        text = f"{NUMBERS[len(glyphs)]} characters: " + text
    return text


def questions(glyphs: list[Glyph], rng: np.random.Generator, combos: tuple[tuple[str, str], ...]) -> list[dict]:
    """Count, colour, character and existence questions, each with one unambiguous answer (as the scenes')."""
    qa = [{"question": "how many characters are there?", "answer": NUMBERS[len(glyphs)], "type": "count"}]
    chars = [g.char for g in glyphs]
    colors = [g.color for g in glyphs]
    unique_char = [g for g in glyphs if chars.count(g.char) == 1]
    if unique_char:
        g = unique_char[rng.integers(len(unique_char))]
        qa.append({"question": f"what color is the {g.char}?", "answer": g.color, "type": "color"})
    unique_color = [g for g in glyphs if colors.count(g.color) == 1]
    if unique_color:
        g = unique_color[rng.integers(len(unique_color))]
        qa.append({"question": f"which character is {g.color}?", "answer": g.char, "type": "glyph"})
    present = sorted({(g.color, g.char) for g in glyphs})
    if rng.random() < 0.5:
        c, ch = present[rng.integers(len(present))]
        qa.append({"question": f"is there {with_article(c)} {ch}?", "answer": "yes", "type": "exist"})
    else:
        absent = [cg for cg in combos if cg not in present]
        c, ch = absent[rng.integers(len(absent))]
        qa.append({"question": f"is there {with_article(c)} {ch}?", "answer": "no", "type": "exist"})
    return qa


def make_sample(seed: int, split: str, index: int) -> tuple[str, bytes, dict]:
    w, h, glyphs = layout(seed, split, index)
    img, tone, texture = render(seed, split, index, w, h, glyphs)
    rng = np.random.default_rng([seed, STREAM, SPLITS[split], index, 2])
    key = f"{split}-{index:07d}"
    meta = {
        "caption": caption(glyphs, tone, rng),
        "width": w,
        "height": h,
        "boxes": [list(g.box) for g in glyphs],
        "labels": [GLYPHS.index(g.char) for g in glyphs],
        "objects": [{"glyph": g.char, "kind": g.kind, "color": g.color, "size": g.size, "font_size": g.font_size,
                     "stroke": g.stroke, "angle": g.angle} for g in glyphs],
        "background": {"tone": tone, "texture": texture},
        "qa": questions(glyphs, rng, _combos(split)),
    }
    return key, jpeg(img), meta


def sample_files(seed: int, split: str, index: int) -> list[tuple[str, bytes]]:
    key, jpg, meta = make_sample(seed, split, index)
    return [(f"{key}.jpg", jpg), (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]


def write_shard(path: str, seed: int, split: str, start: int, stop: int) -> int:
    return write_tar(path, (sample_files(seed, split, i) for i in range(start, stop)))


@dataclass(frozen=True)
class SyntheticGlyphs(Generated):
    """Parameters of the built-in glyph scenes; ``ensure()`` writes them (and a tokenizer of their texts) once."""

    NAME = "glyphs"

    root: str
    seed: int = 0
    train_size: int = 20000
    val_size: int = 1000
    test_size: int = 1000
    shard_size: int = 500
    workers: int = 2

    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val": self.val_size, "test_compositional": self.test_size}

    def shard_job(self, path: str, split: str, start: int, stop: int, total: int) -> tuple:
        return write_shard, path, self.seed, split, start, stop

    def tokenizer_texts(self):
        return texts(self.shards("train"))


def texts(shards: list[str]):
    """Every text a model may read in the glyph scenes: captions, questions and answers."""
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    yield meta["caption"]
                    for qa in meta["qa"]:
                        yield qa["question"] + " " + qa["answer"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m vlm.data.synthetic_glyphs")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    data = SyntheticGlyphs(a.out, a.seed, a.train_size, a.val_size, a.test_size, a.shard_size, a.workers)
    if not data.ensure():
        print(f"glyphs: {a.out} is already complete")


if __name__ == "__main__":
    main()
