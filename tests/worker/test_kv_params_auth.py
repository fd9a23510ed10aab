"""Signed kv_transfer_params (issue 21): a Baton decode worker pulls KV only on params a prefill worker of its own
service signed with the service's KV secret (`worker/kv/params_auth.py`).

Real workers on the tiny model, built the way `baton worker` builds them (its CLI parser and `build_engine`, TCP KV
transport, env BATON_KV_SECRET as `baton up` and the operator's pods set it), served by uvicorn in this process;
the router is the real aiohttp app. Forged params point the decode worker at a real TCP listener that records
every connection it accepts: a refused request must leave it at zero, and a control case (params signed with the
service's secret pointing at the same listener) shows that the listener does see the decode worker when it
connects.
"""

from __future__ import annotations

import logging
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch")

from baton import launch

from .test_router import RunningRouter, hop_errors, outcome, settled
from .test_server_openai import RunningServer

SERVED = "tiny"
SECRET = "service-kv-secret"
PROMPT = "Kubernetes runs containers in pods."
REJECTED = "baton_kv_params_rejected_total"


# ---------------------------------------------------------------------------------------------- helpers


class RecordingListener:
    """A plain TCP listener on loopback that accepts and counts every connection (then closes it): what a
    decode worker told to "pull KV" from here would reach."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="recording-listener")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def build_worker(model: Path, role: str, secret: str | None, **flags: str) -> RunningServer:
    """A worker as `baton worker --role ROLE --kv-transport tcp` builds it with env BATON_KV_SECRET=`secret`
    (unset for None), served in this process."""
    from baton.worker.serve_cli import build_engine
    from baton.worker.server import create_app

    from baton.cli import build_parser

    argv = ["worker", "--role", role, "--model", str(model)]
    if role != "both":
        argv += ["--kv-transport", "tcp", "--kv-port", "0", "--kv-host", "127.0.0.1"]
    for flag, value in flags.items():
        argv += [flag, value]
    with pytest.MonkeyPatch.context() as mp:  # the transport reads the secret when it is built
        if secret is None:
            mp.delenv(launch.Env.KV_SECRET, raising=False)
        else:
            mp.setenv(launch.Env.KV_SECRET, secret)
        engine = build_engine(build_parser().parse_args(argv))
    srv = RunningServer(create_app(engine, served_model_name=SERVED, labels={"role": role}), engine)
    srv.start()
    return srv


def completion(stream: bool = False, **extra) -> dict:
    return {"model": SERVED, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}


def prefill_params(srv: RunningServer) -> dict:
    """The kv_transfer_params a real prefill hop hands out (what the router forwards to the decode hop)."""
    r = httpx.post(srv.base_url + "/v1/completions", timeout=60,
                   json=completion(kv_transfer_params={"do_remote_decode": True}))
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"]


def rejected(srv: RunningServer, reason: str) -> float:
    """baton_kv_params_rejected_total{reason} as the worker's /metrics reports it."""
    return srv.metrics()[(REJECTED, (("reason", reason),))]


def transfers(srv: RunningServer) -> tuple[int, int]:
    """(KV imports done, KV imports failed) by the decode engine: a refused request adds to neither."""
    s = srv.engine.stats()
    return s.kv_transfers_total, sum(s.kv_transfer_failures.values())


def text(resp: httpx.Response, stream: bool) -> str:
    if not stream:
        return resp.json()["choices"][0]["text"]
    import json

    out = []
    for line in resp.text.splitlines():
        if line.startswith("data: {"):
            out += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(out)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-kv-auth"), size="tiny", arch="llama", seed=0)


@pytest.fixture(scope="module")
def fleet(model):
    """prefill + decode sharing the service's secret, a decode worker holding another secret (a rotation caught
    half-way), and a colocated `both` worker as the reference answer."""
    running: dict[str, RunningServer] = {}
    try:
        for name, role, secret in (("prefill", "prefill", SECRET), ("decode", "decode", SECRET),
                                   ("rotated", "decode", "the-next-secret"), ("both", "both", None)):
            running[name] = build_worker(model, role, secret)
        yield running
    finally:
        for srv in running.values():
            srv.stop()


@pytest.fixture
def listener():
    lst = RecordingListener()
    yield lst
    lst.close()


# ------------------------------------------------------------------------------------------------- tests


