"""Request validation: every rejection names the field a client must fix."""

import pytest

from stepfleet.serving.params import (
    GenerationParams,
    InvalidParam,
    Limits,
    Priority,
    parse_size,
    validate,
)

LIMITS = Limits(max_image_size=1024, max_steps=200, max_images=4)


def params(**kw):
    base = dict(prompt="a cat", width=256, height=256)
    base.update(kw)
    return GenerationParams(**base)


@pytest.mark.parametrize(
    ("size", "expected"), [("auto", (256, 256)), (None, (256, 256)), ("512x256", (512, 256)), ("64x1024", (64, 1024))]
)
def test_parse_size_accepts(size, expected):
    assert parse_size(size, (256, 256), LIMITS) == expected


@pytest.mark.parametrize("size", ["250x256", "2048x2048", "32x32", "big", "256", "axb"])
def test_parse_size_rejects_naming_size(size):
    with pytest.raises(InvalidParam) as err:
        parse_size(size, (256, 256), LIMITS)
    assert err.value.param == "size"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 201}, "num_inference_steps"),
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"scheduler": "plms"}, "scheduler"),
        ({"scheduler": "lcm", "num_inference_steps": 60}, "num_inference_steps"),
        ({"prompt": "  "}, "prompt"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"output_format": "gif"}, "output_format"),
        ({"seed": -3}, "seed"),
    ],
)
def test_validate_names_the_field(change, field):
    with pytest.raises(InvalidParam) as err:
        validate(params(**change), LIMITS)
    assert err.value.param == field


def test_validate_accepts_every_scheduler():
    for name in ("ddim", "euler", "euler_a", "dpmpp_2m", "lcm"):
        assert validate(params(scheduler=name), LIMITS).scheduler == name


def test_priority_parse():
    assert Priority.parse(None) is Priority.NORMAL
    assert Priority.parse("high") is Priority.HIGH
    assert Priority.parse(0) is Priority.LOW
    with pytest.raises(InvalidParam) as err:
        Priority.parse("urgent")
    assert err.value.param == "priority"
