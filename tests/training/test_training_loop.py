"""The training loop on a synthetic split: it learns, it is seeded, and it resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepfleet.training.fashion import FashionSplit
from stepfleet.training.loop import TrainConfig, Trainer


def _split(n: int = 64) -> FashionSplit:
    rng = np.random.default_rng(0)
    return FashionSplit(images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                        labels=rng.integers(0, 10, n).astype(np.int64))


def _cfg(**kw) -> TrainConfig:
    base = dict(vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2, log_every=1, warmup_steps=1)
    return TrainConfig(**{**base, **kw})


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.clone() for m in ("vae", "unet_ema", "text_ema") for k, v in getattr(trainer, m).state_dict().items()}


@pytest.fixture(scope="module")
def split() -> FashionSplit:
    return _split()


def test_resume_equals_an_uninterrupted_run(tmp_path, split):
    torch.set_num_threads(1)
    straight = Trainer(_cfg(unet_steps=3), tmp_path / "a", split, torch.device("cpu"))
    straight.run()
    first = Trainer(_cfg(unet_steps=1), tmp_path / "b", split, torch.device("cpu"))
    first.run()  # stops after one UNet step and checkpoints
    resumed = Trainer(_cfg(unet_steps=3), tmp_path / "b", split, torch.device("cpu"))
    assert resumed.load() and resumed.unet_step == 1 and resumed.vae_step == 2
    resumed.run()
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (tmp_path / "b" / "loss.jsonl").read_text().splitlines()
    assert sum('"unet"' in line for line in log) == 3 and sum('"vae"' in line for line in log) == 2


def test_wall_budget_stops_a_phase_and_saves(tmp_path, split):
    trainer = Trainer(_cfg(unet_steps=10_000, unet_seconds=0.0), tmp_path, split, torch.device("cpu"))
    trainer.run()
    assert trainer.unet_step == 0 and (tmp_path / "checkpoint.pt").exists()
    assert trainer.scaling_factor is not None and trainer.scaling_factor > 0


def test_export_loads_as_a_stable_diffusion_pipeline(tmp_path, split):
    from diffusers import StableDiffusionPipeline

    trainer = Trainer(_cfg(unet_steps=1), tmp_path, split, torch.device("cpu"))
    trainer.run()
    out = trainer.export(tmp_path / "pipeline")
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "tokenizer" / "merges.txt").exists()
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # float16 on disk
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.vae.config.scaling_factor == pytest.approx(trainer.scaling_factor)
    # init_from reads it back: the VAE phase counts as done, the weights are the exported ones.
    again = Trainer(_cfg(), tmp_path / "again", split, torch.device("cpu"))
    again.init_from(out)
    assert again.vae_step == again.cfg.vae_steps
    w = next(iter(pipe.unet.state_dict().values()))
    assert torch.equal(next(iter(again.unet.state_dict().values())), w.float())
    assert torch.equal(w, w.half().float())  # the values read back are float16-representable
