"""The generation engine under hostile requests and callers: every bad value is refused with one line naming
its field, and nothing a caller does (cancel twice, release a running request, submit from other threads
while a worker steps, fill every row) leaves a row stuck or a request without its ending."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.generation import Engine, Request, RequestError, Sampling

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2)
GREEDY = Sampling(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()


BAD_SAMPLING = [
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"), ({"min_p": 1.0}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"), ({"seed": 1.0}, "seed"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"presence_penalty": math.nan}, "presence_penalty"),
]
BAD_REQUESTS = [
    ({"prompt_ids": {"input_ids": [1, 2], "attention_mask": [1, 1]}}, "prompt_ids"),
    ({"prompt_ids": []}, "prompt_ids"), ({"prompt_ids": "hello"}, "prompt_ids"), ({"prompt_ids": 5}, "prompt_ids"),
    ({"prompt_ids": [1, -2]}, r"prompt_ids\[1\]"), ({"prompt_ids": [1, 2.0]}, r"prompt_ids\[1\]"),
    ({"prompt_ids": [True]}, r"prompt_ids\[0\]"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": None}, "max_new_tokens"), ({"top_logprobs": 21}, "top_logprobs"), ({"n": 0}, "n"),
    ({"logprobs": "yes"}, "logprobs"), ({"stop_strings": "END"}, "stop_strings"),
    ({"stop_strings": [""]}, "stop_strings"), ({"stop_strings": [3]}, "stop_strings"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids\[0\]"), ({"sampling": {"temperature": 0}}, "sampling"),
]


def test_a_tokenizers_mapping_as_prompt_says_to_pass_its_input_ids():
    with pytest.raises(RequestError, match=r"pass its \['input_ids'\]$"):
        Request({"input_ids": [1, 2], "attention_mask": [1, 1]})


@pytest.mark.parametrize(("values", "field"), BAD_SAMPLING, ids=[str(v) for v, _ in BAD_SAMPLING])
def test_bad_sampling_values_are_refused_naming_the_field(values, field):
    with pytest.raises(RequestError, match=rf"^request\.{field}: ") as caught:
        Sampling(**values)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("values", "field"), BAD_REQUESTS, ids=[str(v) for v, _ in BAD_REQUESTS])
def test_bad_request_values_are_refused_naming_the_field(values, field):
    with pytest.raises(RequestError, match=rf"^request\.{field}: ") as caught:
        Request(**{"prompt_ids": [5, 6], **values})
    assert "\n" not in str(caught.value)


def test_numpy_and_torch_token_ids_are_token_ids():
    assert Request(np.array([3, 4])).prompt_ids == [3, 4]
    assert Request(torch.tensor([3, 4])).prompt_ids == [3, 4]
    assert all(type(t) is int for t in Request(np.array([3, 4])).prompt_ids)


def test_requests_that_cannot_fit_the_engine_are_refused_before_they_run(model):
    engine = Engine(model, slots=2, max_len=32, eos_ids=[])
    cases = [
        (Request([5] * 30, max_new_tokens=3), "max_new_tokens: prompt .30 tokens. . max_new_tokens .3. = 33 > "),
        (Request([5], max_new_tokens=3, n=3), "n: 3 samples need 3 rows"),
        (Request([5, 96], max_new_tokens=3), r"prompt_ids: token id 96 is outside the model's vocabulary of 96"),
        (Request([5], max_new_tokens=3, stop_strings=["x"]), "stop_strings: the engine has no tokenizer"),
    ]
    for request, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.submit(request)
    with pytest.raises(RequestError, match="expected a Request"):
        engine.submit({"prompt_ids": [1]})
    good = Request([5, 6], GREEDY, max_new_tokens=4)
    with pytest.raises(RequestError, match="n: 3 samples"):  # all or nothing: the good one does not run either
        engine.generate([good, Request([5], max_new_tokens=3, n=3)])
    assert engine.idle
    # Exactly max_len fits.
    assert len(engine.generate([Request([5] * 28, GREEDY, max_new_tokens=4)])[0].samples[0].token_ids) == 4


@pytest.mark.parametrize(("settings", "message"), [({"slots": 0}, "slots"), ({"max_len": -1}, "max_len"),
                                                   ({"prefill_chunk": 1.5}, "prefill_chunk"),
                                                   ({"max_len": 257}, "max_len=257 is past the model's 256"),
                                                   ({"backend": "vllm"}, "backend 'vllm'"),
                                                   ({"compile": 1}, "compile: must be true, false or a torch"),
                                                   ({"compile": ""}, "compile: must be true"),
                                                   ({"compile": "max-autotune"}, "'max-autotune': not a torch")])
def test_bad_engine_settings_are_refused_naming_them(model, settings, message):
    with pytest.raises(ValueError, match=message):
        Engine(model, **settings)


def test_cancel_twice_release_while_running_and_cancel_a_finished_request(model):
    engine = Engine(model, slots=2, max_len=64, eos_ids=[])
    running = engine.submit(Request([5, 6, 7], GREEDY, max_new_tokens=20, session=True))
    engine.step()
    engine.release(running)  # released while it still runs: its row is freed when it ends, not kept
    engine.cancel(running)
    engine.cancel(running)
    events = engine.step()
    assert [e.finish_reason for e in events if e.handle is running] == ["cancelled"]
    assert running.done and engine.rows == [None, None]
    finished = engine.submit(Request([5], GREEDY, max_new_tokens=2))
    while not finished.done:
        engine.step()
    engine.cancel(finished)
    assert engine.step() == [] and finished.result().samples[0].finish_reason == "length"
    session = engine.submit(Request([5], GREEDY, max_new_tokens=2, session=True))
    engine.release(session)
    while not session.done:
        engine.step()
    assert engine.rows == [None, None]  # released before it ended: not kept


def test_more_requests_than_rows_all_finish_and_every_row_comes_back(model):
    engine = Engine(model, slots=3, max_len=64, prefill_chunk=4, eos_ids=[2])
    g = torch.Generator().manual_seed(1)
    requests = [Request(torch.randint(3, 96, (int(n),), generator=g).tolist(),
                        Sampling(temperature=1.0, seed=i), max_new_tokens=int(m), n=int(k))
                for i, (n, m, k) in enumerate(torch.randint(1, 20, (25, 3), generator=g).tolist()) if k <= 3]
    results = engine.generate(requests)
    for request, result in zip(requests, results):
        assert len(result.samples) == request.n
        for sample in result.samples:
            assert sample.finish_reason in ("stop", "length")
            assert len(sample.token_ids) == request.max_new_tokens or sample.token_ids[-1] == 2
    assert engine.idle and engine.rows == [None] * 3


def test_submit_and_cancel_from_other_threads_while_a_worker_steps(model):
    engine = Engine(model, slots=4, max_len=64, eos_ids=[])
    stop = threading.Event()

    def work():
        while not stop.is_set():
            if engine.wait_for_work(timeout=0.05):
                engine.step()

    worker = threading.Thread(target=work)
    worker.start()
    handles, errors = [], []

    def client(index: int):
        try:
            for j in range(5):
                handle = engine.submit(Request([5 + index, 6 + j], Sampling(temperature=1.0, seed=index * 10 + j),
                                               max_new_tokens=12))
                if j % 2:
                    engine.cancel(handle)
                handles.append((index, j, handle))
        except Exception as error:  # pragma: no cover - the assertion below reports it
            errors.append(error)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    for _, _, handle in handles:
        assert handle.finished.wait(timeout=120)
    stop.set()
    worker.join()
    assert not errors and len(handles) == 20
    reasons = [h.result().samples[0].finish_reason for _, _, h in handles]
    assert set(reasons) <= {"length", "cancelled"} and reasons.count("length") >= 10
    for index, j, handle in handles:  # a finished one is exactly what the request gets alone
        if handle.result().samples[0].finish_reason == "length":
            alone = Engine(model, slots=1, max_len=64, eos_ids=[]).generate([handle.request])[0]
            assert handle.result().samples[0].token_ids == alone.samples[0].token_ids, (index, j)
    assert engine.rows == [None] * 4


def test_a_closed_stream_cancels_its_request_and_frees_the_row(model):
    engine = Engine(model, slots=1, max_len=64, eos_ids=[])
    stream = engine.stream(Request([5, 6], GREEDY, max_new_tokens=30))
    first = next(stream)
    stream.close()
    assert first.handle.done and first.handle.result().samples[0].finish_reason == "cancelled"
    assert engine.rows == [None] and engine.idle


def test_bad_continuations_are_refused_naming_the_field(model):
    engine = Engine(model, slots=1, max_len=64, eos_ids=[])
    session = engine.submit(Request([5, 6], GREEDY, max_new_tokens=3, session=True))
    with pytest.raises(RequestError, match="sample 0 is not a finished"):
        engine.continue_session(session, [7])  # still running
    while not session.done:
        engine.step()
    for extra, max_new, message in (([7, -1], None, r"^request\.extra_ids\[1\]"), ("text", None, "extra_ids"),
                                    ([7], 0, r"^request\.max_new_tokens"), ([96], None, "extra_ids: token id 96"),
                                    ([7], None, "sample 3")):
        with pytest.raises(RequestError, match=message):
            engine.continue_session(session, extra, max_new, sample=3 if message == "sample 3" else 0)
    assert engine.rows[0] is not None  # the session is still kept, and continues fine
    more = engine.continue_session(session, [], max_new_tokens=2)
    while not more.done:
        engine.step()
    assert len(more.result().samples[0].token_ids) == 2


def test_reset_ends_everything_and_frees_every_row(model):
    engine = Engine(model, slots=2, max_len=64, eos_ids=[])
    kept = engine.submit(Request([5], GREEDY, max_new_tokens=2, session=True))
    while not kept.done:
        engine.step()
    running = engine.submit(Request([5, 6], GREEDY, max_new_tokens=30))
    engine.step()
    waiting = engine.submit(Request([5, 6], GREEDY, max_new_tokens=30, n=2))
    posted = engine.submit(Request([7], GREEDY, max_new_tokens=30))
    engine.step()
    assert set(engine.reset()) == {running, waiting, posted}
    assert all(h.done for h in (kept, running, waiting, posted)) and engine.idle and engine.rows == [None, None]
    assert [s.finish_reason for s in waiting.result().samples] == ["cancelled", "cancelled"]
    assert len(engine.generate([Request([5, 6], GREEDY, max_new_tokens=4)])[0].samples[0].token_ids) == 4


@pytest.mark.parametrize("sampling", [
    Sampling(temperature=1e-6, seed=1), Sampling(temperature=1e6, seed=1), Sampling(top_k=10**9, seed=1),
    Sampling(top_p=1e-12, seed=1), Sampling(min_p=0.999999, seed=1), Sampling(repetition_penalty=1e9, seed=1),
    Sampling(repetition_penalty=1e-9, presence_penalty=-2.0, seed=1), Sampling(seed=2**63 - 1),
], ids=["cold", "hot", "top_k_huge", "top_p_tiny", "min_p_high", "rep_huge", "rep_tiny", "seed_max"])
def test_extreme_sampling_settings_still_draw_real_tokens(model, sampling):
    engine = Engine(model, slots=2, max_len=64, eos_ids=[])
    result = engine.generate([Request([5, 6, 7], sampling, max_new_tokens=20, n=2, logprobs=True)])[0]
    for sample in result.samples:
        assert len(sample.token_ids) == 20 and all(0 <= t < 96 for t in sample.token_ids)
        assert all(math.isfinite(v) and v <= 0 for v in sample.logprobs)
    if sampling.top_p < 1e-6 or sampling.min_p > 0.99 or sampling.temperature < 1e-5:
        greedy = engine.generate([Request([5, 6, 7], GREEDY, max_new_tokens=20)])[0].samples[0].token_ids
        assert all(s.token_ids == greedy for s in result.samples)  # only the best token is left to draw


def test_nan_logits_raise_one_line_instead_of_drawing_token_zero():
    from lmforge.generation import GenerationError

    torch.manual_seed(0)
    broken = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    with torch.no_grad():
        broken.lm_head.weight[7, 3] = math.nan
    engine = Engine(broken, slots=2, max_len=64, eos_ids=[])
    handle = engine.submit(Request([5, 6], Sampling(seed=1), max_new_tokens=5))
    with pytest.raises(GenerationError, match=r"non-finite logits \(NaN or inf\) for 1 of 1 rows") as caught:
        for _ in range(3):
            engine.step()
    assert "\n" not in str(caught.value)
    assert engine.reset() == [handle] and handle.result().samples[0].finish_reason == "cancelled"
    assert engine.rows == [None, None] and engine.idle
