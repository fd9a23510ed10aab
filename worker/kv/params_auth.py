"""Signed `kv_transfer_params`: a decode worker pulls KV only from where a prefill worker of its own service said.

Why: `kv_transfer_params` tell a decode worker which host:port to connect to and which lease to pull. The router
drops a client's own (`router/request.py`), but any pod that reaches a decode worker directly (or a client that
skips the router) could still hand it params naming any address, and the worker would connect there -- a
server-side request forgery from inside the cluster. So the prefill worker signs the params it hands out, and a
decode worker refuses params it cannot verify, before any connection is opened.

The signature is an HMAC-SHA256 keyed by the service's KV secret (`BATON_KV_SECRET`, launch `Env.KV_SECRET`),
the same secret and the same helper (`tcp.mac`, `tcp.resolve_secret`) as the KV transport's handshake, under a
label of its own (`params`) so a params signature can never stand in for a handshake proof or the reverse. It
covers (`SIGNED_FIELDS`): where to connect (`remote_host`, `remote_port`), what to pull (`remote_engine_id`, the
lease id `remote_request_id`, `remote_block_ids`, `kv_layout`), what the decode worker emits without computing
it (`first_token_ids`, `num_prompt_tokens`), and an expiry (`EXPIRES_KEY`, epoch milliseconds: the end of the KV
lease, `launch.KV_LEASE_SECONDS` by default). It is bound to the lease id rather than the request id: the lease id
is 128 random bits the prefill worker made for this one hand-off (`engine/core.new_lease_id`), while the request
id is the client's X-Request-Id, the same across retries and choices. Left unsigned: the flags
(`do_remote_prefill`, ...), `lease_seconds` (informational) and `first_token_logprobs`, which the HTTP layer adds
after the engine signed (display numbers only, checked against the signed first token by the decode engine).

Refusals (`engine.types.KVParamsRejected`, HTTP 403 `kv_params_rejected`, counted as
`baton_kv_params_rejected_total{reason}`): `unsigned` (no signature), `bad_signature` (malformed, changed after
signing -- e.g. re-targeted to another host:port -- or signed with another secret) and `expired`. The router treats that 403 like a lost KV and has the
decode worker recompute the prompt, so a secret rotation caught between old prefill and new decode pods costs a
recompute, not a failed request.

Without a secret (a hand-started local worker; `baton up` always gives its fleet a random one, and the
operator's pods always have the service's Secret) there is no key: nothing is signed and params are taken as
they come, as the transport's handshake then allows unauthenticated peers too; a warning is logged once.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable

from ..engine.types import KVParamsRejected
from .tcp import _FROM_ENV, mac, resolve_secret

log = logging.getLogger("baton.worker.kv.params_auth")

#: the params' keys the signature covers (their values, JSON-canonical; a missing key signs as null)
SIGNED_FIELDS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids",
                 "kv_layout", "first_token_ids", "num_prompt_tokens")
#: where the signature and its expiry travel inside `kv_transfer_params`
SIGNATURE_KEY = "baton_kv_signature"
EXPIRES_KEY = "baton_kv_expires_ms"
#: version of the signed message; a change makes old signatures `bad_signature`, never silently valid
SIGNATURE_VERSION = 1
#: a decode worker accepts params this long past their expiry: the pods' clocks (NTP) may differ a little. Late
#: acceptance is harmless (the signed prefill worker's lease has expired: the pull fails and the router
#: recomputes); early refusal would cost a recompute of a KV that still existed.
CLOCK_SKEW_SECONDS = 2.0
#: `reason` label values of baton_kv_params_rejected_total (all present from the start, so rate() works at once)
REJECT_REASONS = ("unsigned", "bad_signature", "expired")
_LABEL = b"params"


def _message(params: dict, expires_ms: int) -> bytes:
    """The bytes the HMAC covers: canonical JSON, so a JSON round trip through the router changes nothing."""
    signed = {k: params.get(k) for k in SIGNED_FIELDS}
    return json.dumps([SIGNATURE_VERSION, signed, expires_ms], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


class ParamsAuth:
    """Signs (prefill side) and checks (decode side) `kv_transfer_params` with one worker's KV secret.

    `secret`: bytes/str, None for none, default env BATON_KV_SECRET (what the TCP transport reads too). `clock`:
    wall-clock seconds (an expiry must mean the same on two machines, unlike `time.monotonic`). Counts refusals
    by reason in `rejected` (read by the engine's stats for /metrics). Thread-safe."""

    def __init__(self, secret=_FROM_ENV, *, clock: Callable[[], float] = time.time,
                 clock_skew: float = CLOCK_SKEW_SECONDS) -> None:
        self.secret: bytes | None = resolve_secret(secret)
        self.clock = clock
        self.clock_skew = clock_skew
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def sign(self, params: dict, expires_at: float) -> dict:
        """`params` plus the signature and its expiry (`expires_at`: wall-clock seconds, the lease's end);
        unchanged without a secret."""
        if self.secret is None:
            return params
        expires_ms = math.ceil(expires_at * 1000)
        sig = mac(self.secret, _LABEL, _message(params, expires_ms), b"").hex()
        return {**params, EXPIRES_KEY: expires_ms, SIGNATURE_KEY: sig}

    def verify(self, params: dict) -> None:
        """Raise KVParamsRejected unless `params` carry a valid, unexpired signature by this secret. Without a
        secret everything passes (see the module docstring), with a warning logged once."""
        if self.secret is None:
            self._warn_once()
            return
        sig, expires_ms = params.get(SIGNATURE_KEY), params.get(EXPIRES_KEY)
        if sig is None and expires_ms is None:
            raise self._reject("unsigned", "kv_transfer_params are not signed: this worker only pulls KV that a "
                                           "prefill worker of its own service handed out (through the router)")
        if not isinstance(sig, str) or type(expires_ms) is not int:
            raise self._reject("bad_signature", f"kv_transfer_params carry a malformed signature ({SIGNATURE_KEY} "
                                                f"must be a string, {EXPIRES_KEY} an integer)")
        want = mac(self.secret, _LABEL, _message(params, expires_ms), b"").hex()
        if not hmac.compare_digest(sig.encode(), want.encode()):
            raise self._reject("bad_signature", "the signature of kv_transfer_params does not match: they were "
                                                "changed after the prefill worker signed them (another remote_host/"
                                                "remote_port, lease or block list), or signed with another "
                                                "BATON_KV_SECRET")
        late = self.clock() - expires_ms / 1000
        if late > self.clock_skew:
            raise self._reject("expired", f"kv_transfer_params expired {late:.1f}s ago (the prefill worker's KV "
                                          "lease has ended)")

    def _reject(self, reason: str, message: str) -> KVParamsRejected:
        with self._lock:
            self.rejected[reason] += 1
        log.warning("refused kv_transfer_params (%s): %s", reason, message)
        return KVParamsRejected(reason, message)

    def _warn_once(self) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        log.warning("BATON_KV_SECRET is not set: kv_transfer_params are neither signed nor checked, so anything "
                    "that reaches this worker's API can make it connect to any address for KV (set the same "
                    "secret on every prefill and decode worker)")
