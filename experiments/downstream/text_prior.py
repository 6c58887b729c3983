"""How well the built-in NLVR2 statements predict their label without the images: the majority label of each
statement template (colours and shapes masked) and of each statement, learnt on the training pairs, scored on
val. Run from the repository root: python experiments/downstream/text_prior.py [data/synthetic]."""

import collections
import glob
import json
import re
import sys
import tarfile

from vlm.data.synthetic_scenes import COLORS, SHAPES, balanced_statement

root = sys.argv[1] if len(sys.argv) > 1 else "data/synthetic"
WORDS = re.compile(r"\b(" + "|".join([*COLORS, *SHAPES]) + r")\b")


def pairs(split: str) -> list[tuple[str, bool]]:
    """(statement, label) of every scene of the split, as `vlm.data.sources.SyntheticNLVR2` reads them."""
    out = []
    for f in sorted(glob.glob(f"{root}/{split}-*.tar")):
        with tarfile.open(f) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(t.extractfile(m))
                    own, partner = int(m.name[:-5].rpartition("-")[2]), int(meta["pair"]["partner"].rpartition("-")[2])
                    out.append(balanced_statement(0, split, own, partner)[:2])
    return out


train, val = pairs("train"), pairs("val")
print(f"val: {len(val)} pairs, {sum(label for _, label in val) / len(val):.3f} true")
for name, key in (("template", lambda s: WORDS.sub("X", s)), ("statement", lambda s: s)):
    counts = collections.defaultdict(collections.Counter)
    for s, label in train:
        counts[key(s)][label] += 1
    majority = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    acc = sum(majority.get(key(s), True) == label for s, label in val) / len(val)
    print(f"text only, majority label per {name} ({len(counts)} of them): val accuracy {acc:.3f}")
