"""RL rollouts on the generation engine: old log-probs equal the training pass's, one engine per run follows
the weights as they change in place (LoRA included), and a sharded (FSDP2) policy rolls out on its gathered
parameters exactly as the whole model does."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.config.errors import ConfigError
from lmforge.config.schema import RLConfig
from lmforge.data.templates import encode_prompts
from lmforge.generation import Sampling
from lmforge.generation.hf_fallback import HFBackend
from lmforge.generation.llama import LlamaFamilyBackend
from lmforge.models.value import reply_logits
from lmforge.rollout.rollouts import RolloutEngine
from lmforge.stages.online import engine_logps_are_exact, token_logps

WORKER = Path(__file__).resolve().parent / "fsdp_rollout_worker.py"
QUESTIONS = ["What is 2 + 3?", "Where is it?", "Name the largest city of the northern province, please."]


@pytest.fixture(scope="module")
def policy(base):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)


def prompts_of(tokenizer) -> list[list[int]]:
    return encode_prompts(tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS])


def teacher_forced(model, samples, temperature: float) -> torch.Tensor:
    """The stage's own old log-probs: a forward pass over left-padded prompt + reply, logits / temperature."""
    with torch.no_grad():
        logits = reply_logits(model.eval(), samples.model_inputs(), samples.response_ids.shape[1])
    return token_logps(logits.float(), samples.response_ids, temperature) * samples.response_mask


@pytest.mark.parametrize("backend,temperature", [("own", 0.7), ("hf", 1.0), ("own", 1.3)])
def test_engine_old_logprobs_equal_the_teacher_forced_pass(policy, backend, temperature):
    model, tokenizer = policy
    prompts = prompts_of(tokenizer)
    engine = RolloutEngine(model, tokenizer, 6, max(map(len, prompts)), 10, backend)
    torch.manual_seed(3)
    samples = engine.sample(prompts, Sampling(temperature=temperature, top_k=30), 10, n=2, logprobs=True)
    assert isinstance(engine.get().backend, LlamaFamilyBackend if backend == "own" else HFBackend)
    assert samples.logps.shape == samples.response_ids.shape and samples.lengths.sum() > 20
    assert (samples.logps[samples.response_mask == 0] == 0).all()
    expected = teacher_forced(model, samples, temperature)
    assert torch.allclose(samples.logps, expected, atol=1e-4), (samples.logps - expected).abs().max()
    if temperature != 1.0:  # tempered, not the raw distribution's log-probs
        assert not torch.allclose(samples.logps, teacher_forced(model, samples, 1.0), atol=1e-2)


def test_one_engine_follows_weights_changed_in_place(policy):
    model, tokenizer = policy
    model = type(model)(model.config)
    model.load_state_dict(policy[0].state_dict())
    prompts = prompts_of(tokenizer)
    engine = RolloutEngine(model, tokenizer, 3, max(map(len, prompts)), 12)
    before = engine.sample(prompts, Sampling(temperature=0.0), 12)
    built = engine.get()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    unlikely = token_logps(reply_logits(model, before.model_inputs(), 12).float(), before.response_ids, 1.0).sum()
    unlikely.backward()  # a step away from the replies it gave (Adam: a full-size step whatever the gradient)
    optimizer.step()  # in place, as the training loop does
    after = engine.sample(prompts, Sampling(temperature=0.0), 12)
    fresh = RolloutEngine(model, tokenizer, 3, max(map(len, prompts)), 12).sample(prompts, Sampling(temperature=0.0), 12)
    assert engine.get() is built  # one engine per run
    assert torch.equal(after.response_ids, fresh.response_ids) and after.texts == fresh.texts
    assert not torch.equal(after.response_ids, before.response_ids)
    assert model.training  # the engine decodes in eval mode and hands the model back as it found it


