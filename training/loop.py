"""The training loop of `mini-sd`: the VAE first, then the UNet and text encoder together.

Why two phases: the UNet learns in the VAE's latent space, so that space must be fixed
first. Seeded and resumable: every `checkpoint_every_s` the whole state (weights, EMA
weights, optimisers, the data generator's state, the step counters) is written atomically
to `OUT/checkpoint.pt`, and `resume=True` continues from it — the same seed and step counts
give the same model. Each phase also stops at its wall-clock budget (`*_seconds`), saving
first, so a lent GPU's fixed lease is spent training rather than lost.

The data never leaves the device: the 60k items sit there as uint8, and each batch is drawn
(item, colours, jitter) and composed there (`scenes.compose`). Captions are tokenised once
for all 560 (class, colour, background) triples.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stepfleet.training import mini_sd
from stepfleet.training.fashion import CLASS_NAMES, FashionSplit
from stepfleet.training.scenes import COLOR_NAMES, caption, compose, random_colors, random_shifts


@dataclass
class TrainConfig:
    """What `stepfleet train mini-sd` takes; defaults are the shipped model's recipe."""

    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 128
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 30000
    unet_batch: int = 256
    unet_lr: float = 3e-4
    warmup_steps: int = 500
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    vae_seconds: float | None = None
    unet_seconds: float | None = None
    checkpoint_every_s: float = 300.0
    log_every: int = 50


@dataclass
class Batch:
    images: torch.Tensor  # (N, 3, 64, 64) in [-1, 1]
    labels: torch.Tensor
    item_colors: torch.Tensor
    backgrounds: torch.Tensor


class SceneStream:
    """Random coloured scenes drawn on the device from the items kept there."""

    def __init__(self, split: FashionSplit, device: torch.device, seed: int) -> None:
        self.items = torch.from_numpy(split.images.copy()).to(device)
        self.labels = torch.from_numpy(split.labels.copy()).to(device)
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def draw(self, n: int) -> Batch:
        g, dev = self.generator, self.device
        idx = torch.randint(0, self.items.shape[0], (n,), generator=g, device=dev)
        item_colors, backgrounds = random_colors(n, g, dev)
        shifts = random_shifts(n, g, dev)
        images = compose(self.items[idx], item_colors, backgrounds, shifts)
        return Batch(images, self.labels[idx], item_colors, backgrounds)


class CaptionTable:
    """Token ids of every caption, indexed by (class, item colour, background); row 0 of `empty`
    is the unconditional prompt "" that classifier-free guidance needs."""

    def __init__(self, tokenizer, device: torch.device) -> None:  # noqa: ANN001 (a CLIPTokenizer)
        k, c = len(CLASS_NAMES), len(COLOR_NAMES)
        texts = [caption(lab, ic, bg) for lab in range(k) for ic in range(c) for bg in range(c)]
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        self.ids = ids.view(k, c, c, -1).to(device)
        self.empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)

    def lookup(self, batch: Batch, dropout: float, generator: torch.Generator) -> torch.Tensor:
        ids = self.ids[batch.labels, batch.item_colors, batch.backgrounds]
        if dropout > 0:
            drop = torch.rand(ids.shape[0], generator=generator, device=ids.device) < dropout
            ids = torch.where(drop[:, None], self.empty.expand_as(ids), ids)
        return ids


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lr(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(1, warmup))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        e = [p for p in ema.parameters()]
        m = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(e, m, 1.0 - decay)


