"""A Prometheus-operator ServiceMonitor scraping every worker pool and the router.

Created only when the `monitoring.coreos.com` API is served: applying it without the CRD
would fail, and a cluster without the Prometheus operator still gets the pods'
`prometheus.io/*` annotations for annotation-based scraping.
"""

from __future__ import annotations

from stepfleet.operator import names
from stepfleet.operator.children.common import Manifest, Owner, metadata

SCRAPE_INTERVAL = "15s"


def servicemonitor(owner: Owner) -> Manifest:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(owner, owner.name, names.base_labels(owner.name)),
        "spec": {
            "selector": {"matchLabels": {names.LABEL_SERVICE: owner.name, names.LABEL_MANAGED_BY: names.MANAGED_BY}},
            "namespaceSelector": {"matchNames": [owner.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": SCRAPE_INTERVAL}],
        },
    }
