"""The router's inputs: the operator's router.yaml, EndpointSlices, API keys."""

from pathlib import Path

import pytest
import yaml

from stepfleet.serving.router.auth import (
    KeysFileError,
    RateLimiter,
    TokenBucket,
    bearer_token,
    digest,
    parse_keys,
)
from stepfleet.serving.router.config import ConfigError, parse_config
from stepfleet.serving.router.discovery import endpoints_from_slices, make_discovery, service_of
from stepfleet.serving.router.state import FleetState

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def test_reads_exactly_what_the_operator_writes():
    # The contract test: the operator's own builder produces the file, the router parses it.
    from stepfleet.operator.children import Observed, Owner, router
    from stepfleet.operator.validation import validate

    obj = yaml.safe_load((EXAMPLES / "three-pool-fleet.yaml").read_text())
    spec, problems = validate(obj["metadata"]["name"], obj["spec"])
    assert not problems
    owner = Owner(name="sd15", namespace="ml", uid="u-1")
    text = router.configmap(owner, spec, Observed(weights={"l4": 0.2, "inf2": 0.8, "tpu-v5e": 0.0}))["data"]["router.yaml"]
    cfg = parse_config(text)
    assert cfg.service == "sd15" and cfg.model == spec.model.source
    assert cfg.weights() == {"l4": 0.2, "inf2": 0.8, "tpu-v5e": 0.0}
    l4 = cfg.pools[0]
    assert l4.url == "http://sd15-l4.ml.svc.cluster.local:8001" and l4.accelerator == "nvidia-gpu"
    assert l4.price_per_hour == spec.pools[0].price_per_hour
    assert l4.static_endpoints() == (l4.url,)
    assert service_of(l4.url) == ("sd15-l4", "ml")


def test_static_endpoints_list():
    cfg = parse_config("""
version: 1
pools:
- name: local
  endpoints: [http://127.0.0.1:8001/, http://127.0.0.1:8002]
  weight: 1
""")
    assert cfg.pools[0].static_endpoints() == ("http://127.0.0.1:8001", "http://127.0.0.1:8002")
    state = FleetState()
    state.apply_config(cfg)
    assert [e.url for e in state.pools[0].endpoints] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert type(make_discovery("auto", cfg)).__name__ == "StaticDiscovery"


@pytest.mark.parametrize(("text", "needle"), [
    ("version: 2\npools: []", "version"),
    ("pools: []", "version"),
    ("version: 1\npools: [{name: a}]", "url"),
    ("version: 1\npools: [{name: a, url: 'ftp://x'}]", "pools.0.url"),
    ("version: 1\npools: [{name: a, url: 'http://x', weight: -1}]", "pools.0.weight"),
    ("version: 1\npools: [{name: a, url: 'http://x'}, {name: a, url: 'http://y'}]", "duplicate"),
    ("[1, 2", "YAML"),
    ("just text", "mapping"),
])
def test_bad_configs_name_the_field(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(text)


def test_state_keeps_loads_across_reloads():
    state = FleetState()
    state.apply_config(parse_config("version: 1\npools: [{name: a, endpoints: ['http://w1', 'http://w2']}]"))
    w1 = state.pools[0].endpoints[0]
    w1.rate = 99.0
    state.apply_config(parse_config("version: 1\npools: [{name: a, endpoints: ['http://w1'], weight: 0.3}]"))
    assert state.pools[0].endpoints == [w1] and state.pools[0].weight == 0.3


def _slice(name, port, endpoints, port_name="http", family="IPv4"):
    return {"metadata": {"name": name, "labels": {"kubernetes.io/service-name": "sd15-l4"}},
            "addressType": family, "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
            "endpoints": endpoints}


def test_endpointslice_parsing():
    slices = [
        _slice("sd15-l4-abc", 8001, [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},               # not ready
            {"addresses": ["10.0.0.3"], "conditions": {"ready": True, "terminating": True}},
            {"addresses": ["10.0.0.4"]},                                               # absent = ready
        ]),
        _slice("sd15-l4-def", 8001, [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}},  # duplicate
                                     {"addresses": ["10.0.1.9"], "conditions": {}}]),
        _slice("v6", 8001, [{"addresses": ["fd00::5"], "conditions": {"ready": True}}], family="IPv6"),
        _slice("fqdn", 8001, [{"addresses": ["w.example"]}], family="FQDN"),
        _slice("noport", 9, [{"addresses": ["10.9.9.9"]}], port_name="metrics") | {"ports": [
            {"name": "metrics", "port": 9}, {"name": "grpc", "port": 10}]},
        {"metadata": {"name": "empty"}, "addressType": "IPv4", "ports": None, "endpoints": None},
    ]
    assert endpoints_from_slices(slices) == [
        "http://10.0.0.1:8001", "http://10.0.0.4:8001", "http://10.0.1.9:8001", "http://[fd00::5]:8001"]


def test_discovered_endpoints_replace_the_service_url():
    state = FleetState()
    state.apply_config(parse_config("version: 1\npools: [{name: l4, url: 'http://sd15-l4.ml.svc.cluster.local:8001'}]"))
    assert [e.url for e in state.pools[0].endpoints] == ["http://sd15-l4.ml.svc.cluster.local:8001"]
    state.set_endpoints("l4", ["http://10.0.0.2:8001", "http://10.0.0.1:8001"])
    assert [e.url for e in state.pools[0].endpoints] == ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]
    state.set_endpoints("l4", [])  # scaled to zero: no workers, not the Service
    assert state.pools[0].endpoints == []
    state.set_endpoints("l4", None)
    assert len(state.pools[0].endpoints) == 1


def test_service_of():
    assert service_of("http://a-b.ns.svc.cluster.local:8001") == ("a-b", "ns")
    assert service_of("http://a-b.ns:8001") == ("a-b", "ns")
    assert service_of("http://a-b:8001") == ("a-b", None)
    assert service_of("http://127.0.0.1:8001") is None


def test_api_keys_file():
    keys = parse_keys("# team keys\nsk-a\nsk-b rps=2 burst=5  # batch\n\nsk-c rps=0\n", default_rps=10)
    assert keys[digest("sk-a")].rps == 10
    assert keys[digest("sk-b")].rps == 2 and keys[digest("sk-b")].burst == 5
    assert keys[digest("sk-c")].rps is None
    assert "sk-a" not in repr(keys)
    with pytest.raises(KeysFileError, match="line 2"):
        parse_keys("sk-a\nsk-b rate=3\n")
    assert bearer_token("Bearer sk-a") == "sk-a" and bearer_token("Basic x") is None and bearer_token(None) is None


def test_token_bucket():
    b = TokenBucket(rps=2.0, burst=3.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.5) == 0.0
    limiter = RateLimiter()
    spec = parse_keys("k rps=1 burst=1")[digest("k")]
    assert limiter.check("d", spec, 0.0) == 0.0 and limiter.check("d", spec, 0.1) > 0