class Trainer:
    """Owns the models, optimisers and the stream; `run()` trains whichever phase is due."""

    def __init__(self, cfg: TrainConfig, out: Path, split: FashionSplit, device: torch.device,
                 progress: Callable[[str, int], Iterator[int]] | None = None) -> None:
        self.cfg, self.out, self.device = cfg, out, device
        self.tokenizer = mini_sd.make_tokenizer(out / "tokenizer_src")
        self.vae = mini_sd.make_vae(cfg.seed).to(device)
        self.unet = mini_sd.make_unet(cfg.seed + 1).to(device)
        self.text = mini_sd.make_text_encoder(self.tokenizer, cfg.seed + 2).to(device)
        self.unet_ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.text_ema = copy.deepcopy(self.text).requires_grad_(False)
        fused = {"fused": True} if device.type == "cuda" else {}
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, **fused)
        self.unet_opt = torch.optim.AdamW(
            list(self.unet.parameters()) + list(self.text.parameters()), lr=cfg.unet_lr, weight_decay=0.01, **fused
        )
        self.stream = SceneStream(split, device, cfg.seed)
        self.captions = CaptionTable(self.tokenizer, device)
        self.noise = mini_sd.noise_scheduler()
        self.alphas = self.noise.alphas_cumprod.to(device)
        self.vae_step = 0
        self.unet_step = 0
        self.scaling_factor: float | None = None
        self.progress = progress
        self._log = (out / "loss.jsonl").open("a")

    # ---- checkpoints ----
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        state = {
            "config": asdict(self.cfg), "vae_step": self.vae_step, "unet_step": self.unet_step,
            "scaling_factor": self.scaling_factor,
            "vae": self.vae.state_dict(), "unet": self.unet.state_dict(), "text": self.text.state_dict(),
            "unet_ema": self.unet_ema.state_dict(), "text_ema": self.text_ema.state_dict(),
            "vae_opt": self.vae_opt.state_dict(), "unet_opt": self.unet_opt.state_dict(),
            "generator": self.stream.generator.get_state(),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def load(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        for name in ("vae", "unet", "text", "unet_ema", "text_ema", "vae_opt", "unet_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.vae_step, self.unet_step = state["vae_step"], state["unet_step"]
        self.scaling_factor = state["scaling_factor"]
        if self.scaling_factor is not None:
            self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.stream.generator.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu") else state["generator"])
        return True

    def init_from(self, pipeline_dir: Path) -> None:
        """Start from an exported pipeline's weights (fresh optimisers): how a run continues
        from a model that came back without its optimiser state (a lent GPU returns only the
        float16 pipeline). The VAE phase counts as done."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        vae = AutoencoderKL.from_pretrained(str(pipeline_dir / "vae"))
        unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir / "unet"))
        text = CLIPTextModel.from_pretrained(str(pipeline_dir / "text_encoder"))
        for target, source in ((self.vae, vae), (self.unet, unet), (self.unet_ema, unet), (self.text, text),
                               (self.text_ema, text)):
            target.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.vae_step = self.cfg.vae_steps

    def _record(self, phase: str, step: int, loss: float, lr: float, started: float) -> None:
        line = {"phase": phase, "step": step, "loss": round(loss, 6), "lr": lr, "seconds": round(time.monotonic() - started, 2)}
        self._log.write(json.dumps(line) + "\n")
        self._log.flush()

    # ---- phases ----
    def _steps(self, phase: str, start: int, total: int, budget_s: float | None) -> Iterator[int]:
        """Step numbers until the phase's count or wall budget runs out, checkpointing on the way."""
        began = last_save = time.monotonic()
        steps = range(start, total)
        it = self.progress(phase, start, total) if self.progress else iter(steps)
        for step in it:
            now = time.monotonic()
            if budget_s is not None and now - began > budget_s:
                break
            if now - last_save > self.cfg.checkpoint_every_s:
                self.save()
                last_save = now
            yield step

    def train_vae(self) -> None:
        cfg = self.cfg
        self.vae.train()
        started = time.monotonic()
        for step in self._steps("vae", self.vae_step, cfg.vae_steps, cfg.vae_seconds):
            x = self.stream.draw(cfg.vae_batch).images
            posterior = self.vae.encode(x).latent_dist
            rec = self.vae.decode(posterior.sample(generator=self.stream.generator)).sample
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.kl_weight * posterior.kl().mean()
            lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
            for group in self.vae_opt.param_groups:
                group["lr"] = lr
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            if (step + 1) % cfg.log_every == 0:
                self._record("vae", step + 1, loss.item(), lr, started)
            self.vae_step = step + 1
        self.vae.eval().requires_grad_(False)

    @torch.no_grad()
    def fit_scaling_factor(self, samples: int = 2048) -> float:
        """1 / std of the latents, as SD's `scaling_factor` makes latents unit-variance."""
        latents = []
        for _ in range(max(1, samples // self.cfg.vae_batch)):
            x = self.stream.draw(self.cfg.vae_batch).images
            latents.append(self.vae.encode(x).latent_dist.sample(generator=self.stream.generator))
        self.scaling_factor = float(1.0 / torch.cat(latents).std())
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        return self.scaling_factor

    def train_unet(self) -> None:
        cfg = self.cfg
        self.unet.train()
        self.text.train()
        g = self.stream.generator
        started = time.monotonic()
        params = list(self.unet.parameters()) + list(self.text.parameters())
        for step in self._steps("unet", self.unet_step, cfg.unet_steps, cfg.unet_seconds):
            batch = self.stream.draw(cfg.unet_batch)
            with torch.no_grad():
                latents = self.vae.encode(batch.images).latent_dist.sample(generator=g) * self.scaling_factor
            ids = self.captions.lookup(batch, cfg.caption_dropout, g)
            t = torch.randint(0, self.noise.config.num_train_timesteps, (latents.shape[0],), generator=g, device=self.device)
            noise = torch.randn(latents.shape, generator=g, device=self.device)
            noisy = self.noise.add_noise(latents, noise, t)
            emb = self.text(ids).last_hidden_state
            pred = self.unet(noisy, t, encoder_hidden_states=emb).sample
            # Min-SNR-γ weighting (Hang et al. 2023): converges in far fewer steps for ε-prediction.
            snr = self.alphas[t] / (1 - self.alphas[t])
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
            loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
            lr = _lr(step, cfg.unet_lr, cfg.warmup_steps)
            for group in self.unet_opt.param_groups:
                group["lr"] = lr
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.unet_opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            _ema_update(self.unet_ema, self.unet, decay)
            _ema_update(self.text_ema, self.text, decay)
            if (step + 1) % cfg.log_every == 0:
                self._record("unet", step + 1, loss.item(), lr, started)
            self.unet_step = step + 1

    def run(self) -> None:
        if self.vae_step < self.cfg.vae_steps and self.scaling_factor is None:
            self.train_vae()
        self.vae.eval().requires_grad_(False)
        if self.scaling_factor is None:
            self.fit_scaling_factor()
            self.save()
        self.train_unet()
        self.save()

    def export(self, out: Path, dtype: torch.dtype = torch.float16) -> Path:
        """The EMA weights as a `save_pretrained` pipeline."""
        return mini_sd.export_pipeline(out, self.vae, self.unet_ema, self.text_ema, self.tokenizer, dtype)
