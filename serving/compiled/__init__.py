"""Compiled, static-shape execution: shape buckets, per-bucket compiled denoisers, compile caches.

`buckets` is pure (parsing, padding, the planner's fill-or-pad rule); `denoiser` compiles a
backbone's `denoise` once per bucket and warms every bucket up; `cache` points the backends'
persistent compile caches at one directory; `setup` builds all of it from worker settings.
"""