def test_prefill_signs_what_decides_the_pull_and_the_lease_is_the_expiry(fleet):
    """Every field that says where to connect and what to pull is under the signature, and so is the expiry:
    the end of the KV lease (launch.KV_LEASE_SECONDS, which `baton worker` uses by default)."""
    from baton.worker.engine.types import KVParamsRejected
    from baton.worker.kv.params_auth import EXPIRES_KEY, SIGNATURE_KEY, ParamsAuth

    before = time.time()
    kv = prefill_params(fleet["prefill"])
    after = time.time()
    assert isinstance(kv[SIGNATURE_KEY], str) and len(kv[SIGNATURE_KEY]) == 64  # HMAC-SHA256, hex
    assert before + launch.KV_LEASE_SECONDS - 1 <= kv[EXPIRES_KEY] / 1000 <= after + launch.KV_LEASE_SECONDS + 1
    assert kv["lease_seconds"] == launch.KV_LEASE_SECONDS
    auth = ParamsAuth(SECRET)
    auth.verify(kv)  # the service's key accepts them as they are
    for field in ("remote_host", "remote_port", "remote_engine_id", "remote_request_id", "remote_block_ids",
                  "kv_layout", "first_token_ids", "num_prompt_tokens", EXPIRES_KEY):
        assert field in kv, field
        changed = {**kv, field: "changed"}
        with pytest.raises(KVParamsRejected) as err:
            auth.verify(changed)
        assert err.value.reason == "bad_signature", field
    with pytest.raises(KVParamsRejected) as err:  # another service's key
        ParamsAuth("another-service").verify(kv)
    assert err.value.reason == "bad_signature"
    auth.verify({**kv, "lease_seconds": 1, "first_token_logprobs": []})  # informational, added after signing


FORGERIES = ("unsigned", "bad_signature", "re-targeted", "expired", "another_secret")


def forge(kind: str, kv: dict, port: int) -> tuple[dict, str]:
    """Params pointing the decode worker at 127.0.0.1:`port`, forged as `kind`; and the reason it must give."""
    from baton.worker.kv.params_auth import EXPIRES_KEY, SIGNATURE_KEY, ParamsAuth

    there = {**kv, "remote_host": "127.0.0.1", "remote_port": port}
    if kind == "unsigned":  # what a pod that skips the router would send
        return {k: v for k, v in there.items() if k not in (SIGNATURE_KEY, EXPIRES_KEY)}, "unsigned"
    if kind == "bad_signature":
        return {**there, SIGNATURE_KEY: secrets.token_hex(32)}, "bad_signature"
    if kind == "re-targeted":  # the prefill worker's own signature, on another address
        return there, "bad_signature"
    if kind == "expired":  # signed with the service's own secret, but its lease ended a minute ago
        return ParamsAuth(SECRET).sign(there, time.time() - 60), "expired"
    return ParamsAuth("not-this-service").sign(there, time.time() + 30), "bad_signature"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("kind", FORGERIES)
def test_forged_params_are_refused_before_any_connection(fleet, listener, kind, stream):
    dec = fleet["decode"]
    params, reason = forge(kind, prefill_params(fleet["prefill"]), listener.port)
    count, imports = rejected(dec, reason), transfers(dec)
    r = httpx.post(dec.base_url + "/v1/completions", json=completion(stream, kv_transfer_params=params), timeout=60)
    time.sleep(0.3)  # anything the worker might still do with them would have connected by now
    assert (r.status_code, listener.accepted) == (403, 0), r.text  # refused, and never connected
    err = r.json()["error"]
    assert err["code"] == "kv_params_rejected" and err["type"] == "permission_error"
    assert err["param"] == "kv_transfer_params"
    assert f"({reason})" in err["message"], err["message"]
    assert transfers(dec) == imports  # no pull was even attempted
    assert rejected(dec, reason) == count + 1


