"""LoRA adapters: per-request, unmerged, several adapters in one step batch.

`lora` parses and checks files (diffusers' conversion is the reference for key layouts),
`segments` plans which rows of a batch take which adapter (pure), `hooks` adds each group's
low-rank delta inside the one denoiser call, `extension` is the runner's add-on, `registry`
keeps adapters in device/host/disk tiers and loads them off the step loop, `sources` reads
`hf://`, `pvc://` and local files. See docs/adapters.md.
"""
