"""Is a worker hung? The router's rule, for `stepfleet up`'s supervisor (pure).

A worker that crashed exits, and the supervisor restarts it. One that hangs (SIGSTOP, a
deadlock, swapping) does not exit: the kernel still accepts its connections, so it looks
alive to a process table and keeps its place in the pool while serving nothing. Issue 19
found `stepfleet up` blind to that. The router decides "hung" this way
(`serving/router/health.py`): `--hang-polls` polls in a row unanswered within
`--load-poll-timeout-s` (default 2 × 2 s); any HTTP answer, of any status, is a sign of
life; a refused connection is not a hang (the process is gone or restarting, which exit
detection sees). The supervisor applies the same rule, with the same defaults, to ready
workers' `/readyz` (a path a worker answers without the router's token): a busy worker
answers between denoising steps, in milliseconds, so load is never taken for a hang.

Workers still loading their model are not judged: they have not answered yet, and one that
never becomes ready is the ready-grace shortage's business (`fleet.shortages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: answered: any HTTP status; silent: no answer within the timeout; refused: no connection.
PollResult = Literal["answered", "silent", "refused"]


@dataclass(frozen=True)
class HangRule:
    """When a worker counts as hung. Defaults are the router's (`--load-poll-timeout-s`, `--hang-polls`)."""

    #: Seconds between two polls of a ready worker.
    poll_every_s: float = 1.0
    #: A poll unanswered this long is silent.
    timeout_s: float = 2.0
    #: Silent polls in a row that make a worker hung.
    polls: int = 2

    def __post_init__(self) -> None:
        if self.poll_every_s <= 0 or self.timeout_s <= 0 or self.polls < 1:
            raise ValueError("poll interval and timeout must be positive, hang polls at least 1")

    @property
    def detection_s(self) -> float:
        """About how long a hang takes to be found: `polls` rounds of interval plus timeout."""
        return self.polls * (self.poll_every_s + self.timeout_s)


def silent_polls_after(silent_polls: int, result: PollResult) -> int:
    """Silent polls in a row after one more poll: an answer resets, a refusal leaves the count."""
    if result == "answered":
        return 0
    if result == "silent":
        return silent_polls + 1
    return silent_polls


def is_hung(silent_polls: int, rule: HangRule) -> bool:
    return silent_polls >= rule.polls
