"""The generation engine against transformers' generate and against itself: joining mid-flight, shared
prefixes, sessions, chunked prefill, cancels, log-probs, LoRA."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lmforge.generation import Engine, Request, Sampling
from lmforge.generation.hf_fallback import HFBackend
from lmforge.generation.llama import LlamaFamilyBackend

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),  # biased q/k/v projections
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=24, **SHAPE)),  # q/k norms, head_dim != h/H
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE)),  # its 4096 window is past max_len
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=256,
                                               eos_token_id=2, bos_token_id=1)),
}
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
GREEDY = Sampling(temperature=0.0)
SAMPLED = Sampling(temperature=0.9, top_p=0.95, top_k=40, min_p=0.01, repetition_penalty=1.2,
                   presence_penalty=0.3, seed=7)


def model_of(arch: str = "llama", device: str = "cpu"):
    torch.manual_seed(0)
    return ARCHITECTURES[arch]().to(device).eval()


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in (4, 19, 9, 33, 1)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def tokens_alone(model, request: Request, **engine) -> list[list[int]]:
    result = Engine(model, **{"slots": 4, "max_len": 128, **engine}).generate([request])[0]
    return [s.token_ids for s in result.samples]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_equals_transformers_generate(arch, device):
    model = model_of(arch, device)
    engine = Engine(model, slots=3, max_len=128, prefill_chunk=16, eos_ids=[2])
    expected_backend = HFBackend if arch == "gpt2" else LlamaFamilyBackend
    assert isinstance(engine.backend, expected_backend)
    # Five prompts through three rows: some wait, join as others leave, and prefill in chunks.
    results = engine.generate([Request(p, GREEDY, max_new_tokens=37) for p in prompts()])
    for prompt, result in zip(prompts(), results):
        tokens = result.samples[0].token_ids
        assert tokens == hf_greedy(model, prompt, 37, [2])
        assert result.samples[0].finish_reason == ("stop" if tokens[-1] == 2 else "length")
    assert engine.idle and engine.rows == [None] * 3


def test_hf_fallback_can_be_asked_for_on_a_supported_model():
    model = model_of("qwen3")
    engine = Engine(model, slots=2, max_len=64, backend="hf", eos_ids=[2])
    assert isinstance(engine.backend, HFBackend)
    assert engine.generate([Request(prompts()[1], GREEDY, max_new_tokens=20)])[0].samples[0].token_ids == \
        hf_greedy(model, prompts()[1], 20, [2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_request_joining_mid_flight_gets_the_tokens_it_gets_alone(arch, sampling, device):
    model = model_of(arch, device)
    late = Request(prompts()[3], sampling, max_new_tokens=25)
    early = [Request(p, sampling, max_new_tokens=40) for p in prompts()[:3]]
    engine = Engine(model, slots=4, max_len=128, prefill_chunk=8, eos_ids=[])
    handles = [engine.submit(r) for r in early]
    for _ in range(7):
        engine.step()
    joined = engine.submit(late)
    while not joined.done or not all(h.done for h in handles):
        engine.step()
    assert joined.result().samples[0].token_ids == tokens_alone(model, late, eos_ids=[])[0]
    for request, handle in zip(early, handles):
        assert handle.result().samples[0].token_ids == tokens_alone(model, request, eos_ids=[])[0]


def test_shared_prefix_samples_equal_unshared_ones_and_prefill_once():
    model = model_of("qwen2")
    sampling = Sampling(temperature=1.0, seed=11)
    engine = Engine(model, slots=6, max_len=96, eos_ids=[])
    fed = []
    prefill = engine.backend.prefill
    engine.backend.prefill = lambda rows, chunks, starts: fed.append([len(c) for c in chunks]) or \
        prefill(rows, chunks, starts)
    shared = engine.generate([Request(prompts()[3], sampling, max_new_tokens=15, n=4)])[0]
    assert fed == [[33]]  # the 33-token prompt once, not four times
    alone = [tokens_alone(model, Request(prompts()[3], Sampling(temperature=1.0, seed=11 + i), max_new_tokens=15),
                          eos_ids=[])[0] for i in range(4)]
    assert [s.token_ids for s in shared.samples] == alone
    assert len({tuple(t) for t in alone}) == 4  # distinct draws, not one sample copied
    assert shared.seed == 11


def test_chunked_prefill_equals_unchunked():
    model = model_of("llama")
    request = Request(prompts()[3], GREEDY, max_new_tokens=12, logprobs=True)
    whole = Engine(model, slots=2, max_len=64, prefill_chunk=512, eos_ids=[]).generate([request])[0].samples[0]
    chunked = Engine(model, slots=2, max_len=64, prefill_chunk=5, eos_ids=[]).generate([request])[0].samples[0]
    assert chunked.token_ids == whole.token_ids
    assert torch.allclose(torch.tensor(chunked.logprobs), torch.tensor(whole.logprobs), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_a_continued_session_equals_the_long_prompt_decoded_from_scratch(arch, device):
    model = model_of(arch, device)
    engine = Engine(model, slots=2, max_len=128, eos_ids=[])
    first = engine.submit(Request(prompts()[0], GREEDY, max_new_tokens=6, session=True))
    while not first.done:
        engine.step()
    reply = first.result().samples[0].token_ids
    assert engine.rows.count(None) == 1  # the session keeps its row
    tool_result = [17, 18, 19, 20]
    second = engine.continue_session(first, tool_result, max_new_tokens=9)
    while not second.done:
        engine.step()
    expected = hf_greedy(model, prompts()[0] + reply + tool_result, 9, [])
    assert second.result().samples[0].token_ids == expected
    third = engine.continue_session(second, [21], max_new_tokens=5)
    while not third.done:
        engine.step()
    expected = hf_greedy(model, prompts()[0] + reply + tool_result + expected + [21], 5, [])
    assert third.result().samples[0].token_ids == expected
    engine.release(third)
    engine.step()
    assert engine.rows == [None, None] and engine.idle


def test_continuing_a_released_or_plain_request_is_refused():
    from lmforge.generation import RequestError

    model = model_of("llama")
    engine = Engine(model, slots=2, max_len=64, eos_ids=[])
    plain = engine.submit(Request(prompts()[0], GREEDY, max_new_tokens=3))
    while not plain.done:
        engine.step()
    with pytest.raises(RequestError, match="session=True"):
        engine.continue_session(plain, [5])
    kept = engine.submit(Request(prompts()[0], GREEDY, max_new_tokens=3, session=True))
    while not kept.done:
        engine.step()
    engine.release(kept)
    late = engine.continue_session(kept, [5])  # posted before the release is applied: ends cancelled
    engine.step()
    assert late.done and late.result().samples[0].finish_reason == "cancelled"
    with pytest.raises(RequestError, match="max_len=64"):
        engine.continue_session(kept, [5] * 60)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_logprobs_equal_a_teacher_forced_forward_pass(arch, device):
    model = model_of(arch, device)
    request = Request(prompts()[1], Sampling(temperature=0.7, top_k=20, seed=3), max_new_tokens=16, logprobs=True,
                      top_logprobs=3, n=2)
    result = Engine(model, slots=2, max_len=64, eos_ids=[]).generate([request])[0]
    for sample in result.samples:
        ids = torch.tensor([prompts()[1] + sample.token_ids], device=device)
        with torch.no_grad():
            forced = torch.log_softmax(model(ids).logits[0].float(), -1).cpu()
        start = len(prompts()[1]) - 1
        expected = forced[start:start + 16].gather(-1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)
        best = forced[start:start + 16].topk(3, dim=-1)
        assert [[t for t, _ in step] for step in sample.top_logprobs] == best.indices.tolist()
        assert torch.allclose(torch.tensor([[v for _, v in step] for step in sample.top_logprobs]), best.values,
                              atol=1e-4)


def test_a_cancelled_row_frees_its_slot_and_the_others_are_unaffected():
    model = model_of("llama")
    requests = [Request(p, SAMPLED, max_new_tokens=30) for p in prompts()[:3]]
    engine = Engine(model, slots=2, max_len=96, eos_ids=[])
    first, second, third = (engine.submit(r) for r in requests)
    for _ in range(6):
        engine.step()
    assert engine.waiting[0] is third  # no free row for the third yet
    engine.cancel(first)
    events = engine.step()
    assert [(e.handle, e.finish_reason) for e in events if e.token_id is None] == [(first, "cancelled")]
    while not (second.done and third.done):
        engine.step()
    cut = first.result().samples[0]
    assert cut.finish_reason == "cancelled" and 0 < len(cut.token_ids) < 30
    assert cut.token_ids == tokens_alone(model, requests[0], eos_ids=[])[0][:len(cut.token_ids)]
    assert second.result().samples[0].token_ids == tokens_alone(model, requests[1], eos_ids=[])[0]
    assert third.result().samples[0].token_ids == tokens_alone(model, requests[2], eos_ids=[])[0]
    assert engine.rows == [None, None]


def test_a_waiting_request_can_be_cancelled_and_never_takes_a_row():
    engine = Engine(model_of("llama"), slots=1, max_len=64, eos_ids=[])
    running = engine.submit(Request(prompts()[0], GREEDY, max_new_tokens=10))
    queued = engine.submit(Request(prompts()[1], GREEDY, max_new_tokens=10))
    engine.step()
    engine.cancel(queued)
    engine.step()
    assert queued.done and queued.result().samples[0].token_ids == []
    while not running.done:
        engine.step()
    assert running.result().samples[0].finish_reason == "length"


@pytest.mark.parametrize("device", DEVICES)
def test_lora_layers_apply_in_the_own_decoder(device):
    from peft import LoraConfig, get_peft_model

    base = model_of("llama", device)
    plain = [hf_greedy(base, p, 20, []) for p in prompts()[:3]]
    torch.manual_seed(1)
    # init_lora_weights=False: random A and B, so the adapter changes the output from the first step.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).eval()
    engine = Engine(model, slots=4, max_len=64, eos_ids=[])
    assert isinstance(engine.backend, LlamaFamilyBackend)
    got = [r.samples[0].token_ids for r in engine.generate([Request(p, GREEDY, max_new_tokens=20)
                                                              for p in prompts()[:3]])]
    assert got == [hf_greedy(model, p, 20, []) for p in prompts()[:3]]
    assert got != plain


def test_a_training_model_is_decoded_in_eval_mode_and_left_training():
    model = model_of("llama").train()
    engine = Engine(model, slots=1, max_len=64, eos_ids=[])
    got = engine.generate([Request(prompts()[0], GREEDY, max_new_tokens=8)])[0].samples[0].token_ids
    assert model.training
    assert got == hf_greedy(model.eval(), prompts()[0], 8, [])


def test_stop_token_ends_the_sample_and_is_kept_in_its_ids():
    model = model_of("llama")
    free = tokens_alone(model, Request(prompts()[1], GREEDY, max_new_tokens=20), eos_ids=[])[0]
    stop = free[5]
    cut = free.index(stop) + 1
    sample = Engine(model, slots=1, max_len=64, eos_ids=[]).generate(
        [Request(prompts()[1], GREEDY, max_new_tokens=20, stop_token_ids=[stop])])[0].samples[0]
    assert sample.token_ids == free[:cut] and sample.finish_reason == "stop"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_decoding_steps_equal_eager_ones_and_follow_reloaded_weights():
    model = model_of("qwen2", "cuda")
    requests = [Request(p, SAMPLED, max_new_tokens=30, logprobs=True) for p in prompts()]
    eager = Engine(model, slots=3, max_len=128, eos_ids=[2], cuda_graphs=False)
    graphed = Engine(model, slots=3, max_len=128, eos_ids=[2])
    assert eager.backend.graphs is None and graphed.backend.graphs is not None
    expected, got = eager.generate(requests), graphed.generate(requests)
    assert [s.token_ids for r in got for s in r.samples] == [s.token_ids for r in expected for s in r.samples]
    for a, b in zip(got, expected):
        assert torch.allclose(torch.tensor(a.samples[0].logprobs), torch.tensor(b.samples[0].logprobs), atol=1e-4)
    assert len(graphed.backend.graphs.graphs) >= 2  # several batch buckets were used
    # New parameter storage (a reload): the graphs are captured again and decode the new weights.
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(-model.lm_head.weight.detach().clone())
    assert [r.samples[0].token_ids for r in graphed.generate(requests)] == \
        [r.samples[0].token_ids for r in eager.generate(requests)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_steps_under_autocast_follow_in_place_updates_and_keep_apart_from_fp32_ones():
    """RL in mixed precision: fp32 weights stepped in place between rollouts that run under bf16 autocast. A graph
    must re-cast the live weights at every replay (never replay autocast's cached copy of the old ones), and a
    step without autocast (evaluation) must not replay a graph captured with it."""
    model = model_of("llama", "cuda")
    requests = [Request(p, GREEDY, max_new_tokens=24) for p in prompts()]
    graphed = Engine(model, slots=3, max_len=128, eos_ids=[])
    eager = Engine(model, slots=3, max_len=128, eos_ids=[], cuda_graphs=False)
    rounds = []
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, expected = graphed.generate(requests), eager.generate(requests)
        rounds.append([r.samples[0].token_ids for r in got])
        assert rounds[-1] == [r.samples[0].token_ids for r in expected]
        fp32 = [r.samples[0].token_ids for r in graphed.generate(requests)]
        assert fp32 == [r.samples[0].token_ids for r in eager.generate(requests)]
        torch.manual_seed(len(rounds))
        with torch.no_grad():  # an optimizer step: the same storage, new values
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.5)
    assert rounds[0] != rounds[1]  # the update mattered


def test_greedy_with_a_repetition_penalty_equals_transformers_generate():
    model = model_of("llama")
    engine = Engine(model, slots=2, max_len=96, eos_ids=[])
    sampling = Sampling(temperature=0.0, repetition_penalty=1.5)
    results = engine.generate([Request(p, sampling, max_new_tokens=40) for p in prompts()[:3]])
    for prompt, result in zip(prompts()[:3], results):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, repetition_penalty=1.5,
                             eos_token_id=[], pad_token_id=0)
        assert result.samples[0].token_ids == out[0, len(prompt):].tolist()
    assert results[0].samples[0].token_ids != tokens_alone(model, Request(prompts()[0], GREEDY, max_new_tokens=40),
                                                           eos_ids=[])[0]


def test_a_step_that_cannot_be_captured_decodes_eagerly_instead():
    class Uncapturable:
        def run(self, *step):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = model_of("llama")
    request = Request(prompts()[1], SAMPLED, max_new_tokens=12)
    engine = Engine(model, slots=2, max_len=64, eos_ids=[])
    engine.backend.graphs = Uncapturable()
    assert engine.generate([request])[0].samples[0].token_ids == tokens_alone(model, request, eos_ids=[])[0]
    assert engine.backend.graphs is None


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_prompts_prefilled_together_equal_prompts_prefilled_alone(arch):
    """Five prompts of 1 to 33 tokens in one padded forward, in chunks of 7 tokens a step between them,
    and one at a time: the same tokens and log-probs."""
    model = model_of(arch)
    requests = [Request(p, SAMPLED, max_new_tokens=10, logprobs=True) for p in prompts()]
    together = Engine(model, slots=5, max_len=64, prefill_chunk=66, eos_ids=[])  # 4 + 19 + 9 + 33 + 1
    calls = []
    prefill = together.backend.prefill
    together.backend.prefill = lambda rows, chunks, starts: calls.append(len(rows)) or prefill(rows, chunks, starts)
    batched = together.generate(requests)
    assert calls == [5]
    chunked = Engine(model, slots=5, max_len=64, prefill_chunk=7, eos_ids=[]).generate(requests)
    for request, a, b in zip(requests, batched, chunked):
        alone = Engine(model, slots=1, max_len=64, eos_ids=[]).generate([request])[0].samples[0]
        assert a.samples[0].token_ids == b.samples[0].token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(a.samples[0].logprobs), torch.tensor(alone.logprobs), atol=1e-5)
        assert torch.allclose(torch.tensor(b.samples[0].logprobs), torch.tensor(alone.logprobs), atol=1e-5)


def test_a_chat_streams_two_turns_through_one_session():
    """The second turn streams from the cache the first left: equal to decoding the whole chat from scratch."""
    model = model_of("qwen2")
    engine = Engine(model, slots=1, max_len=96, eos_ids=[])
    events = list(engine.stream(Request(prompts()[1], GREEDY, max_new_tokens=7, session=True)))
    first = [e.token_id for e in events]
    assert events[-1].handle.result().samples[0].token_ids == first
    handle = engine.continue_session(events[-1].handle, [30, 31, 32], max_new_tokens=6)
    second = [e.token_id for e in engine.stream(handle)]
    assert second == hf_greedy(model, prompts()[1] + first + [30, 31, 32], 6, [])
    engine.release(handle)
    engine.step()
    assert engine.rows == [None]
