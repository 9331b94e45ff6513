"""The pure rules of ControlNet requests: the window, `--controlnets`, request checks, the size rule."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from stepfleet.serving.controlnet.preprocess import canny, check_aspect, control_spec, decode
from stepfleet.serving.controlnet.spec import (
    ControlNetEntry,
    check_controls,
    parse_registry,
    render_registry,
    window_active,
)
from stepfleet.serving.params import InvalidParam


def test_window_matches_diffusers_controlnet_keep():
    n = 10
    for start, end in [(0.0, 1.0), (0.2, 0.8), (0.5, 0.5), (0.0, 0.0), (0.35, 1.0)]:
        keep = [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]  # diffusers' expression
        assert [float(window_active(i, n, start, end)) for i in range(n)] == keep


def test_registry_parsing_and_rendering_round_trip():
    entries = parse_registry("tiny-controlnet, depth=org/cn-depth:depth,seg=/models/seg")
    assert entries == (ControlNetEntry("tiny-controlnet", "tiny-controlnet", "canny"),
                       ControlNetEntry("depth", "org/cn-depth", "depth"), ControlNetEntry("seg", "/models/seg", "other"))
    assert parse_registry(render_registry(entries)) == entries
    assert parse_registry(None) == () and render_registry(()) is None
    for bad in ("nope", "a=", "a=x:weird", "a=x,a=y"):
        with pytest.raises(ValueError):
            parse_registry(bad)


def test_request_checks_name_the_field():
    known = {"edges"}
    ok = {"name": "edges", "image": "eA=="}
    (c,) = check_controls([ok | {"guidance_start": 0.2}], known, 2)
    assert (c.name, c.guidance_start, c.guidance_end, c.preprocess, c.low, c.high) == ("edges", 0.2, 1.0, "none", 100, 200)
    cases = [
        ([{"name": "nope", "image": "x"}], "controlnet[0].name", "controlnet_not_found"),
        ([ok, ok, ok], "controlnet", "too_many_controlnets"),
        ([ok | {"guidance_start": 0.9, "guidance_end": 0.1}], "controlnet[0].guidance_start", "invalid_value"),
        ([ok | {"image": ""}], "controlnet[0].image", "missing_parameter"),
        ([ok | {"conditioning_scale": True}], "controlnet[0].conditioning_scale", "invalid_value"),
        ([ok | {"preprocess": "canny", "low": 9, "high": 3}], "controlnet[0].low", "invalid_value"),
        ([ok | {"extra": 1}], "controlnet[0].extra", "unknown_parameter"),
        ({"name": "edges"}, "controlnet", "invalid_value"),
    ]
    for raw, param, code in cases:
        with pytest.raises(InvalidParam) as info:
            check_controls(raw, known, 2)
        assert (info.value.param, info.value.code) == (param, code)
    # A multipart part stands in for a missing inline image.
    (c,) = check_controls([{"name": "edges"}], known, 2, images={0: b"raw"})
    assert c.image == b"raw"


def _png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_decoding_and_the_size_rule():
    img = decode(base64.b64encode(_png()).decode(), "p", 128)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert decode("data:image/png;base64," + base64.b64encode(_png()).decode(), "p", 128).size == (64, 64)
    assert decode(_png(), "p", 128).size == (64, 64)  # raw bytes (a multipart part)
    for data, code in [("%%%", "invalid_image"), (base64.b64encode(b"junk").decode(), "invalid_image"),
                       (base64.b64encode(_png((256, 256))).decode(), "image_too_large")]:
        with pytest.raises(InvalidParam) as info:
            decode(data, "p", 128)
        assert info.value.code == code and info.value.param == "p"
    check_aspect((512, 256), 256, 128, "p")  # same ratio: resized later
    check_aspect((1000, 999), 64, 64, "p")  # within 1 %
    with pytest.raises(InvalidParam):
        check_aspect((128, 64), 64, 64, "p")


def test_canny_finds_edges_with_opencv():
    im = Image.new("RGB", (64, 64))
    im.paste((255, 255, 255), (16, 16, 48, 48))
    edges = canny(im, 100, 200)
    assert edges.size == (64, 64) and edges.mode == "RGB"
    px = edges.load()
    assert px[32, 32] == (0, 0, 0) and max(px[16, y][0] for y in range(16, 48)) == 255
    from stepfleet.serving.controlnet.spec import ControlRequest

    spec = control_spec(ControlRequest(0, "edges", _png(), 0.5, 0.1, 0.9, "canny", 50, 60), 64, 64, 128)
    assert (spec.conditioning_scale, spec.guidance_start, spec.guidance_end) == (0.5, 0.1, 0.9)


def test_pure_modules_import_no_torch():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_layering import ROOT, imported_modules

    for module in ("controlnet/__init__.py", "controlnet/spec.py", "controlnet/preprocess.py",
                   "controlnet/placement.py", "bench/controlnet_replay.py"):
        heavy = sorted(m for m in imported_modules(ROOT / "serving" / module) if m.split(".")[0] in ("torch", "diffusers"))
        assert heavy == [], module
