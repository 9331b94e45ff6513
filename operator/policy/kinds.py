"""Images and videos: two request kinds with one capacity, planned in replica-seconds.

The loop's demand is counted in requests per second and a pool's capacity in requests per
second per replica. That holds while every request costs about the same; a video job costs
one to two orders of magnitude more device time than an image (GenServe's measurements; on
the Wan family the denoiser runs over `frames / 4` latent frames per step). Counted as one
request each, a pool serving videos is under-provisioned, and a spike of images over-
provisioned when the throughput figure was taken on a mix.

So demand is converted to the device time it needs, per kind: one replica serves
`image_thr` images/s or `video_thr` videos/s, and a demand of `image_rps + video_rps` needs

    image_rps / image_thr + video_rps / video_thr      replicas (before the queueing margin).

With `v` the share of requests that are videos, that is `rate * units / image_thr` where

    units = (1 - v) + v * image_thr / video_thr        image-equivalents per request,

so the rest of the policy (allocation, hedging, weights, stabilization) keeps working in
requests per second: a pool's request throughput of the current mix is `image_thr / units`.
With no video (`v = 0`), `units` is exactly 1.0 and every figure is computed exactly as
before. The queueing margin stays the image one: the worker pauses videos at step
boundaries when an image would miss its deadline, so images queue behind images, and videos
(whose SLO is minutes) absorb the rest.

Pure arithmetic: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: Device time of one video job in images, when a pool declares no video throughput: GenServe
#: measures a video at one to two orders of magnitude an image; 30 is the geometric middle
#: (sqrt(10 x 100) ~ 32), rounded. Declare `videoThroughputPerReplica` for a real figure.
DEFAULT_VIDEO_COST_IMAGES = 30.0


def video_throughput(declared: float | None, image_throughput_rps: float) -> float:
    """Videos/s one replica serves: the declared (or measured) figure, else derived."""
    if declared is not None and declared > 0:
        return declared
    return image_throughput_rps / DEFAULT_VIDEO_COST_IMAGES


def units_per_request(video_share: float, image_throughput_rps: float,
                      video_throughput_rps: float) -> float:
    """Image-equivalents of device time per request of the mix (exactly 1.0 with no video)."""
    share = min(1.0, max(0.0, video_share))
    if share <= 0.0:
        return 1.0
    if video_throughput_rps <= 0 or image_throughput_rps <= 0:
        return math.inf
    return (1.0 - share) + share * image_throughput_rps / video_throughput_rps


def video_share(total: Iterable[tuple[float, float]], videos: Iterable[tuple[float, float]]) -> float:
    """Share of requests that were videos over the same (time_s, rate_rps) samples.

    The ratio of the summed rates over the samples the demand estimate keeps (a quarter hour,
    or since the last step), so a few videos in one interval do not swing the plan; a video
    sample whose time is not among `total`'s is ignored.
    """
    rates = dict(total)
    counted = sum(rates.values())
    if counted <= 0:
        return 0.0
    seen = sum(max(0.0, r) for t, r in videos if t in rates)
    return min(1.0, seen / counted)