def test_control_the_listener_sees_a_decode_worker_that_trusts_the_params(fleet, listener):
    """The same listener, params validly signed with the service's secret: the decode worker does connect (and
    answers 502, the listener speaks no KV protocol). So the zeros above mean "never connected"."""
    from baton.worker.kv.params_auth import ParamsAuth

    dec = fleet["decode"]
    params, _ = forge("re-targeted", prefill_params(fleet["prefill"]), listener.port)
    params = ParamsAuth(SECRET).sign(params, time.time() + 30)
    r = httpx.post(dec.base_url + "/v1/completions", json=completion(kv_transfer_params=params), timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "kv_transfer_failed", r.text
    assert listener.accepted >= 1


def test_params_of_a_lease_that_ended_are_refused(model):
    """A prefill worker with a short lease (--kv-lease-seconds): once the lease and the clock-skew allowance are
    over, the decode worker refuses its real params as expired, and pulls nothing."""
    from baton.worker.kv.params_auth import CLOCK_SKEW_SECONDS

    lease = 0.3
    pre = build_worker(model, "prefill", SECRET, **{launch.Flag.KV_LEASE_SECONDS: str(lease)})
    dec = build_worker(model, "decode", SECRET)
    try:
        kv = prefill_params(pre)
        time.sleep(lease + CLOCK_SKEW_SECONDS + 0.3)
        r = httpx.post(dec.base_url + "/v1/completions", json=completion(kv_transfer_params=kv), timeout=60)
        assert r.status_code == 403 and "(expired)" in r.json()["error"]["message"], r.text
        assert transfers(dec) == (0, 0)
        assert rejected(dec, "expired") == 1
    finally:
        pre.stop()
        dec.stop()


def test_router_hand_off_with_signed_params_equals_colocated(fleet):
    """End to end through the router: the prefill worker's signed params reach the decode worker untouched (JSON
    and SSE, and the layer-wise announcement), which pulls the KV and answers what a colocated worker does."""
    dec = fleet["decode"]
    want = httpx.post(fleet["both"].base_url + "/v1/completions", json=completion(), timeout=60).json()
    want = want["choices"][0]["text"]
    refused = dict(dec.engine.stats().kv_params_rejected)
    for announce in (False, True):
        r = RunningRouter(prefill=[fleet["prefill"].base_url], decode=[dec.base_url], kv_announce=announce).start()
        try:
            imports = transfers(dec)[0]
            for stream in (False, True):
                resp = httpx.post(r.base_url + "/v1/completions", json=completion(stream), timeout=60)
                assert resp.status_code == 200, resp.text
                assert text(resp, stream) == want
            m = settled(r)
            assert outcome(m, "ok") == 2 and outcome(m, "fallback_recompute") == 0
            assert transfers(dec)[0] == imports + 2  # the KV was pulled, not recomputed
        finally:
            r.stop()
    assert dec.engine.stats().kv_params_rejected == refused  # the router's params were never refused


def test_router_recomputes_when_the_decode_worker_cannot_verify(fleet):
    """A decode worker with another secret (a rotation half-way) refuses the prefill worker's params (403); the
    router treats that as lost KV and has it recompute the prompt: the client still gets the right answer."""
    rot = fleet["rotated"]
    want = httpx.post(fleet["both"].base_url + "/v1/completions", json=completion(), timeout=60).json()
    r = RunningRouter(prefill=[fleet["prefill"].base_url], decode=[rot.base_url]).start()
    try:
        before = rejected(rot, "bad_signature")
        for stream in (False, True):
            resp = httpx.post(r.base_url + "/v1/completions", json=completion(stream), timeout=60)
            assert resp.status_code == 200, resp.text
            assert text(resp, stream) == want["choices"][0]["text"]
        m = settled(r)
        assert outcome(m, "fallback_recompute") == 2
        assert hop_errors(m, "decode", "kv_params_rejected") == 2
        assert rejected(rot, "bad_signature") == before + 2
        assert transfers(rot) == (0, 0)
    finally:
        r.stop()


def test_without_a_secret_nothing_is_signed_or_checked(model, caplog):
    """A hand-started local pair without BATON_KV_SECRET (no key to sign with): params carry no signature and the
    hand-off still works, with a warning; `baton up` never runs that way (it gives its fleet a random secret)."""
    from baton.worker.kv.params_auth import EXPIRES_KEY, SIGNATURE_KEY

    pre = build_worker(model, "prefill", None)
    dec = build_worker(model, "decode", None)
    signed = build_worker(model, "decode", SECRET)
    try:
        kv = prefill_params(pre)
        assert SIGNATURE_KEY not in kv and EXPIRES_KEY not in kv
        with caplog.at_level(logging.WARNING, logger="baton.worker.kv.params_auth"):
            r = httpx.post(dec.base_url + "/v1/completions", json=completion(kv_transfer_params=kv), timeout=60)
        assert r.status_code == 200, r.text
        assert transfers(dec) == (1, 0)
        assert any("kv_transfer_params are neither signed nor checked" in rec.getMessage()
                   for rec in caplog.records)
        # a worker that has the secret takes no unsigned params, whoever made them
        r = httpx.post(signed.base_url + "/v1/completions", json=completion(kv_transfer_params=prefill_params(pre)),
                       timeout=60)
        assert r.status_code == 403 and "(unsigned)" in r.json()["error"]["message"], r.text
    finally:
        for srv in (pre, dec, signed):
            srv.stop()


def test_baton_up_gives_its_fleet_one_secret(tmp_path, monkeypatch):
    """`baton up` (worker/local_fleet.py, `LocalFleet.start`) puts one random BATON_KV_SECRET into the environment
    of every process of a fleet with a KV transport, so its prefill worker signs and its decode worker checks
    with the same key. Each process here signs the same params with the key it finds (ParamsAuth's default, as
    the workers' transports read it): the signatures exist and are equal."""
    from baton.worker.local_fleet import FleetPlan, LocalFleet, ProcSpec

    monkeypatch.delenv(launch.Env.KV_SECRET, raising=False)
    code = ("from baton.worker.kv.params_auth import ParamsAuth; "
            "print('SIG', ParamsAuth().sign({'remote_host': 'h', 'remote_port': 1}, 2e9).get('baton_kv_signature'))")
    procs = [ProcSpec(name, name.split("-")[0], 0, [sys.executable, "-c", code])
             for name in ("prefill-0", "decode-0", "router")]
    fleet = LocalFleet(FleetPlan("t", SERVED, str(tmp_path), False, procs, kv_transport="tcp"), tmp_path / "run",
                       log=lambda msg: None)
    fleet.start()
    try:
        for proc in fleet.procs.values():
            assert proc.wait(120) == 0
    finally:
        fleet.stop()
    sigs = {line for p in procs for line in (tmp_path / "run" / f"{p.name}.log").read_text().splitlines()
            if line.startswith("SIG ")}
    assert len(sigs) == 1 and "None" not in next(iter(sigs)), sigs
