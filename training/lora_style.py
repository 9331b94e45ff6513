"""A small trained LoRA for the trained `mini-sd`: "negative" (every colour inverted).

The adapter tests and docs need an adapter that does something a person can see and a test
can measure, on a model that draws real pictures: trained on `mini-sd`'s own scenes
(Fashion-MNIST items on coloured backgrounds, same captions) with the target images negated,
it turns "a red sneaker on a blue background" into a cyan sneaker on a yellow one — the
base image's pixels and the adapter's are strongly anti-correlated. Inversion moves colours
everywhere, so the adapter targets the resnets' convolutions as well as attention.

Training follows `training.loop` (ε-prediction, min-SNR-γ weighting) with only the LoRA
parameters trainable (PEFT, `init_lora_weights="gaussian"`: B starts at zero). On two busy CPU
cores a step of 16 images takes about 2 s; 40 steps already invert colours, 200 make it clean.
The result is saved with diffusers' `save_lora_weights` (PEFT layout) in float16, and ships
as `serving/builtin/loras/mini-sd-negative.safetensors`.

    python -m stepfleet.training.lora_style --out serving/builtin/loras/mini-sd-negative.safetensors
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: Where the shipped adapter lives (package data of `stepfleet.serving`).
SHIPPED = Path(__file__).resolve().parents[1] / "serving" / "builtin" / "loras" / "mini-sd-negative.safetensors"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]


def train_negative_lora(out: Path, steps: int = 200, batch: int = 16, rank: int = 4, lr: float = 2e-3,
                        seed: int = 0, min_snr_gamma: float = 5.0) -> Path:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from stepfleet.serving.loading import load_model
    from stepfleet.training.fashion import load_split
    from stepfleet.training.loop import CaptionTable, SceneStream

    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    pipe = load_model("mini-sd", device="cpu", dtype="float32").pipeline
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    stream = SceneStream(load_split("train"), cpu, seed)
    captions = CaptionTable(pipe.tokenizer, cpu)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    alphas = pipe.scheduler.alphas_cumprod
    scale = vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed + 1)
    started = time.monotonic()
    for step in range(steps):
        b = stream.draw(batch)
        with torch.no_grad():
            latents = vae.encode(-b.images).latent_dist.sample(generator=g) * scale  # the style: negated colours
            emb = text(captions.lookup(b, 0.1, g)).last_hidden_state
        t = torch.randint(0, alphas.shape[0], (batch,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        pred = unet(pipe.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=min_snr_gamma) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 20 == 0:
            log.info("step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(), time.monotonic() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / "_lora"
    StableDiffusionPipeline.save_lora_weights(str(tmp), unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    tensors = load_file(str(tmp / "pytorch_lora_weights.safetensors"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(out),
              metadata={"stepfleet": f"mini-sd negative LoRA, rank {rank}, {steps} steps of {batch}"})
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stepfleet.training.lora_style", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=SHIPPED)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = train_negative_lora(args.out, steps=args.steps, batch=args.batch, rank=args.rank, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
