"""Frames → an H.264 MP4 (PyAV, yuv420p, playable everywhere) and a PNG thumbnail."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image


def encode_mp4(frames: Sequence[Image.Image], fps: int) -> bytes:
    """An MP4 of `frames` at `fps`. yuv420p needs even sides: an odd side is padded by one pixel
    (the model's sizes are multiples of 16, so only odd client-side sizes would ever hit it)."""
    import av

    width, height = frames[0].size
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for image in frames:
            rgb = image.convert("RGB")
            if rgb.size != (stream.width, stream.height):
                padded = Image.new("RGB", (stream.width, stream.height))
                padded.paste(rgb)
                rgb = padded
            for packet in stream.encode(av.VideoFrame.from_image(rgb)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def encode_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()
