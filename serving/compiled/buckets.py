"""Shape buckets: the few (denoiser rows, latent shape) pairs a compiled worker ever runs.

Why. On XLA devices (TPU, AWS Neuron) every new input shape is a new graph to compile —
minutes each on Neuron — and step-level batching changes the batch size at every step
boundary. A compiled worker therefore runs a small, fixed set of shapes: each step's batch is
padded up to the next row bucket, and only sizes whose latents were compiled are accepted. On
CUDA the same set is what CUDA graphs are captured for.

Pure: parsing, defaults, padding and the "fill a bucket or pad into the next" comparison the
planner makes. No torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Upper bound on buckets: each is a compile (minutes on Neuron) and a resident graph.
MAX_BUCKETS = 64


class BucketError(ValueError):
    """A bucket specification that cannot be used (the message names what is wrong)."""


def parse_rows(text: str) -> tuple[int, ...]:
    """'1,2,4,8' → (1, 2, 4, 8): positive, unique, ascending after sorting."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        rows = sorted({int(p) for p in parts})
    except ValueError:
        raise BucketError(f"bucket rows must be integers separated by commas (got {text!r})") from None
    if not rows:
        raise BucketError("bucket rows are empty")
    if rows[0] < 1:
        raise BucketError(f"bucket rows must be positive (got {rows[0]})")
    if len(rows) > MAX_BUCKETS:
        raise BucketError(f"at most {MAX_BUCKETS} row buckets (got {len(rows)})")
    return tuple(rows)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'512x512,768x512' → ((512, 512), (768, 512)) as (width, height); sides multiples of 8."""
    sizes: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        w, sep, h = part.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise BucketError(f"bucket sizes must be 'WxH' separated by commas (got {part!r})")
        width, height = int(w), int(h)
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise BucketError(f"bucket size {part} must have sides that are positive multiples of 8")
        if (width, height) not in sizes:
            sizes.append((width, height))
    if len(sizes) > MAX_BUCKETS:
        raise BucketError(f"at most {MAX_BUCKETS} bucket sizes (got {len(sizes)})")
    return tuple(sizes)


def default_rows(max_batch: int, rows_per_image: int = 2) -> tuple[int, ...]:
    """Powers of two up to a full batch's rows (`max_batch` images with guidance), and that itself.

    Doubling keeps padding under half a bucket (at most 2x the work of the unpadded batch, and
    far less on a GPU, where small batches cost about the same) with log2(rows) compiles.
    """
    top = max(1, max_batch * rows_per_image)
    rows = [1]
    while rows[-1] * 2 <= top:
        rows.append(rows[-1] * 2)
    if rows[-1] != top:
        rows.append(top)
    return tuple(rows)


@dataclass(frozen=True)
class RowBuckets:
    """The denoiser row counts a compiled worker runs; every step pads up to one of them."""

    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.rows or list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1:
            raise BucketError(f"row buckets must be positive, unique and ascending (got {self.rows})")

    @property
    def largest(self) -> int:
        return self.rows[-1]

    def pad(self, rows: int) -> int | None:
        """The bucket a step of `rows` rows runs in (None: more rows than the largest bucket)."""
        for b in self.rows:
            if b >= rows:
                return b
        return None

    def below(self, bucket: int) -> int | None:
        """The next smaller bucket, or None."""
        smaller = [b for b in self.rows if b < bucket]
        return smaller[-1] if smaller else None


@dataclass(frozen=True)
class FillVerdict:
    """How many of a planned batch's trailing admissions to keep so it fits its bucket well."""

    keep: int  # members of the planned batch kept (a prefix)
    bucket: int  # the bucket the kept batch runs in
    why: str | None  # set when the verdict dropped members or the batch runs padded


def fill_bucket(
    member_rows: Sequence[int],
    droppable_from: int,
    buckets: RowBuckets,
    step_seconds: Callable[[int], float],
    throughput_first: bool,
) -> FillVerdict:
    """Prefer filling a bucket to running a nearly empty larger one.

    `member_rows` are the planned batch's members' denoiser rows in plan order; members from
    index `droppable_from` on were admitted this step (the earlier ones are running and stay).
    Padding a batch of R rows up to bucket B costs a step of B rows for R rows of work. The
    alternative is dropping the last admissions until the batch fits the smaller bucket b
    (they wait for the next step). Compared per useful row (`step_seconds(bucket) / rows`):
    latency-first (`throughput_first` False) drops unless padding is strictly cheaper per row;
    under a backlog padding is kept unless the smaller bucket is strictly cheaper per row, so no
    throughput the larger bucket offers is given up.
    """
    total = sum(member_rows)
    bucket = buckets.pad(total)
    if bucket is None:
        raise BucketError(f"{total} rows exceed the largest bucket ({buckets.largest})")
    if bucket == total:
        return FillVerdict(len(member_rows), bucket, None)
    smaller = buckets.below(bucket)
    keep, rows = len(member_rows), total
    if smaller is not None:
        while keep > droppable_from and rows > smaller:
            keep -= 1
            rows -= member_rows[keep]
    padded = f"{total} rows padded to bucket {bucket}"
    if smaller is None or keep == len(member_rows) or rows == 0 or rows > smaller:
        return FillVerdict(len(member_rows), bucket, padded)
    small_bucket = buckets.pad(rows) or smaller
    per_row_padded = step_seconds(bucket) / total
    per_row_filled = step_seconds(small_bucket) / rows
    drop = per_row_filled < per_row_padded if throughput_first else per_row_filled <= per_row_padded
    if not drop:
        return FillVerdict(len(member_rows), bucket, padded)
    return FillVerdict(keep, small_bucket,
                       f"filled bucket {small_bucket} with {rows} rows rather than padding {total} to {bucket}")


@dataclass(frozen=True)
class ShapeBuckets:
    """Row buckets and the latent shapes compiled for: the whole set of compiled graphs."""

    rows: RowBuckets
    shapes: tuple[tuple[int, ...], ...]
    #: The sizes (width, height) the shapes came from, to name them in a 400.
    sizes: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        """Graphs a warm-up compiles: one per (rows, shape)."""
        return len(self.rows.rows) * len(self.shapes)

    def allows(self, shape: tuple[int, ...]) -> bool:
        return tuple(shape) in self.shapes

    def describe_sizes(self) -> str:
        return ", ".join(f"{w}x{h}" for w, h in self.sizes)
