"""`WorkerSettings` on the command line: the flags the operator writes are the flags the worker reads."""

from __future__ import annotations

import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepfleet.serving.backbones import FAMILIES
from stepfleet.serving.backends import BACKENDS
from stepfleet.serving.cli import worker_main
from stepfleet.serving.settings import InvalidSettings, WorkerSettings

EXAMPLES = [
    WorkerSettings(),
    WorkerSettings(model="hub-org/sdxl-base", family="sdxl", dtype="float16", revision="0123abc", device="cuda",
                   pool="l4", host="0.0.0.0", port=8001, max_batch=8, template_cache_bytes=2 * 1024**3),
    WorkerSettings(model="/models/sd15/v1", served_model_name="sd15", local_files_only=True, preemption=False,
                   warmup=False, policy="static", aux="thread", template_dir="/tmp/t", template_disk_bytes=10**9, edit_halo=3),
    WorkerSettings(local_files_only=False, default_guidance_scale=-1.5, slo_scale=0.1, graceful_shutdown_s=0.0,
                   family="sd2", dtype="bfloat16", device="xla", max_upload_bytes=1024),
    WorkerSettings(model="-odd-name", pool="p", port=0),
]


@pytest.mark.parametrize("s", EXAMPLES, ids=range(len(EXAMPLES)))
def test_round_trip(s):
    argv = s.to_argv()
    assert argv[:2] == ["--model", s.model] or argv[0] == f"--model={s.model}"
    assert WorkerSettings.from_argv(argv) == s


def test_only_what_differs_is_written_unless_asked():
    assert WorkerSettings().to_argv() == ["--model", "tiny-sd"]
    assert WorkerSettings(warmup=False, local_files_only=True).to_argv() == [
        "--model", "tiny-sd", "--local-files-only", "--no-warmup",
    ]
    assert WorkerSettings().to_argv(always=("model", "port", "revision")) == ["--model", "tiny-sd", "--port", "8001"]
    with pytest.raises(ValueError, match="not settings: nope"):
        WorkerSettings().to_argv(always=("nope",))


# argparse drops a bare "--" even as `--flag=--` (its end-of-options marker), so no flag value can be
# exactly that; no model, pool or path is named "--".
_text = st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=1, max_size=12).filter(
    lambda t: t != "--")
_floats = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "model": _text,
            "served_model_name": st.none() | _text,
            "revision": st.none() | _text,
            "family": st.sampled_from(("auto", *FAMILIES)),
            "device": st.sampled_from(("auto", *BACKENDS)),
            "dtype": st.sampled_from(("auto", "float32", "float16", "bfloat16")),
            "local_files_only": st.none() | st.booleans(),
            "pool": _text,
            "port": st.integers(0, 65535),
            "max_batch": st.integers(1, 256),
            "preemption": st.booleans(),
            "policy": st.sampled_from(("continuous", "static")),
            "slo_scale": _floats,
            "aux": st.sampled_from(("auto", "inline", "thread")),
            "default_guidance_scale": st.floats(allow_nan=False, allow_infinity=False),
            "warmup": st.booleans(),
            "graceful_shutdown_s": _floats,
            "template_cache_bytes": st.integers(0, 2**40),
            "template_dir": st.none() | _text,
        },
    )
)
def test_round_trip_of_any_settings(fields):
    s = WorkerSettings(**fields)
    assert WorkerSettings.from_argv(s.to_argv()) == s


def test_every_setting_that_may_be_none_defaults_to_none():
    """`to_argv` writes nothing for None, which reads back as the default: so it must be None."""
    for name, field in WorkerSettings.model_fields.items():
        if type(None) in typing.get_args(field.annotation):
            assert field.default is None, name


def test_family_choices_are_the_backbones():
    assert typing.get_args(WorkerSettings.model_fields["family"].annotation) == ("auto", *FAMILIES)
    assert WorkerSettings.from_argv(["--family", "sdxl"]).family == "sdxl"
    assert WorkerSettings.from_argv(["--family", "sd3"]).family == "sd3"
    with pytest.raises(InvalidSettings, match="--family: invalid choice: 'pixart'"):
        WorkerSettings.from_argv(["--family", "pixart"])


def test_flags_people_and_scripts_already_use():
    s = WorkerSettings.from_argv([
        "--model", "tiny-sd", "--served-model-name", "tiny", "--revision", "main", "--device", "cpu",
        "--dtype", "float32", "--local-files-only", "--pool", "p", "--host", "0.0.0.0", "--port", "9000",
        "--max-batch", "2", "--max-queue", "8", "--policy", "static", "--aux", "inline", "--no-preemption",
        "--max-image-size", "256", "--default-steps", "3", "--template-cache-bytes", "0",
        "--template-disk-bytes", "5", "--template-dir", "/x", "--no-warmup", "--graceful-shutdown-s", "1.5",
    ])
    assert s == WorkerSettings(
        model="tiny-sd", served_model_name="tiny", revision="main", device="cpu", dtype="float32",
        local_files_only=True, pool="p", host="0.0.0.0", port=9000, max_batch=2, max_queue=8, policy="static",
        aux="inline", preemption=False, max_image_size=256, default_steps=3, template_cache_bytes=0,
        template_disk_bytes=5, template_dir="/x", warmup=False, graceful_shutdown_s=1.5,
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-batch", "0"], "--max-batch: Input should be greater than or equal to 1"),
        (["--device", "tpu"], "--device: Value error, device must be auto or one of"),
        (["--port", "eighty"], "--port: invalid int value"),
        (["--dtype", "fp8"], "--dtype: invalid choice"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--max-b", "2"], "unrecognized arguments"),  # no abbreviations: the contract is the full names
    ],
)
def test_invalid_flags_name_the_flag(argv, words):
    with pytest.raises(InvalidSettings, match=words.replace("(", r"\(")):
        WorkerSettings.from_argv(argv)


def test_worker_cli_refuses_invalid_settings_with_exit_2(capsys):
    assert worker_main(["--log-level", "warning", "--family", "pixart"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stepfleet worker: invalid settings: argument --family: invalid choice: 'pixart'")


def test_worker_help_lists_settings_and_log_level(capsys):
    with pytest.raises(SystemExit) as exit_:
        worker_main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--log-level" in out and "--no-warmup" in out
    assert "model family (auto: from the checkpoint's model_index.json); a mismatch fails readiness" in " ".join(
        out.split()
    )
