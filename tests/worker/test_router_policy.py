"""The router's pure parts: selection policies, routing keys, Endpoints parsing, the pool, Kubernetes
discovery against a fake API, and the CLI's configuration checks (no servers, no torch)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from baton.worker.router.app import routing_key
from baton.worker.router.discovery import KubernetesDiscovery, endpoints_urls
from baton.worker.router.policy import LeastLoaded, PrefixAware, RoundRobin, make_policy
from baton.worker.router.pool import Pool, normalize_url


@dataclass
class C:
    url: str
    inflight: int = 0


def test_least_loaded_picks_the_fewest_and_breaks_ties_at_random():
    p = LeastLoaded(random.Random(0))
    cs = [C("a", 3), C("b", 1), C("c", 2)]
    assert {p.choose(cs).url for _ in range(50)} == {"b"}
    tied = [C("a", 1), C("b", 1), C("c", 5)]
    picks = Counter(p.choose(tied).url for _ in range(400))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 120


def test_round_robin_cycles_in_url_order():
    p = RoundRobin()
    cs = [C("http://b"), C("http://a"), C("http://c")]
    assert [p.choose(cs).url for _ in range(6)] == ["http://a", "http://b", "http://c"] * 2
    assert p.choose([C("x", 100)]).url == "x"  # load does not matter


def test_prefix_aware_is_sticky_and_spreads_keys():
    p = PrefixAware(prefix_chars=16, rng=random.Random(0))
    cs = [C(f"http://w{i}") for i in range(4)]
    first = p.choose(cs, "You are a helpful assistant. Question 1").url
    # same first 16 characters -> same worker, whatever follows
    assert all(p.choose(cs, f"You are a helpful assistant. Question {i}").url == first for i in range(20))
    spread = Counter(p.choose(cs, f"{i:04d} some prompt").url for i in range(400))
    assert len(spread) == 4 and min(spread.values()) > 40


def test_prefix_aware_membership_change_moves_few_keys():
    p = PrefixAware(prefix_chars=64)
    keys = [f"key-{i}" for i in range(500)]
    four = [C(f"http://w{i}") for i in range(4)]
    before = {k: p.choose(four, k).url for k in keys}
    after = {k: p.choose(four + [C("http://w4")], k).url for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "http://w4" for k in moved)  # consistent hashing: keys only move to the new one
    assert 40 < len(moved) < 180


def test_prefix_aware_load_cap_overflows_to_the_next_worker():
    p = PrefixAware(prefix_chars=64, load_factor=1.25)
    cs = [C(f"http://w{i}") for i in range(4)]
    home = p.choose(cs, "hot prefix")
    home.inflight = 10  # far above 1.25 x average
    other = p.choose(cs, "hot prefix")
    assert other is not home
    assert p.choose(cs, "hot prefix") is other  # deterministic overflow target (next on the ring)
    home.inflight = 0
    assert p.choose(cs, "hot prefix") is home


def test_prefix_aware_without_key_is_least_loaded():
    p = PrefixAware(rng=random.Random(1))
    assert p.choose([C("a", 2), C("b", 0)], None).url == "b"


def test_policies_refuse_empty_and_unknown():
    for name in ("least-loaded", "round-robin", "prefix-aware"):
        with pytest.raises(LookupError):
            make_policy(name).choose([], "k")
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random")


def test_routing_key():
    assert routing_key({"prompt": "abcdef"}, 3) == "abc"
    assert routing_key({"prompt": ["abcdef"]}, 4) == "abcd"
    assert routing_key({"prompt": [1, 2, 3, 4, 5]}, 8) == "1,2"
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert routing_key(chat, 100) == "system:Be brief.\nuser:hi\n"
    assert routing_key(chat, 5) == "syste"
    assert routing_key({}, 10) is None


def test_endpoints_urls_uses_ready_addresses_and_the_http_port():
    ep = {"subsets": [
        {"addresses": [{"ip": "10.0.0.2"}, {"ip": "10.0.0.1"}], "notReadyAddresses": [{"ip": "10.0.0.9"}],
         "ports": [{"name": "metrics", "port": 9000}, {"name": "http", "port": 8000}]},
        {"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 8001}]},
        {"addresses": [{"ip": "10.0.0.5"}], "ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]},
    ]}
    assert endpoints_urls(ep) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://[fd00::1]:8001"]
    assert endpoints_urls({"subsets": None}) == []


def test_normalize_url():
    assert normalize_url("10.0.0.1:8000/") == "http://10.0.0.1:8000"
    for bad in ("", "ftp://x", "http://a/b"):
        with pytest.raises(ValueError):
            normalize_url(bad)


def test_pool_membership_and_readiness():
    removed = []
    pool = Pool(on_remove=removed.append)
    assert not pool.ready()[0]
    added = pool.set_urls("prefill", ["http://p0", "http://p1"])
    pool.set_urls("decode", ["http://d0"])
    assert [e.url for e in added] == ["http://p0", "http://p1"]
    assert not pool.ready()[0]  # nothing checked yet
    for ep in pool.all():
        ep.mark(True)
    assert pool.ready() == (True, "ok")
    pool.set_urls("prefill", ["http://p1"])
    assert [e.url for e in removed] == ["http://p0"]
    pool.endpoints["decode"]["http://d0"].mark(False, "down")
    ok, why = pool.ready()
    assert not ok and "decode: 0/1 healthy" in why
    pool.set_urls("both", ["http://b0"])
    pool.endpoints["both"]["http://b0"].mark(True)
    assert pool.ready()[0]


class FakeCoreV1:
    def __init__(self, objects):
        self.objects = objects
        self.calls = []

    def read_namespaced_endpoints(self, name, namespace):
        from kubernetes.client.exceptions import ApiException

        self.calls.append((name, namespace))
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return self.objects[name]


def test_kubernetes_discovery_follows_endpoints():
    from kubernetes import client as k8s

    V1EndpointAddress, V1Endpoints, V1EndpointSubset = k8s.V1EndpointAddress, k8s.V1Endpoints, k8s.V1EndpointSubset
    V1EndpointPort = getattr(k8s, "CoreV1EndpointPort", None) or k8s.V1EndpointPort  # renamed in client 22+

    def endpoints(*ips):
        return V1Endpoints(subsets=[V1EndpointSubset(
            addresses=[V1EndpointAddress(ip=ip) for ip in ips], ports=[V1EndpointPort(name="http", port=8000)])])

    class Checker:
        def __init__(self):
            self.checked = []

        async def check_all(self, eps):
            self.checked += [e.url for e in eps]
            for e in eps:
                e.mark(True)

    async def go():
        api = FakeCoreV1({"chat-prefill": endpoints("10.0.0.1"), "chat-decode": endpoints("10.0.1.1", "10.0.1.2")})
        pool, checker = Pool(), Checker()
        d = KubernetesDiscovery(pool, checker, "ml", {"prefill": "chat-prefill", "decode": "chat-decode"}, api=api)
        await d.poll_once()
        assert sorted(pool.endpoints["decode"]) == ["http://10.0.1.1:8000", "http://10.0.1.2:8000"]
        assert pool.ready()[0] and len(checker.checked) == 3
        assert set(api.calls) == {("chat-prefill", "ml"), ("chat-decode", "ml")}
        api.objects["chat-decode"] = endpoints("10.0.1.2")  # scaled down
        del api.objects["chat-prefill"]  # Service deleted: no prefill workers
        await d.poll_once()
        assert list(pool.endpoints["decode"]) == ["http://10.0.1.2:8000"]
        assert pool.endpoints["prefill"] == {}
        assert len(checker.checked) == 3  # nothing new to check

    asyncio.run(go())


def _args(**kw):
    """`baton router`'s own parsed defaults (so a new flag never leaves this test behind), then `kw`."""
    from baton.cli import build_parser

    args = build_parser().parse_args(["router"])
    for key, value in kw.items():
        assert hasattr(args, key), f"baton router has no option {key!r}"
        setattr(args, key, value)
    return args


