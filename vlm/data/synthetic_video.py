"""The built-in clips: shapes that move, appear, disappear or change colour, captioned by what happens.

Every clip is drawn as one of four events and then, with probability one half, played backwards, its caption
saying what the reversed clip shows: "moves right" becomes "moves left", "appears" "disappears", "changes
from red to blue" "from blue to red", "moves towards" "moves away from". So every caption has a *foil*, the
caption of the same frames in the other order (``KEY.json``'s ``foil``), and the two are equally likely for any
set of frames: a model that sees the frames in no order, or the middle one (clips have an odd number of frames,
so the middle frame is the same played either way), cannot tell a caption from its foil. Any other single frame
can: an appearing shape is more often absent a third of the way in than a disappearing one.
Matching a clip against its foil (``task.collate.itm_foil_fraction``) measures whether a model uses time.

Written as webdataset shards (``KEY.mp4``, H.264, + ``KEY.json``) and read by the same code as real video;
each clip is a pure function of (seed, split, index).

    python -m vlm.data.synthetic_video --out data/synthetic_video
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlm.data.synthetic import Generated, write_tar
from vlm.data.synthetic_scenes import COLORS, SHAPES, SPLITS, draw_shape, with_article
from vlm.data.video import encode_video

EVENTS = ("move", "appear", "colour", "approach")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
OPPOSITE = {"right": "left", "left": "right", "down": "up", "up": "down"}


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """The built-in scenes' muted noisy background with grey strokes: the same in every frame of a clip."""
    bg = rng.integers(25, 100, size=3)
    bg = (bg * 0.5 + bg.mean() * 0.5).astype(np.int16)
    noise = rng.integers(-6, 7, size=(h, w, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        g = int(rng.integers(60, 170))
        draw.line([int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(w)), int(rng.integers(h))],
                  fill=(g, g, g), width=1)
    return img


def clip(seed: int, split: str, index: int, frames: int = 17, height: int = 96, width: int = 160,
         reverse: bool | None = None) -> tuple[np.ndarray, dict]:
    """Clip ``index``: its frames [T, H, W, 3] uint8 and its record (caption, foil, event, reversed, objects).

    ``reverse``: play it this way instead of the way drawn for it (None): the same frames in the other order, its
    caption the foil's and its foil the caption's, which is what makes a foil the caption of the clip backwards."""
    rng = np.random.default_rng([seed, 77, SPLITS[split], index])
    size = int(rng.integers(22, 30))  # a shape spans most of one 32-pixel patch
    shapes = rng.choice(len(SHAPES), size=2, replace=False)
    colours = rng.choice(len(COLORS), size=3, replace=False)
    names = list(COLORS)
    actor, other = (SHAPES[shapes[0]], names[colours[0]]), (SHAPES[shapes[1]], names[colours[1]])
    event = EVENTS[int(rng.integers(len(EVENTS)))]
    t = np.linspace(0.0, 1.0, frames)
    margin = size // 2 + 2
    # the other shape stands still somewhere; the actor's track: centre (x, y) per frame, colour per frame, shown
    ox, oy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
    colour = [actor[1]] * frames
    shown = np.ones(frames, dtype=bool)
    if event == "move":  # drawn moving right or down; reversed, left or up
        axis = "right" if rng.random() < 0.5 else "down"
        extent = width if axis == "right" else height
        travel = rng.uniform(0.35, 0.55) * extent
        start = rng.uniform(margin, extent - margin - travel)
        pos = start + travel * t
        cross = rng.uniform(margin, (height if axis == "right" else width) - margin)
        xs, ys = (pos, np.full(frames, cross)) if axis == "right" else (np.full(frames, cross), pos)
    elif event == "approach":  # drawn moving towards the other shape; reversed, away from it
        for _ in range(1000):  # a straight track whose both ends lie inside the frame
            angle = rng.uniform(0, 2 * math.pi)
            near = rng.uniform(size + 4, size + 10)
            far = near + rng.uniform(30, 50)
            ox, oy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
            ends = [(ox + math.cos(angle) * r, oy + math.sin(angle) * r) for r in (far, near)]
            if all(margin <= x <= width - margin and margin <= y <= height - margin for x, y in ends):
                break
        dist = far + (near - far) * t
        xs, ys = ox + math.cos(angle) * dist, oy + math.sin(angle) * dist
    else:  # appears (drawn so; reversed, disappears) or changes colour, at a moment around the middle
        xs, ys = np.full(frames, rng.uniform(margin, width - margin)), np.full(frames, rng.uniform(margin, height - margin))
        moment = int(round(rng.uniform(0.3, 0.7) * (frames - 1)))
        if event == "appear":
            shown[:moment] = False
        else:
            colour = [actor[1]] * moment + [names[colours[2]]] * (frames - moment)
    drawn = bool(rng.random() < 0.5)  # drawn even when ``reverse`` is given: the draws after it stay the same
    reverse = drawn if reverse is None else bool(reverse)
    background = _background(rng, height, width)
    out = []
    for k in range(frames):  # the actor is drawn last: where the shapes cross, it is on top
        img = background.copy()
        draw = ImageDraw.Draw(img)
        draw_shape(draw, other[0], _box(ox, oy, size), COLORS[other[1]])
        if shown[k]:
            draw_shape(draw, actor[0], _box(xs[k], ys[k], size), COLORS[colour[k]])
        out.append(np.asarray(img))
    video = np.stack(out[::-1] if reverse else out)
    caption, foil = _captions(rng, event, reverse, actor, other, colour, locals().get("axis"))
    record = {"caption": caption, "foil": foil, "event": event, "reversed": reverse,
              "objects": [{"shape": actor[0], "color": actor[1]}, {"shape": other[0], "color": other[1]}]}
    return video, record


def _box(x: float, y: float, size: int) -> tuple[int, int, int, int]:
    return int(x - size / 2), int(y - size / 2), int(x - size / 2) + size, int(y - size / 2) + size


def _captions(rng, event: str, reverse: bool, actor, other, colour, axis) -> tuple[str, str]:
    """(the caption of the clip as played, the caption of it played the other way)."""
    a = f"{actor[1]} {actor[0]}"
    o = f"{other[1]} {other[0]}"
    lead = (f"the {a}", with_article(a))[int(rng.integers(2))]
    if event == "move":
        drawn = axis
        template = ("{lead} moves {d}.", "{lead} slides {d}.", "{lead} moves {d} past the {o}.")[int(rng.integers(3))]
        forward, backward = (template.format(lead=lead, d=d, o=o) for d in (drawn, OPPOSITE[drawn]))
    elif event == "appear":
        template = ("{lead} {v}.", "{lead} {v} beside the {o}.")[int(rng.integers(2))]
        forward, backward = (template.format(lead=lead, v=v, o=o) for v in ("appears", "disappears"))
    elif event == "colour":
        first, last = colour[0], colour[-1]
        shape = actor[0]
        template = ("the {s} changes from {x} to {y}.", "the {s} turns from {x} to {y}.")[int(rng.integers(2))]
        forward, backward = template.format(s=shape, x=first, y=last), template.format(s=shape, x=last, y=first)
    else:
        template = ("{lead} moves {r} the {o}.", "{lead} slides {r} the {o}.")[int(rng.integers(2))]
        forward, backward = (template.format(lead=lead, r=r, o=o) for r in ("towards", "away from"))
    return (backward, forward) if reverse else (forward, backward)


def clip_files(seed: int, split: str, index: int, frames: int, height: int, width: int) -> list[tuple[str, bytes]]:
    video, record = clip(seed, split, index, frames, height, width)
    key = f"{split}-{index:07d}"
    return [(f"{key}.mp4", encode_video(video)), (f"{key}.json", json.dumps(record, sort_keys=True).encode())]


def write_shard(path: str, seed: int, split: str, start: int, stop: int, frames: int, height: int, width: int) -> int:
    return write_tar(path, (clip_files(seed, split, i, frames, height, width) for i in range(start, stop)))


@dataclass(frozen=True)
class SyntheticVideo(Generated):
    """Parameters of the built-in clips; ``ensure()`` writes them (and a tokenizer of their captions) once."""

    NAME = "synthetic_video"

    root: str
    seed: int = 0
    train_size: int = 5000
    val_size: int = 500
    test_size: int = 500
    shard_size: int = 250
    frames: int = 17  # odd: the middle frame is its own mirror image in time, the same in a clip and its reversal
    height: int = 96
    width: int = 160
    workers: int = 2

    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}

    def shard_job(self, path: str, split: str, start: int, stop: int, total: int) -> tuple:
        seeds_of = "test_compositional" if split == "test" else split  # the split's generator seeds, as the scenes'
        return write_shard, path, self.seed, seeds_of, start, stop, self.frames, self.height, self.width

    def tokenizer_texts(self):
        return texts(self.shards("train"))


def texts(shards: list[str]):
    """Every text a model may read in the built-in clips: captions and foils."""
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    yield record["caption"]
                    yield record["foil"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m vlm.data.synthetic_video")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    data = SyntheticVideo(a.out, a.seed, a.train_size, a.val_size, a.test_size, workers=a.workers)
    if not data.ensure():
        print(f"synthetic_video: {a.out} is already complete")


if __name__ == "__main__":
    main()
