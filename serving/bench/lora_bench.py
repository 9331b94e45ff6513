"""`stepfleet bench lora`: mixed-adapter step batches vs one adapter state per batch vs merge-per-request.

One run measures, on the served model (default the tiny SD, 8 rank-16 adapters on the
attention and feed-forward projections, seeded non-zero weights):

- step seconds by batch size without adapters, with every image a different adapter, and
  with every row one adapter (the unmerged overhead figure), and of every composition a
  replayed batch can have (images, images with adapters, distinct adapters), interleaved so
  drift hits all alike, medians of `reps`;
- merging one adapter into the weights and unmerging it (what the peers pay to switch);
- time to first step of a request whose adapter is on disk only: bounded vs full waiting;
- the image difference bounded loading causes when the adapter lands after K steps.

Then the replay (`lora_replay`) serves one seeded trace (Zipf over 8 adapters, 20 % without)
at loads 0.7 and 0.9 and at saturation with these costs.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

from stepfleet.serving.bench.lora_replay import (
    Costs,
    compositions,
    layout,
    replay,
    saturation_throughput,
)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass(frozen=True)
class LoraBenchConfig:
    model: str = "tiny-sd"
    size: int = 256
    steps: int = 20
    max_batch: int = 4
    rank: int = 16
    adapters: int = 8
    #: Timed repeats per batch (medians): 5 left the saturation ratio moving ±0.1 run to run.
    reps: int = 15
    replay_requests: int = 400
    bounded_k: int = 2
    seed: int = 0
    #: Added to every read of an adapter file: a slow disk or a hub fetch (0: this machine's disk).
    disk_delay_ms: float = 0.0


def random_lora(unet: torch.nn.Module, rank: int, seed: int, std: float = 0.05) -> bytes:
    """A rank-`rank` adapter on the usual projections, with non-zero B (PEFT would start at zero)."""
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS):
            out[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * std
            out[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * std
    return save(out)


def lora_mac_share(unet_config: dict, size: int, rank: int) -> float:
    """Multiply-adds a rank-`rank` adapter on `TARGETS` adds, over the UNet's Linear/Conv2d multiply-adds.

    Counted by running the architecture on PyTorch's meta device (shapes only, no weights), so
    it is cheap for SD 1.5's 860 M parameters too: it says what the unmerged overhead would be
    on a model whose layers are wider than the tiny test model's.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    base, lora = [0], [0]

    def counter(name: str):
        def count(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            if isinstance(m, torch.nn.Linear):
                base[0] += out.numel() * m.in_features
                if any(name.endswith(t) for t in TARGETS):
                    lora[0] += out.numel() // m.out_features * (m.in_features + m.out_features) * rank
            else:
                base[0] += out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        return count

    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(counter(name))
    lat = size // 8
    with torch.device("meta"):
        cond = {}
        if unet.config.addition_embed_type == "text_time":
            cond = {"added_cond_kwargs": {"text_embeds": torch.empty(2, 1280), "time_ids": torch.empty(2, 6)}}
        unet(torch.empty(2, unet.config.in_channels, lat, lat), torch.empty(2),
             encoder_hidden_states=torch.empty(2, 77, unet.config.cross_attention_dim), **cond)
    return lora[0] / base[0]


def _merge(unet: torch.nn.Module, weights, scale: float) -> None:
    """Merge (scale > 0) or unmerge (scale < 0) an adapter into the base weights, as peers do."""
    with torch.no_grad():
        for name, layer in weights.layers.items():
            w = unet.get_submodule(name).weight
            w.add_((layer.up @ layer.down).to(w.dtype), alpha=scale * layer.scaling)


def run(cfg: LoraBenchConfig, quick: bool = False) -> dict:
    from stepfleet.serving.adapters.extension import LoraExtension
    from stepfleet.serving.adapters.registry import AdapterRegistry
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.params import GenerationParams, LoraRef, LoraSpec
    from stepfleet.serving.runner import ModelRunner

    backbone = load_backbone(load_model(cfg.model))
    unet = backbone.denoiser
    def read(path):
        time.sleep(cfg.disk_delay_ms / 1000.0)
        return path.read_bytes()

    registry = AdapterRegistry(backbone.family, unet, device_bytes=1 << 34, host_bytes=1 << 34, disk_bytes=1 << 34,
                               reader=read)
    ext = LoraExtension(unet, registry, max_unloaded_steps=cfg.bounded_k)
    runner = ModelRunner(backbone, extensions=[ext])
    names = [f"lora-{k}" for k in range(cfg.adapters)]
    for k, name in enumerate(names):
        registry.add(name, random_lora(unet, cfg.rank, cfg.seed + k))
        registry.preload(name).result(60)  # measured steps run with every adapter on the device

    def params(adapter: str | None, seed: int, steps: int = 50) -> GenerationParams:
        spec = LoraSpec((LoraRef(adapter, 1.0),)) if adapter else None
        return GenerationParams(prompt="a lighthouse at dusk", width=cfg.size, height=cfg.size,
                                num_inference_steps=steps, seed=seed, lora=spec)

    kinds = {"plain": lambda i: None, "mixed": lambda i: names[i % len(names)], "one": lambda i: names[0]}
    batches: dict[tuple, list] = {(kind, b): [runner.prepare(params(pick(i), i), i).state for i in range(b)]
                                  for kind, pick in kinds.items() for b in range(1, cfg.max_batch + 1)}
    # Every composition a replayed batch can have, laid out as `lora_replay.layout` says.
    for comp in compositions(cfg.max_batch):
        batches[("composition", comp)] = [runner.prepare(params(None if a is None else names[a], i), i).state
                                          for i, a in enumerate(layout(*comp))]
    samples: dict[tuple, list[float]] = {key: [] for key in batches}
    for states in batches.values():  # warm every shape and every adapter's hooks
        runner.step(states)
    for _ in range(cfg.reps):
        for key, states in batches.items():
            t0 = time.perf_counter()
            runner.step(states)
            samples[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in samples.items()}
    plain = [0.0] + [med[("plain", b)] for b in range(1, cfg.max_batch + 1)]
    mixed = [0.0] + [med[("mixed", b)] for b in range(1, cfg.max_batch + 1)]
    one = [0.0] + [med[("one", b)] for b in range(1, cfg.max_batch + 1)]
    del batches, states
    gc.collect()  # the measured requests' states pinned their adapters; dropping them unpins

    lease = registry.acquire(names[0])
    weights = lease.wait(60)
    merges, unmerges = [], []
    for _ in range(cfg.reps):
        t0 = time.perf_counter()
        _merge(unet, weights, 1.0)
        t1 = time.perf_counter()
        _merge(unet, weights, -1.0)
        merges.append(t1 - t0)
        unmerges.append(time.perf_counter() - t1)
    lease.release()
    costs = Costs(plain=plain, mixed=mixed, merge_s=statistics.median(merges), unmerge_s=statistics.median(unmerges),
                  by_composition={comp: med[("composition", comp)] for comp in compositions(cfg.max_batch)})

    ttfs = _time_to_first_step(backbone, names[1], registry, params, cfg)
    diff = _bounded_difference(backbone, registry, params, cfg)
    registry.close()

    from stepfleet.serving.builtin_models import SD15_RANDOM, unet_config

    mac_share = {cfg.model: lora_mac_share(dict(unet.config), cfg.size, cfg.rank),
                 "sd15 at 512x512": lora_mac_share(unet_config(SD15_RANDOM), 512, cfg.rank)}
    result = replay(costs, cfg.steps, cfg.max_batch, n=cfg.replay_requests, seed=cfg.seed)
    at9 = result["loads"]["0.9"]
    overhead = one[cfg.max_batch] / plain[cfg.max_batch] - 1
    figures = {
        "mean_latency_mixed_over_one_state_at_0.9": at9["mixed"]["mean_s"] / at9["one-state"]["mean_s"],
        "saturation_throughput_mixed_over_one_state": (result["saturation_rps"]["mixed"]
                                                       / result["saturation_rps"]["one-state"]),
        "unmerged_rank_overhead_every_row": overhead,
        "unmerged_overhead_every_image_its_own_adapter": mixed[cfg.max_batch] / plain[cfg.max_batch] - 1,
        # What batching is worth on this machine at this size (max_batch images in one step vs one at a
        # time): the mixed-batch advantage over one-state batches grows with it.
        "batching_gain": cfg.max_batch * plain[1] / plain[cfg.max_batch],
        # The saturation ratio if adapters cost nothing on the mixed side: what this machine's batching
        # allows at all (on two CPU cores 1.36-1.45 in session 7, against a target of 1.3).
        "saturation_ratio_with_free_adapters": _free_adapter_ratio(costs, cfg),
    }
    return {
        "config": asdict(cfg) | {"quick": quick},
        "costs": asdict(costs) | {"one_adapter_every_row": one, "by_composition": {
            f"{n} images, {m} with adapters, {k} distinct": v for (n, m, k), v in costs.by_composition.items()}},
        "replay": result,
        "time_to_first_step": ttfs,
        "bounded_vs_full_difference": diff,
        "lora_mac_share": mac_share,
        "figures": figures,
        "targets": {
            "mean_latency_ratio_le_0.7": figures["mean_latency_mixed_over_one_state_at_0.9"] <= 0.7,
            "throughput_ratio_ge_1.3": figures["saturation_throughput_mixed_over_one_state"] >= 1.3,
            "overhead_le_15pct": overhead <= 0.15,
        },
    }


def _free_adapter_ratio(costs: Costs, cfg: LoraBenchConfig) -> float:
    free = Costs(plain=costs.plain, mixed=costs.plain, merge_s=costs.merge_s, unmerge_s=costs.unmerge_s,
                 by_composition={c: costs.plain[c[0]] for c in compositions(cfg.max_batch)})
    return (saturation_throughput("mixed", free, cfg.steps, cfg.max_batch, cfg.replay_requests, cfg.seed)
            / saturation_throughput("one-state", free, cfg.steps, cfg.max_batch, cfg.replay_requests, cfg.seed))


def _time_to_first_step(backbone, name: str, registry, params, cfg: LoraBenchConfig) -> dict:
    """Seconds from arrival to the end of the first step when the adapter is on disk only."""
    from dataclasses import replace

    from stepfleet.serving.adapters.extension import LoraExtension
    from stepfleet.serving.runner import ModelRunner

    out: dict[str, list[float]] = {"bounded": [], "full": [], "load": []}
    ext = LoraExtension(backbone.denoiser, registry, max_unloaded_steps=cfg.bounded_k)
    runner = ModelRunner(backbone, extensions=[ext])
    for rep in range(cfg.reps):
        for wait in ("bounded", "full"):
            assert registry.demote(name), "the adapter must be idle to start cold"
            t0 = time.perf_counter()
            p = params(name, rep)
            state = runner.prepare(replace(p, lora=replace(p.lora, wait=wait)), rep).state
            runner.step([state])
            out[wait].append(time.perf_counter() - t0)
            del state  # unpins its adapter
        registry.demote(name)
        t0 = time.perf_counter()
        lease = registry.acquire(name)
        lease.wait(60)
        out["load"].append(time.perf_counter() - t0)
        lease.release()
    ext.close()
    return {k: statistics.median(v) for k, v in out.items()}


def _bounded_difference(backbone, registry, params, cfg: LoraBenchConfig) -> dict:
    """Mean absolute pixel difference (0-1) of an image whose adapter landed after K steps vs full waiting."""
    from stepfleet.serving.adapters.extension import LoraExtension
    from stepfleet.serving.runner import ModelRunner

    name = "lora-2"
    gate = threading.Event()
    slow = LoraExtension(backbone.denoiser, _Gated(registry, gate), max_unloaded_steps=cfg.bounded_k)
    runner = ModelRunner(backbone, extensions=[slow])
    steps = cfg.steps
    registry.demote(name)
    bounded = runner.prepare(params(name, 5, steps), 5).state
    for _ in range(cfg.bounded_k):
        runner.step([bounded])
    gate.set()
    states = [bounded, runner.prepare(params(name, 5, steps), 5).state, runner.prepare(params(None, 5, steps), 5).state]
    for state in states:
        while state.steps_left:
            runner.step([state])
    a, b, c = (runner.decode(s, output_type="np").images for s in states)
    out = {"steps": steps, "k": cfg.bounded_k, "steps_without": bounded.params.lora.report.steps_without,
           "bounded_vs_full_mean_abs": float(abs(a - b).mean()), "adapter_vs_none_mean_abs": float(abs(b - c).mean())}
    slow.close()
    return out


class _Gated:
    """An adapter source whose leases land only after `gate` is set (a slow disk, on cue)."""

    def __init__(self, registry, gate: threading.Event) -> None:
        self.registry, self.gate = registry, gate

    def acquire(self, name: str):
        lease = self.registry.acquire(name)
        gate = self.gate

        class Gated:
            def __init__(self) -> None:
                self.name = name

            def landed(self):
                return lease.landed() if gate.is_set() else None

            def wait(self, timeout=None):
                gate.wait(timeout)
                return lease.wait(timeout)

            def release(self) -> None:
                lease.release()

        return Gated()


def summary(result: dict) -> str:
    f, r = result["figures"], result["replay"]
    lines = ["LoRA serving (replay on step costs measured in this run):"]
    for load, row in r["loads"].items():
        lines.append(f"  load {load}: mean latency " + ", ".join(
            f"{p} {row[p]['mean_s']:.2f}s" for p in ("mixed", "one-state", "merge-per-request")))
    lines.append("  saturation: " + ", ".join(f"{p} {v:.2f} req/s" for p, v in r["saturation_rps"].items()))
    lines.append(f"  mean latency mixed/one-state at 0.9: {f['mean_latency_mixed_over_one_state_at_0.9']:.2f} "
                 f"(target <= 0.7); throughput ratio {f['saturation_throughput_mixed_over_one_state']:.2f} "
                 f"(>= 1.3); unmerged overhead {100 * f['unmerged_rank_overhead_every_row']:.1f}% (<= 15%), "
                 f"{100 * f['unmerged_overhead_every_image_its_own_adapter']:.1f}% with every image its own adapter; "
                 f"batching gain {f['batching_gain']:.2f}x; saturation ratio with free adapters "
                 f"{f['saturation_ratio_with_free_adapters']:.2f}")
    lines.append("  adapter multiply-adds over the UNet's: " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in result["lora_mac_share"].items()))
    t = result["time_to_first_step"]
    lines.append(f"  time to first step, adapter on disk: bounded {t['bounded'] * 1000:.1f} ms, full "
                 f"{t['full'] * 1000:.1f} ms (load {t['load'] * 1000:.1f} ms)")
    d = result["bounded_vs_full_difference"]
    lines.append(f"  bounded ({d['steps_without']} of {d['steps']} steps without) vs full: mean abs pixel diff "
                 f"{d['bounded_vs_full_mean_abs']:.4f} (adapter vs none: {d['adapter_vs_none_mean_abs']:.4f})")
    return "\n".join(lines)