def test_cli_config(monkeypatch):
    from baton.worker.router.cli import build_config

    from baton.cli import CommandError

    monkeypatch.delenv("BATON_NAMESPACE", raising=False)
    cfg = build_config(_args(prefill=["p0:8000,http://p1:8000"], decode=["d0:8000"], policy="prefix-aware"))
    assert cfg.prefill == ["http://p0:8000", "http://p1:8000"] and cfg.decode == ["http://d0:8000"]
    cfg = build_config(_args(prefill_service="chat-prefill", decode_service="chat-decode", namespace="ml"))
    assert cfg.services() == {"prefill": "chat-prefill", "decode": "chat-decode"}
    assert cfg.namespace == "ml" and cfg.metrics_namespace == "ml"
    assert (cfg.hop_timeout, cfg.stream_idle_timeout) == (60.0, 60.0)
    cfg = build_config(_args(both=["b:1"], hop_timeout=2.5, stream_idle_timeout=0))
    assert (cfg.hop_timeout, cfg.stream_idle_timeout) == (2.5, 0)
    for bad, msg in [({}, "no workers"), ({"decode": ["d:1"]}, "go together"),
                     ({"both": ["b:1"], "max_attempts": 0}, "--max-attempts"),
                     ({"both": ["b:1"], "health_interval": 0}, "--health-interval"),
                     ({"both": ["b:1"], "health_path": "health"}, "--health-path"),
                     ({"both": ["b:1"], "hop_timeout": -1}, "--hop-timeout"),
                     ({"both": ["b:1"], "stream_idle_timeout": -1}, "--stream-idle-timeout")]:
        with pytest.raises(CommandError, match=msg):
            build_config(_args(**bad))


def test_operator_rendered_command_parses():
    from baton.cli import build_parser

    args = build_parser().parse_args(["router", "--policy", "prefix-aware", "--port", "8080",
                                      "--prefill-service", "chat-prefill", "--decode-service",
                                      "chat-decode", "--namespace", "ml"])
    assert (args.policy, args.port, args.prefill_service, args.decode_service, args.namespace, args.host) == \
        ("prefix-aware", 8080, "chat-prefill", "chat-decode", "ml", "0.0.0.0")


def test_worker_load_from_its_own_metrics():
    """The health checker reads running + waiting from a worker's /metrics (vLLM's names, which Baton's workers
    share); least-loaded and prefix-aware then compare the larger of that and the router's own in-flight count."""
    from baton.worker.router.pool import Endpoint, parse_load

    text = (b'# HELP vllm:num_requests_running x\nvllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            b'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
            b'vllm:num_requests_waiting_by_reason{reason="capacity"} 7.0\nvllm:kv_cache_usage_perc 0.5\n')
    assert parse_load(text) == 5
    assert parse_load(b"baton_router_inflight 3\n") is None
    busy, idle = Endpoint("http://a:1", "decode"), Endpoint("http://b:1", "decode")
    assert busy.load == 0
    busy.engine_load = 5  # requests another router sent it
    idle.inflight = 1
    assert (busy.load, idle.load) == (5, 1)
    assert LeastLoaded().choose([busy, idle]) is idle
    busy.inflight = 9
    assert busy.load == 9
