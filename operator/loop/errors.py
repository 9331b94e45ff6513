"""The one error the loop's observation raises: the fleet could not be observed well enough.

The timer turns it into `Degraded`/`ObservationFailed` and keeps its last plan; every
reader (Kubernetes, Prometheus, worker scrapes) and every parser raises it with a message
fit for a condition.
"""

from __future__ import annotations


class ObservationError(Exception):
    """The fleet could not be observed well enough to decide (unreachable, malformed)."""
