"""Layer-wise KV export: a prefill hop announces its lease before its forward ends, the decode hop pulls layers
as they are written and computes the first token itself; greedy output unchanged (vs HF)."""
from __future__ import annotations

import asyncio
import time

import pytest
from baton.worker.engine.engine import BatonEngine
from baton.worker.engine.types import GenerationRequest, SamplingParams
from baton.worker.kv.inprocess import InProcessKVTransport, InProcessRegistry

from baton.launch import KV_ANNOUNCE

from .conftest import hf_greedy
from .test_engine import GREEDY, assert_all_free, collect
from .test_kv_tcp import tcp

PROMPT = list(range(3, 70))
LAYER_DELAY = 0.05


def _slow_layers(engine: BatonEngine, marks: dict) -> None:
    """Make each layer of the prefill forward take LAYER_DELAY longer, and note when the forward ends and
    when the transport first reads a layer."""
    core = engine.core
    forward, read = core.model.forward, core.read_layer

    def slow_forward(fb, caches, all_logits=False, on_layer=None):
        def hook(i):
            if on_layer is not None:
                on_layer(i)
            time.sleep(LAYER_DELAY)
        out = forward(fb, caches, all_logits, on_layer=hook)
        marks.setdefault("forward_end", time.monotonic())
        return out

    def timed_read(lease, layer):
        marks.setdefault("first_read", time.monotonic())
        return read(lease, layer)

    core.model.forward = slow_forward
    core.read_layer = timed_read


async def _announced_handoff(pre: BatonEngine, dec: BatonEngine, rid: str, ids: list[int], n: int):
    """The router's part: start the decode hop on the prefill hop's first (announcing) output."""
    hop = GenerationRequest(rid, ids, SamplingParams(max_tokens=1, **GREEDY),
                            kv_transfer_params={"do_remote_decode": True, KV_ANNOUNCE: True})
    stream = pre.generate(hop)
    first = await stream.__anext__()
    assert first.token_ids == [] and not first.finished
    kv = first.kv_transfer_params
    assert kv["do_remote_prefill"] and "first_token_ids" not in kv
    decode = asyncio.create_task(collect(dec, GenerationRequest(
        rid, ids, SamplingParams(max_tokens=n, **GREEDY), kv_transfer_params=kv)))
    rest = [out async for out in stream]
    final = rest[-1]
    assert final.finished and final.kv_transfer_params["remote_request_id"] == kv["remote_request_id"]
    return await decode, final


@pytest.mark.parametrize("transport", ["tcp", "inprocess"])
async def test_decode_pulls_layers_while_prefill_computes(tiny_model_dir, hf_model, transport):
    if transport == "tcp":
        pre_t, dec_t = tcp(), tcp()
    else:
        registry = InProcessRegistry()
        pre_t, dec_t = InProcessKVTransport(registry), InProcessKVTransport(registry)
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=pre_t)
    dec = BatonEngine.load(tiny_model_dir, role="decode", kv_transport=dec_t)
    marks: dict = {}
    _slow_layers(pre, marks)
    async with pre, dec:
        (tokens, _, _), final = await _announced_handoff(pre, dec, "r1", PROMPT, 12)
        assert marks["first_read"] < marks["forward_end"] - LAYER_DELAY / 2, \
            "the decode worker read no layer before the prefill forward ended"
        assert dec.stats().kv_transfers_total == 1
        await asyncio.sleep(0.05)
        assert_all_free(pre)
        assert_all_free(dec)
    assert tokens == hf_greedy(hf_model, PROMPT, 12)
    assert final.token_ids == tokens[:1]  # the prefill hop's own first token agrees with the decode worker's


async def test_unannounced_hop_keeps_the_old_protocol(tiny_model_dir, hf_model):
    """Without KV_ANNOUNCE nothing changes on the wire: one output, first_token_ids included."""
    registry = InProcessRegistry()
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=InProcessKVTransport(registry))
    dec = BatonEngine.load(tiny_model_dir, role="decode", kv_transport=InProcessKVTransport(registry))
    async with pre, dec:
        _, _, outs = await collect(pre, GenerationRequest("u", PROMPT, SamplingParams(max_tokens=1, **GREEDY),
                                                          kv_transfer_params={"do_remote_decode": True}))
        assert len(outs) == 1 and outs[0].kv_transfer_params["first_token_ids"] == outs[0].token_ids
        toks, _, _ = await collect(dec, GenerationRequest("u", PROMPT, SamplingParams(max_tokens=8, **GREEDY),
                                                          kv_transfer_params=outs[0].kv_transfer_params))
    assert toks == hf_greedy(hf_model, PROMPT, 8)