def test_a_lora_policy_rolls_out_on_the_own_decoder_with_its_adapter(policy):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = policy
    base = type(model)(model.config)
    base.load_state_dict(model.state_dict())
    prompts = prompts_of(tokenizer)
    plain = RolloutEngine(base, tokenizer, 3, max(map(len, prompts)), 10).sample(prompts, Sampling(temperature=0), 10)
    torch.manual_seed(1)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    engine = RolloutEngine(lora, tokenizer, 6, max(map(len, prompts)), 10)
    samples = engine.sample(prompts, Sampling(temperature=0.9), 10, n=2, logprobs=True)
    assert isinstance(engine.get().backend, LlamaFamilyBackend)
    assert torch.allclose(samples.logps, teacher_forced(lora, samples, 0.9), atol=1e-4)
    greedy = engine.sample(prompts, Sampling(temperature=0), 10)
    hf = RolloutEngine(lora, tokenizer, 3, max(map(len, prompts)), 10, "hf").sample(prompts, Sampling(temperature=0), 10)
    assert torch.equal(greedy.response_ids, hf.response_ids)
    assert not torch.equal(greedy.response_ids, plain.response_ids)  # the adapter is applied
    with torch.no_grad():  # the adapter trains in place between rollouts: the same engine follows it
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-1.0)
    moved = engine.sample(prompts, Sampling(temperature=0), 10)
    fresh = RolloutEngine(lora, tokenizer, 3, max(map(len, prompts)), 10, "hf").sample(prompts, Sampling(temperature=0), 10)
    assert torch.equal(moved.response_ids, fresh.response_ids)


def test_same_seed_gives_the_same_rollout_and_a_long_prompt_is_cut_not_refused(policy):
    model, tokenizer = policy
    prompts = prompts_of(tokenizer)
    engine = RolloutEngine(model, tokenizer, 4, max(map(len, prompts)), 8)
    torch.manual_seed(5)
    first = engine.sample(prompts, Sampling(), 8, n=2)
    torch.manual_seed(5)
    second = engine.sample(prompts, Sampling(), 8, n=2)
    assert torch.equal(first.response_ids, second.response_ids)
    longer = [prompts[2] * 3]  # past the engine's max_len: evaluation keeps its end and answers it
    cut = engine.sample(longer, Sampling(temperature=0), 8)
    assert cut.prompt_ids.shape[1] + cut.response_ids.shape[1] <= engine.max_len
    assert cut.prompt_ids[0, -5:].tolist() == longer[0][-5:]


def test_old_logprobs_come_from_the_engine_only_with_fp32_numerics(policy):
    model, _ = policy
    cpu = torch.device("cpu")
    assert engine_logps_are_exact(model, SimpleNamespace(device=cpu, mixed_precision="no"))
    assert not engine_logps_are_exact(model, SimpleNamespace(device=cpu, mixed_precision="bf16"))
    half = type(model)(model.config).to(torch.bfloat16)
    assert not engine_logps_are_exact(half, SimpleNamespace(device=cpu, mixed_precision="no"))


def test_rl_backend_names_the_engine_backends():
    assert RLConfig(backend="own").backend == "own" and RLConfig(backend="lmforge").backend == "lmforge"
    with pytest.raises(ConfigError, match=r"rl.backend='vllm' is not one of auto, own, hf"):
        RLConfig(backend="vllm")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["own", "hf"])
def test_an_fsdp2_sharded_policy_rolls_out_as_the_whole_model(tmp_path, backend):
    """Two CPU processes: the engine on the gathered parameters gives the whole model's tokens and log-probs,
    the parameters are sharded again afterwards, and the same engine follows an in-place update."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "fsdp.pt"
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(WORKER), str(out),
                           backend], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["backend"] == ("LlamaFamilyBackend" if backend == "own" else "HFBackend")
    assert result["resharded"]
    for expected, got in zip(result["expected"], result["got"]):
        assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
        assert torch.allclose(torch.tensor([lp for _, lps in got for lp in lps]),
                              torch.tensor([lp for _, lps in expected for lp in lps]), atol=1e-5)
    assert [t for t, _ in result["expected"][0]] != [t for t, _ in result["expected"][1]]  # the update mattered
