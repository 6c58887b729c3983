"""Reading a weights file: one ``torch.load`` policy for every caller.

The policy: ``.safetensors`` through safetensors; anything else through ``torch.load(weights_only=True)``,
memory-mapped where the file is a zip, so no pickled code runs unless the user says the file is trusted.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from torch import Tensor


class PickledFile(ValueError):
    """A file ``torch.load`` refuses to read without running the pickled Python objects it holds.

    ``source``: what the user named (the file, or the transformers directory holding it); ``advice``: what to do
    about it, said by each entry point in its own terms (`advise`), ``{source}`` standing for the source.
    """

    def __init__(self, path: Path, reason: str, source: str | Path | None = None, advice: str | None = None):
        self.path, self.reason, self.source = path, reason, source if source is not None else path
        self.advice = advice or ("if you trust it, re-save its tensors alone (a dict of tensors, or .safetensors): "
                                 "nothing pickled then needs to run")
        super().__init__(f"{path}: holds pickled Python objects torch will not load safely ({reason}); "
                         + self.advice.replace("{source}", str(self.source)))

    def advise(self, advice: str, source: str | Path | None = None) -> PickledFile:
        """The same refusal with another suggestion (and source)."""
        return PickledFile(self.path, self.reason, source if source is not None else self.source, advice)


CONVERT_ONCE = "if you trust it, convert it once: python -m vlm.convert --from {source} --trust-pickle --out CKPT"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _reason(e: BaseException) -> str:
    """torch's error on one line: the unpickler's own reason where it gives one ("Unsupported global: GLOBAL x
    was not an allowed global by default"), else its first line, cut at the end of its first sentence."""
    lines = [_ANSI.sub("", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return type(e).__name__
    line = next((ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in lines if "WeightsUnpickler error:" in ln),
                lines[0])
    return re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0].rstrip(".")


def load_file(path: str | Path, trust_pickle: bool = False) -> Any:
    """What a weights file holds. Raises FileNotFoundError, `PickledFile`, or ValueError for a file torch cannot
    read."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch writes a zip archive (an old torch, a bare pickle)
        what = "an empty file" if not head else f"it starts with {head!r}"
        raise ValueError(f"{path}: not a weights file: neither a torch file nor .safetensors ({what})")
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: a torch file cut short (its zip archive has no end: a write that was interrupted, "
                         "or a partial copy)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=head[:2] == b"PK")
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise PickledFile(path, _reason(e)) from None
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:  # truncated, not a torch file, ...
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {_reason(e)})") from None


def state_dict_of(obj: Any) -> dict[str, Tensor]:
    """The state dict inside what `load_file` returned: a Lightning checkpoint's, a ``{"model": ...}`` wrapper's,
    or the object itself."""
    if not isinstance(obj, dict):
        raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
    return obj.get("state_dict", obj.get("model", obj))


