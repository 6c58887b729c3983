"""Video bytes -> the sampled frames of one clip, decoded with PyAV; `ClipSampler` says which frames.

A clip becomes a [T, 3, H, W] tensor (`vlm.data.transforms` resizes every frame alike, so a clip keeps one size)
and travels through the stream, the collate and the model as an image does: an image is a clip of one frame.
Broken videos cost one sample, counted by reason (`vlm.data.decode.REASONS`), like broken images; so do videos
whose frames or clip exceed the sampler's pixel caps, found before their frames are decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from annotated_types import Ge

from vlm.data.decode import BadSample


@dataclass
class ClipSampler:
    """Which frames of a video make its clip.

    ``sampling="segments"`` (TSN, Wang et al. 2016; All-in-One, Wang et al. 2023): the video cut into ``frames``
    equal segments, one frame from each — a random one in training, the segment's middle at evaluation — so a
    clip spans the whole video whatever its length. ``sampling="fps"``: ``frames`` consecutive frames ``fps``
    apart in time (a random start in training, centred at evaluation), for motion at a known speed. A video
    shorter than the clip gives all its frames (the collate pads clips of different lengths, the model masks).

    ``max_frame_pixels`` / ``max_clip_pixels``: a video whose frames, or whose clip (sampled frames x pixels per
    frame), are larger is skipped as ``huge_video`` before its frames are decoded, as images over
    ``Image.MAX_IMAGE_PIXELS`` are: a few hundred kilobytes of blank H.264 can hold frames of 200 M pixels.
    """

    frames: int = 8
    sampling: Literal["segments", "fps"] = "segments"
    fps: float | None = None  # sampling="fps": the rate frames are taken at
    max_frame_pixels: Annotated[int, Ge(1)] = 40_000_000  # above 8K (8192 x 4320)
    max_clip_pixels: Annotated[int, Ge(1)] = 400_000_000  # 1.2 GB of RGB frames

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"video.frames must be >= 1, got {self.frames}")
        if self.sampling not in ("segments", "fps"):
            raise ValueError(f"video.sampling must be 'segments' or 'fps', got {self.sampling!r}")
        if self.sampling == "fps" and not (self.fps and self.fps > 0):
            raise ValueError(f"video.sampling=fps needs a positive video.fps, got {self.fps}")
        for key in ("max_frame_pixels", "max_clip_pixels"):
            if getattr(self, key) < 1:
                raise ValueError(f"video.{key} must be >= 1, got {getattr(self, key)}")

    def indices(self, n: int, train: bool, rng: np.random.Generator | None = None,
                video_fps: float | None = None) -> list[int]:
        """The frame indices (ascending) of a clip from a video of ``n`` frames at ``video_fps``."""
        if n < 1:
            return []
        if self.sampling == "segments":
            k = min(self.frames, n)
            # rounded edges: the segments of a clip played backwards are its segments backwards (>= 1 frame each)
            edges = np.floor(np.linspace(0, n, k + 1) + 0.5).astype(int)
            lo, hi = edges[:-1], edges[1:]
            if train:
                return [int(rng.integers(a, b)) for a, b in zip(lo, hi)]
            return [int((a + b - 1) // 2) for a, b in zip(lo, hi)]
        step = (video_fps or self.fps) / self.fps  # source frames between two clip frames
        span = (self.frames - 1) * step + 1
        room = max(0.0, n - span)
        start = float(rng.uniform(0, room)) if train and room > 0 else room / 2
        out = sorted({int(start + j * step) for j in range(self.frames) if int(start + j * step) < n})
        return out


def decode_video(data: bytes | None, sampler: ClipSampler, train: bool, rng: np.random.Generator | None = None,
                 min_side: int = 8, max_aspect: float = 10.0) -> np.ndarray:
    """The sampled frames of a video file's first video stream, [T, H, W, 3] uint8 RGB, upright, or a `BadSample`.

    The frame count comes from the container, or from counting the stream's packets where it does not say
    (webm); frames are decoded in order and only the sampled ones kept, so a long video never sits in memory.
    A stream that ends before the frames its container announced is a truncated file. The frame size is read
    from the stream's header before anything is decoded, and FFmpeg's decoder is told the frame cap
    (``max_pixels``), so that neither probing the file nor a larger frame later in the stream allocates one.
    Frames are turned by their display matrix (a phone's portrait video), as FFmpeg's autorotate does.
    """
    import av

    if data is None:
        raise BadSample("missing_video")
    if len(data) == 0:
        raise BadSample("empty_video")
    # FFmpeg's own cap (AVCodecContext.max_pixels, an int): it refuses to allocate a larger frame, so neither
    # probing the file nor a frame larger than its header said allocates a huge one. It counts rows padded to
    # 32 or 64 pixels, hence the slack: the exact check is ours.
    cap = {"max_pixels": str(min(2 * sampler.max_frame_pixels, 2**31 - 1))}

    def open_video():
        try:
            container = av.open(io.BytesIO(data), mode="r", options=cap)  # options: also the probing decoders'
        except Exception as e:  # PyAV raises FFmpeg's errors for garbage and files cut before their header
            raise BadSample("corrupt_video", f"{type(e).__name__}: {e}") from None
        return container

    def too_big(w: int, h: int) -> bool:
        return w * h > sampler.max_frame_pixels

    container = open_video()
    try:
        if not container.streams.video:
            raise BadSample("no_video_stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if too_big(w, h):
            raise BadSample("huge_video", f"frames of {w}x{h} over video.max_frame_pixels={sampler.max_frame_pixels}")
        n = stream.frames
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else None
        if n <= 0:  # the container does not say: count the packets, then decode from the start again
            try:
                n = sum(1 for packet in container.demux(stream) if packet.size)
            except Exception as e:
                raise BadSample("corrupt_video", f"{type(e).__name__}: {e}") from None
            container.close()
            container = open_video()
            stream = container.streams.video[0]
        if n <= 0:
            raise BadSample("zero_frames")
        wanted = sampler.indices(n, train, rng, video_fps)
        if len(wanted) * w * h > sampler.max_clip_pixels:
            raise BadSample("huge_video", f"{len(wanted)} frames of {w}x{h} over "
                                          f"video.max_clip_pixels={sampler.max_clip_pixels}")
        stream.codec_context.options = cap
        keep = set(wanted)
        last = wanted[-1]
        frames: dict[int, np.ndarray] = {}
        pixels = 0
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if too_big(frame.width, frame.height):  # larger than the header said, within FFmpeg's slack
                    raise BadSample("huge_video", f"frame {i} of {frame.width}x{frame.height} over "
                                                  f"video.max_frame_pixels={sampler.max_frame_pixels}")
                if i in keep:
                    pixels += frame.width * frame.height
                    if pixels > sampler.max_clip_pixels:
                        raise BadSample("huge_video", f"clip over video.max_clip_pixels={sampler.max_clip_pixels}")
                    frames[i] = upright(frame.to_ndarray(format="rgb24"), frame)
                if i >= last:
                    break
        except BadSample:
            raise
        except Exception as e:
            cw, ch = stream.codec_context.width, stream.codec_context.height
            if too_big(cw, ch):  # FFmpeg refused a frame over its cap
                raise BadSample("huge_video", f"a frame of {cw}x{ch} after frame {i} over "
                                              f"video.max_frame_pixels={sampler.max_frame_pixels}") from None
            if i < 0:
                raise BadSample("corrupt_video", f"{type(e).__name__}: {e}") from None
            raise BadSample("truncated_video", f"undecodable after frame {i} of {n}") from None
        if i < 0:
            raise BadSample("zero_frames")
        if len(frames) < len(wanted):
            raise BadSample("truncated_video", f"{i + 1} of {n} frames")
    finally:
        container.close()
    clip = np.stack([frames[k] for k in wanted])
    h, w = clip.shape[1:3]
    if min(h, w) < min_side:
        raise BadSample("tiny_image", f"frames of {w}x{h}")
    if max(h, w) / min(h, w) > max_aspect:
        raise BadSample("extreme_aspect", f"frames of {w}x{h}")
    return clip


def upright(image: np.ndarray, frame) -> np.ndarray:
    """A decoded [H, W, 3] frame as its display matrix shows it (FFmpeg's autorotate): the matrix's 2 x 2 part, a
    rotation by a multiple of 90 degrees and a mirror, says where each pixel goes; other angles round to the
    nearest multiple of 90."""
    side = frame.side_data.get("DISPLAYMATRIX")
    if side is None:
        return image
    m = np.frombuffer(bytes(side), dtype=np.int32)  # [a, b, u, c, d, v, x, y, w]: x' = a x + c y, y' = b x + d y
    a, b, c, d = (float(v) for v in m[[0, 1, 3, 4]])
    if abs(b) > abs(a):  # x' comes from y and y' from x: a quarter turn
        image = image.transpose(1, 0, 2)
        flip_rows, flip_cols = b < 0, c < 0
    else:
        flip_rows, flip_cols = d < 0, a < 0
    if flip_rows:
        image = image[::-1]
    if flip_cols:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def encode_video(frames: np.ndarray, fps: int = 8, codec: str = "libx264", container_format: str = "mp4",
                 options: dict[str, str] | None = None, path: str | None = None) -> bytes:
    """[T, H, W, 3] uint8 RGB frames -> the bytes of a video file (the built-in clips, tests). H.264 by default,
    nearly lossless (crf 12) so that the colours a caption names survive; even sides, as yuv420p needs.
    ``options``: the container's; ``path``: write there (``{"movflags": "faststart"}``, an mp4 whose index
    comes first, rewrites its file and needs one)."""
    import av

    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"frames of {w}x{h}: yuv420p needs even sides")
    buf = path or io.BytesIO()
    with av.open(buf, mode="w", format=container_format, options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}
        stream.codec_context.thread_count = 1  # one thread here and in the conversion: the same bytes under any load
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24").reformat(format="yuv420p",
                                                                                               threads=1)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    if path is not None:
        with open(path, "rb") as f:
            return f.read()
    return buf.getvalue()
