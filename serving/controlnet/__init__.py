"""ControlNet: per-request control inside mixed step batches, as a runner extension.

A ControlNet is a copy of the UNet's encoder fed an extra control image (edges, depth, a pose);
its outputs are residuals added to the UNet's skip connections and middle block. diffusers
runs one ControlNet (or a `MultiControlNetModel`, whose residuals sum) over a whole batch of
one request. Here one denoising step mixes requests with different ControlNets, with none,
and with different scales and guidance windows, so:

- each registered net runs once per step, on the rows of the requests that use it and are
  inside their window (`extension.ControlNetExtension.denoiser_inputs`);
- its residuals, scaled per row, are scattered into batch-wide zero tensors; rows without
  control get zeros, which leave the UNet's sums bit-identical to a call without residuals;
- the summed residuals enter the batch's one UNet call (`runner.InputExtension`).

Rooms: `builtins` (the tiny seeded nets for tests), `registry` (names → loaded nets, from the
worker's `--controlnets`), `spec` (pure parsing and checks of requests and settings),
`schema` (the request field's pydantic body), `preprocess` (decode, resize rule, canny edges
with OpenCV), `placement` (where a net runs: inline on the step loop, or on an overlapping
executor), `extension` (the hooks), `worker` (the extension from the worker's settings).

This package's top level stays torch-free: the settings and the operator import its names.
"""

from __future__ import annotations

#: How a ControlNet runs relative to the step loop (`--controlnet-placement`,
#: `serving.controlnetPlacement`): `inline` on the loop thread (the CPU default), `overlap` on
#: an executor beside it, computing each request's next residuals while the loop does other work.
PLACEMENTS: tuple[str, ...] = ("inline", "overlap")
#: What a ControlNet was trained on (informational: shown by `GET /v1/controlnets`, and the
#: preprocessing a client may ask for).
KINDS: tuple[str, ...] = ("canny", "depth", "pose", "scribble", "other")
#: Built-in ControlNets, made from configs with seeded non-zero output convolutions.
TINY_CONTROLNET = "tiny-controlnet"
TINY_CONTROLNET_SDXL = "tiny-controlnet-sdxl"
BUILTIN_CONTROLNETS: tuple[str, ...] = (TINY_CONTROLNET, TINY_CONTROLNET_SDXL)
#: The built-in model each built-in net fits (they are as tiny as it is).
BUILTIN_BASES: dict[str, str] = {TINY_CONTROLNET: "tiny-sd", TINY_CONTROLNET_SDXL: "tiny-sdxl"}
