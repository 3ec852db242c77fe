"""The decoding step's host work: few operators beyond the forward pass, a compiled step that does not
recompile per bucket, and rows with penalties drawn outside the fused step without changing the others."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from test_generation_engine import model_of, prompts, tokens_alone
from torch._dynamo.utils import counters

from lmforge.generation import Engine, Request, Sampling
from lmforge.generation.rows import RowTable


def aten_ops(fn) -> Counter:
    """The aten operators `fn` dispatches from Python (not those an operator calls inside itself)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return Counter(e.name for e in profile.events() if e.name.startswith("aten::")
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def test_a_decoding_step_dispatches_few_ops_beyond_the_forward_pass():
    """16 rows sampling with top-p and log-probs: everything outside the model's forward (packing the rows'
    inputs, the noise, the draw, the finite check, the read-back) is a few dozen operators, whatever the rows
    (each one a kernel launch on a GPU when not captured). The draw it replaced dispatched 186: a 32-bit hash
    in ~80 operators on [B] tensors, a tensor built per setting every step, a separate finite check."""
    model = model_of("llama")
    engine = Engine(model, slots=16, max_len=128, eos_ids=[])
    for i in range(16):
        engine.submit(Request(prompts()[i % 5], Sampling(temperature=1.0, top_p=0.9, seed=i), max_new_tokens=50,
                              logprobs=True))
    while engine.decoding < 16:
        engine.step()
    step = aten_ops(engine.step)
    backend = engine.backend
    forward = aten_ops(lambda: backend.forward(torch.zeros(16, 1, dtype=torch.long), torch.full((16, 1), 40),
                                               torch.arange(16), slice(0, 16), 41))
    outside = sum((step - forward).values())
    assert 0 < outside <= 80, (outside, (step - forward).most_common(10))
    assert step["aten::searchsorted"] == 1 and step["aten::sort"] == 1  # one draw for all 16 rows


def test_a_compiled_step_compiles_once_for_every_batch_and_span_bucket():
    """Rows 4 -> 1 as requests finish, spans 64 -> 128 as they grow: dynamic shapes compile the step once for
    one row (a size torch specialises) and once for the rest, not once per bucket; same tokens as eager."""
    model = model_of("llama")
    requests = [Request(p, Sampling(temperature=0.9, top_p=0.95, seed=i), max_new_tokens=20 + 10 * i)
                for i, p in enumerate(prompts())]
    torch._dynamo.reset()
    counters.clear()
    compiled = Engine(model, slots=4, max_len=128, eos_ids=[], compile="eager")
    got = compiled.generate(requests)
    assert counters["frames"]["ok"] == 2 and counters["stats"]["unique_graphs"] == 2, dict(counters["frames"])
    eager = Engine(model, slots=4, max_len=128, eos_ids=[], compile=False).generate(requests)
    assert [r.samples[0].token_ids for r in got] == [r.samples[0].token_ids for r in eager]
    assert max(len(p) + 20 + 10 * i for i, p in enumerate(prompts())) > 64  # the span bucket did change
    torch._dynamo.reset()


def test_rows_with_penalties_beside_plain_rows_leave_the_plain_rows_tokens_alone():
    model = model_of("llama")
    plain = Request(prompts()[1], Sampling(temperature=0.8, top_k=20, seed=3), max_new_tokens=15, logprobs=True)
    penalised = Request(prompts()[2], Sampling(temperature=0.8, repetition_penalty=3.0, presence_penalty=1.5, seed=4),
                        max_new_tokens=15)
    together = Engine(model, slots=3, max_len=64, eos_ids=[]).generate([plain, penalised])
    assert together[0].samples[0].token_ids == tokens_alone(model, plain, eos_ids=[])[0]
    assert together[1].samples[0].token_ids == tokens_alone(model, penalised, eos_ids=[])[0]
    assert together[1].samples[0].token_ids != tokens_alone(
        model, Request(prompts()[2], Sampling(temperature=0.8, seed=4), max_new_tokens=15), eos_ids=[])[0]


def test_a_step_that_fails_to_compile_decodes_uncompiled_with_the_same_tokens(caplog):
    @torch._dynamo.register_backend(name="lmforge_test_no_compiler")
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    model = model_of("llama")
    request = Request(prompts()[1], Sampling(temperature=0.9, top_p=0.9, seed=2), max_new_tokens=12)
    torch._dynamo.reset()
    engine = Engine(model, slots=2, max_len=64, eos_ids=[], compile="lmforge_test_no_compiler")
    assert engine.generate([request])[0].samples[0].token_ids == tokens_alone(model, request, eos_ids=[])[0]
    assert not engine.backend.compiled and "compiling the decoding step failed" in caplog.text
    torch._dynamo.reset()


def test_the_row_table_mirrors_the_decoding_sequences_through_joins_leaves_cancels_and_sessions():
    """The engine keeps each decoding row's step inputs in a table written only when a row changes hands and
    advanced in place each step: after every step it must equal a table built afresh from the sequences."""
    model = model_of("llama")
    engine = Engine(model, slots=5, max_len=128, prefill_chunk=8, eos_ids=[])
    mixed = [Sampling(temperature=0.0), Sampling(temperature=0.7, top_p=0.9, seed=1),
             Sampling(temperature=1.0, min_p=0.1, repetition_penalty=1.2, seed=2), Sampling(top_k=5, seed=3)]
    handles = [engine.submit(Request(p, mixed[i % 4], max_new_tokens=6 + 5 * i, n=1 + i % 2, logprobs=i == 1))
               for i, p in enumerate(prompts())]
    session = engine.submit(Request(prompts()[0], mixed[1], max_new_tokens=4, session=True))
    checked = 0
    for step in range(80):
        engine.step()
        if step == 6:
            engine.cancel(handles[3])
        if session.done and not session.result().samples[0].token_ids[4:] and step < 60:
            session = engine.continue_session(session, [7, 8, 9], max_new_tokens=5)
        count = engine.decoding
        if count:
            fresh = RowTable.of(engine.rows[:count])
            assert np.array_equal(engine.table.pack(count, count, 0), fresh.pack(count, count, 0)), step
            assert engine.table.mode(count) == fresh.mode(count)
            checked += 1
    assert all(h.done for h in handles) and checked > 20
    assert handles[3].result().samples[0].finish_reason == "cancelled"


def test_the_graphs_storage_check_sees_a_replaced_parameter_and_moved_data_but_not_an_in_place_update():
    """Captured graphs hold parameter addresses: they are recaptured when the storage check changes."""
    from lmforge.generation.graphs import storage_of

    model = model_of("qwen3")
    holders = Engine(model, slots=2, max_len=64, eos_ids=[]).backend.parameter_holders()
    before = storage_of(holders)
    assert len(before) == len(list(model.parameters()))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)  # an optimizer step: same storage
    assert storage_of(holders) == before
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # a reload
    replaced = storage_of(holders)
    assert replaced != before
    model.model.layers[0].self_attn.q_norm.weight.data = torch.ones(24)  # new data behind the same Parameter
    assert storage_of(holders) != replaced
