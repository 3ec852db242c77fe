"""Multi-turn environments: tool calls parsed, run in a limited process (errors, hangs and floods come back as
observations), environment turns appended to engine sessions as template tokens, limits on turns and tokens."""

from __future__ import annotations

import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.config.errors import ConfigError
from lmforge.data.templates import end_of_turn_ids, render_prompt
from lmforge.generation import Engine, Sampling
from lmforge.losses.rl import gather_logps
from lmforge.rollout.environments import (
    UNREADABLE,
    ToolEnvironment,
    checked_reset,
    checked_step,
    load_environment,
    tool_calls,
)
from lmforge.rollout.multiturn import Limits, continuation_ids, play
from lmforge.rollout.tools_sandbox import ToolLimits, run_tool

TOOLS = textwrap.dedent("""
    import time

    def add(a, b):
        return a + b

    def boom(x):
        raise ValueError(f"cannot take {x}")

    def hang():
        while True:
            pass

    def flood():
        print("x" * 5_000_000)
        return "flooded"

    def hog():
        return len(bytearray(4 * 1024 ** 3))

    def fetch():
        import urllib.request
        return urllib.request.urlopen("http://127.0.0.1:9").read()

    def leave():
        raise SystemExit(3)

    def nap():
        time.sleep(60)

    def odd_signal():
        import os
        os.kill(os.getpid(), 40)  # a real-time signal: no name in Python's signal enum

    def scribble():
        with open("result.json", "w") as f:  # the child's own result file, by its name in the working folder
            f.write("[" + " " * 200 + "]")
        return 1
""")
LIMITS = ToolLimits(seconds=1.5, memory_mb=256, output_chars=200)


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "my_tools.py"
    path.write_text(TOOLS)
    return path


def test_tool_calls_by_the_servers_rule_and_unreadable_ones():
    assert tool_calls("The answer is 4.") is None
    reply = 'Let me add.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' \
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
    assert tool_calls(reply) == [{"name": "add", "arguments": {"a": 1, "b": 2}},
                                 {"name": "add", "arguments": {"a": 3, "b": 4}}]
    for broken in ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>',  # bad JSON
                   '<tool_call>{"name": "add", "arguments": {}}</tool_call> and then some text',
                   '<tool_call>{"name": "add", "argum'):  # cut by the token limit
        assert tool_calls(broken) == [], broken


@pytest.mark.parametrize("function, kind, text", [
    ("add", "ok", "5"),
    ("boom", "error", "error: ValueError: cannot take 2"),
    ("hang", "timeout", "did not finish within 1.5 s"),
    ("flood", "ok", "flooded\n[printed]\n" + "x" * 200 + "\n[... 4999801 more characters cut]"),
    ("hog", "memory", "ran out of memory (limit 256 MB)"),
    ("fetch", "error", "network access is disabled for tools"),
    ("leave", "error", "SystemExit: 3"),
    ("nap", "timeout", "did not finish within 1.5 s"),
    ("odd_signal", "crashed", "was killed (signal 40)"),
    ("scribble", "ok", "1"),
])
def test_a_tool_runs_in_a_limited_process_and_every_failure_is_an_observation(tools_file, function, kind, text):
    arguments = {"a": 2, "b": 3} if function == "add" else {"x": 2} if function == "boom" else {}
    outcome = run_tool(f"{tools_file}:{function}", arguments, LIMITS)
    assert outcome.kind == kind and text in outcome.text, outcome


def test_tool_environment_counts_bad_calls_as_finished_turns(tools_file):
    env = ToolEnvironment([f"{tools_file}:{name}" for name in ("add", "boom", "hang", "flood")], LIMITS,
                          call_reward=0.1)
    record = {"prompt": [{"role": "user", "content": "What is 20 + 22?"}], "answer": "42", "reference": ""}
    assert env.reset(record) == record["prompt"]
    calls = "".join(f'<tool_call>{{"name": "{n}", "arguments": {a}}}</tool_call>'
                    for n, a in [("boom", '{"x": 1}'), ("hang", "{}"), ("flood", "{}"), ("nope", "{}"),
                                 ("add", '{"a": 20, "b": 22}')])
    messages, reward, done = checked_step(env, calls)
    assert not done and len(messages) == 5 and all(m["role"] == "tool" for m in messages)
    assert [o.kind for o in env.outcomes] == ["error", "timeout", "ok", "error", "ok"]
    assert "no tool named 'nope'" in messages[3]["content"] and messages[4]["content"] == "42"
    assert len(messages[2]["content"]) < 400 and reward == pytest.approx(0.2)  # two calls ran cleanly
    unreadable, reward, done = checked_step(env, calls + "<tool_call>not json</tool_call>")
    assert unreadable == [{"role": "tool", "content": UNREADABLE}] and (reward, done) == (0.0, False)
    assert env.outcomes[-1].kind == "error" and len(env.outcomes) == 6  # counted, and the episode goes on
    assert checked_step(env, "It is 42.") == ([], 1.0, True)
    env.reset(record)
    assert checked_step(env, "It is 41.") == ([], 0.0, True)


def test_load_environment_names_the_key_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="rl.environment=tools needs rl.tools"):
        load_environment("tools")
    with pytest.raises(ConfigError, match=r"rl.environment='nothing': give package.module:Class"):
        load_environment("nothing")
    with pytest.raises(ConfigError, match=r"rl.environment: cannot load 'no_such_module_x:Env' \(ModuleNotFound"):
        load_environment("no_such_module_x:Env")
    path = tmp_path / "envs.py"
    path.write_text("class Half:\n    def reset(self, record):\n        return []\n"
                    "class Bad:\n    def reset(self, record):\n        return []\n    def step(self, reply):\n"
                    "        return 'no'\n")
    with pytest.raises(ConfigError, match="has no step method"):
        load_environment(f"{path}:Half")
    with pytest.raises(ConfigError, match=r"rl.environment: Bad.step must return \(messages, reward, done\)"):
        checked_step(load_environment(f"{path}:Bad")(), "hi")
    path.write_text("class Raises:\n    def reset(self, record):\n        return record['missing']\n"
                    "    def step(self, reply):\n        return [], float('nan'), True\n")
    env = load_environment(f"{path}:Raises")()
    with pytest.raises(ConfigError, match=rf"Raises.reset raised KeyError: 'missing' \({path}:3\)"):
        checked_reset(env, {"prompt": []})
    with pytest.raises(ConfigError, match="Raises.step returned reward nan: must be a finite number"):
        checked_step(env, "hi")


# ---------------------------------------------------------------- sessions on the engine


class Countdown:
    """Answers every reply with a user turn 'again <k>' and reward 1, done after `turns` steps."""

    def __init__(self, turns: int = 2):
        self.turns, self.seen = turns, []

    def reset(self, record):
        self.seen = []
        return list(record["prompt"])

    def step(self, reply):
        self.seen.append(reply)
        left = self.turns - len(self.seen)
        return ([{"role": "user", "content": f"again {left}"}] if left else []), 1.0, left == 0


def test_continuation_is_the_template_text_between_turns(world_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(world_tokenizer_dir)
    history = [{"role": "user", "content": "What is 2 + 3?"}]
    new = [{"role": "tool", "content": "5"}]
    reply = "It is 5."
    whole = render_prompt(tok, [*history, {"role": "assistant", "content": reply}, *new])
    upto_reply = render_prompt(tok, history) + reply + tok.convert_ids_to_tokens(end_of_turn_ids(tok)[0])
    assert whole.startswith(upto_reply)
    assert tok.decode(continuation_ids(tok, history, new)) == whole[len(upto_reply):]


@pytest.fixture(scope="module")
def policy(base):
    model = AutoModelForCausalLM.from_pretrained(base)
    return model.eval(), AutoTokenizer.from_pretrained(base)


def _engine(model, tok, max_len=160):
    return Engine(model, slots=8, max_len=max_len, eos_ids=end_of_turn_ids(tok), backend="hf")


def test_trajectory_is_one_token_stream_and_only_model_tokens_carry_loss(policy):
    model, tok = policy
    records = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}]},
               {"prompt": [{"role": "user", "content": "Where is Fusovel?"}]}]
    torch.manual_seed(0)
    out = play(_engine(model, tok), tok, lambda: Countdown(2), records, Sampling(temperature=1.0),
               Limits(max_new_tokens=12, max_turns=4, max_total_tokens=100), n=2, logprobs=True)
    assert out.response_ids.shape[0] == 4 and torch.equal(out.prompt_ids[0], out.prompt_ids[1])
    inputs = out.model_inputs()
    with torch.no_grad():
        logits = model(**inputs).logits[:, out.prompt_ids.shape[1] - 1:-1].float()
    forced = gather_logps(logits, out.response_ids)
    two_turns = 0
    for i in range(4):
        mask, attention = out.response_mask[i].bool(), out.reply_attention[i].bool()
        n = int(attention.sum())
        assert attention[:n].all() and not attention[n:].any()
        turns = [m for m in out.transcripts[i] if m["role"] == "assistant"]
        # Every turn is scored (reward 1), also one cut at max_new_tokens, which ends the trajectory.
        assert out.rewards[i] == [1.0] * len(turns)
        if len(turns) == 2:  # the environment's 'again 1' turn sits between the model's: a hole in the mask
            two_turns += 1
            assert out.transcripts[i][1] == {"role": "user", "content": "again 1"}
            env = (~mask[:n]).nonzero().flatten()
            assert len(env) and "again 1" in tok.decode(out.response_ids[i, env])
        # The engine's log-probs on the model's tokens equal a forward pass over the whole stream: the cache
        # held exactly the prompt, the replies and the environment's tokens.
        assert torch.allclose(out.logps[i][mask], forced[i][mask], atol=1e-4)
        assert (out.logps[i][~mask] == 0).all()
    assert two_turns >= 1  # seeded: the branch above is exercised


def test_limits_on_turns_and_total_tokens(policy):
    model, tok = policy
    records = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}]}]
    out = play(_engine(model, tok), tok, lambda: Countdown(50), records, Sampling(temperature=0.0),
               Limits(max_new_tokens=12, max_turns=3, max_total_tokens=1000), n=1)
    turns = [m for m in out.transcripts[0] if m["role"] == "assistant"]
    assert len(turns) <= 3 and (len(turns) == 3 or not out.stopped[0])
    out = play(_engine(model, tok), tok, lambda: Countdown(50), records, Sampling(temperature=0.0),
               Limits(max_new_tokens=12, max_turns=50, max_total_tokens=40), n=1)
    assert out.reply_attention[0].sum() <= 40


def test_a_reset_that_differs_within_a_group_is_refused(policy):
    model, tok = policy

    class Moody(Countdown):
        count = 0

        def reset(self, record):
            Moody.count += 1
            return [{"role": "user", "content": f"hi {Moody.count}"}]

    with pytest.raises(ConfigError, match="Moody.reset gave different messages for the same record"):
        play(_engine(model, tok), tok, Moody, [{"prompt": []}], Sampling(), Limits(8, 2, 50), n=2)


# ---------------------------------------------------------------- through the online loop

ENVS = textwrap.dedent("""
    import re

    from lmforge.rollout.environments import ToolEnvironment

    CALLS = "".join('<tool_call>{"name": "%s", "arguments": {%s}}</tool_call>' % c
                    for c in [("boom", '"x": 1'), ("hang", ""), ("nap", ""), ("flood", ""), ("add", '"a": 1, "b": 2')])


    class BadTools(ToolEnvironment):
        '''Whatever the model says, its first turn calls a raising, a spinning, a sleeping, a flooding and a good
        tool.'''

        def __init__(self, **kwargs):
            super().__init__([f"{TOOLS}:{name}" for name in ("add", "boom", "hang", "nap", "flood")], **kwargs)
            self.schemas = None  # the tiny model's positions cannot hold the schemas' system turn

        def step(self, reply):
            if not self.outcomes:
                return super().step(CALLS)
            return [], float(len(reply) % 2), True


    class Digits:
        '''Two turns; each pays 1 when the reply starts with a digit.'''

        def reset(self, record):
            self.turn = 0
            return list(record["prompt"])

        def step(self, reply):
            self.turn += 1
            reward = float(bool(re.match(r"\\s*\\d", reply)))
            return ([{"role": "user", "content": "And again?"}] if self.turn < 2 else []), reward, self.turn >= 2
""")


def _rl_run(base, world_dir, out, *extra):
    import json

    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    cfg = load_config(None, [
        f"model.name_or_path={base}", f"data.train={world_dir}/rl/arith_train.jsonl",
        f"data.eval={world_dir}/rl/arith_eval.jsonl", "data.max_length=96", "rl.max_new_tokens=8",
        "rl.kl_coef=0.0", "rl.ppo_epochs=1", "train.batch_size=16", "train.logging_steps=1",
        f"train.output_dir={out}", "log.progress=false", "log.report_to=[]", *extra], stage="grpo")
    metrics = STAGE_RUNNERS["grpo"](cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, [r for r in rows if "iteration" in r]


def test_a_run_whose_tools_raise_hang_and_flood_finishes_with_those_calls_counted(base, world_dir, tools_file,
                                                                                    tmp_path):
    envs = tmp_path / "envs.py"
    envs.write_text(f"TOOLS = {str(tools_file)!r}\n" + ENVS)
    metrics, rows = _rl_run(base, world_dir, tmp_path / "run", f"rl.environment={envs}:BadTools",
                            "rl.prompts_per_step=2", "rl.num_generations=2", "rl.eval_prompts=2", "rl.max_turns=3",
                            "rl.max_total_tokens=400", "rl.tool_timeout=1.0", "rl.tool_output_chars=100",
                            "train.max_steps=2", "train.lr=1e-3")
    for row in rows:  # 4 trajectories; those whose first turn ended (stopped) made the 5 calls
        calls = {k: row[f"tool_calls/{k}"] for k in ("ok", "error", "timeout")}
        assert calls["error"] == calls["timeout"] / 2 == calls["ok"] / 2 and calls["ok"] % 2 == 0
        assert row["reward/environment"] == row["env_reward"] and 1.0 <= row["turns"] <= 3.0
    assert sum(row["tool_calls/timeout"] for row in rows) >= 1  # the hang was really exercised
    assert "eval_reward" in metrics and "eval_tool_calls/timeout" in metrics


def test_grpo_learns_over_two_turns_where_only_model_tokens_train(base, world_dir, tmp_path):
    envs = tmp_path / "envs.py"
    envs.write_text("TOOLS = ''\n" + ENVS)
    metrics, rows = _rl_run(base, world_dir, tmp_path / "run", f"rl.environment={envs}:Digits",
                            "rl.prompts_per_step=8", "rl.num_generations=8", "rl.eval_prompts=16", "rl.max_turns=2",
                            "rl.max_total_tokens=64", "train.max_steps=16", "train.lr=3e-3")
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (rows[:4], rows[-8:]))
    assert last > first + 0.15, (first, last)  # replies start with a digit more often (seeded: 0.18 -> 0.38)
    assert metrics["eval_reward"] > metrics["initial_eval_reward"] + 0.3
    assert all(r["reply_tokens"] == pytest.approx(64 * r["length"]) for r in rows)  # model tokens only


def test_ppo_advantages_run_over_the_model_tokens_and_skip_the_environments():
    from lmforge.config.schema import RLConfig
    from lmforge.losses.rl import gae, masked_whiten
    from lmforge.stages.ppo import ppo_advantages, token_rewards

    cfg = RLConfig(gamma=0.9, lam=0.8)
    # Row 0: model, model, environment, environment, model; row 1: a single-turn reply of 2 tokens.
    mask = torch.tensor([[1.0, 1, 0, 0, 1], [1, 1, 0, 0, 0]])
    values = torch.tensor([[0.5, -0.2, 9.0, 9.0, 0.3], [0.1, 0.4, 9.0, 9.0, 9.0]])
    batch = {"mask": mask, "old_values": values * mask, "scores": torch.tensor([1.0, -1.0])}
    advantages, returns, _ = ppo_advantages(batch, cfg, kl_coef=0.0)
    # By hand: the same GAE over the packed model tokens [0.5, -0.2, 0.3] and [0.1, 0.4].
    packed_mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    packed_values = torch.tensor([[0.5, -0.2, 0.3], [0.1, 0.4, 0.0]])
    expected, expected_returns = gae(token_rewards(batch["scores"], packed_mask, None, 0.0), packed_values,
                                     packed_mask, 0.9, 0.8)
    expected = masked_whiten(expected, packed_mask)
    assert torch.allclose(advantages[0, [0, 1, 4]], expected[0]) and (advantages[0, 2:4] == 0).all()
    assert torch.allclose(advantages[1, :2], expected[1, :2]) and (advantages[1, 2:] == 0).all()
    assert torch.allclose(returns[0, [0, 1, 4]], expected_returns[0]) and returns[0, 2] == 0
    # A prefix mask (every single-turn rollout) gives exactly what GAE on the reply gives.
    single = {"mask": mask[1:], "old_values": (values * mask)[1:], "scores": torch.tensor([-1.0])}
    plain, _ = gae(token_rewards(single["scores"], mask[1:], None, 0.0), single["old_values"], mask[1:], 0.9, 0.8)
    assert torch.equal(ppo_advantages(single, cfg, 0.0)[0], masked_whiten(plain, mask[1:]))


def test_ppo_with_an_environment_and_a_shared_critic(base, world_dir, tmp_path):
    import json

    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    envs = tmp_path / "envs.py"
    envs.write_text("TOOLS = ''\n" + ENVS)
    out = tmp_path / "ppo"
    cfg = load_config(None, [
        f"model.name_or_path={base}", f"data.train={world_dir}/rl/arith_train.jsonl", "data.max_length=96",
        f"rl.environment={envs}:Digits", "rl.critic=shared", "rl.max_new_tokens=8", "rl.max_turns=2",
        "rl.max_total_tokens=64", "rl.prompts_per_step=4", "rl.eval_prompts=0", "train.max_steps=2",
        "train.lr=1e-4", "train.batch_size=8", "train.logging_steps=1", f"train.output_dir={out}",
        "log.progress=false", "log.report_to=[]"], stage="ppo")
    STAGE_RUNNERS["ppo"](cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "iteration" in r]
    assert len(rows) == 2 and all("explained_variance" in r and r["turns"] >= 1.0 for r in rows)


def test_an_environment_is_the_reward_and_tools_need_functions():
    from lmforge.config.load import load_config

    base = ["model.scratch=test", "rl.num_generations=2"]
    with pytest.raises(ConfigError, match="rl.environment=tools needs rl.tools"):
        load_config(None, [*base, "rl.environment=tools"], stage="grpo")
    with pytest.raises(ConfigError, match="a reward of kind environment needs rl.environment"):
        load_config(None, [*base, "rl.rewards=[{kind: environment}]"], stage="grpo")
    cfg = load_config(None, [*base, "rl.environment=x:Y"], stage="grpo")
    assert [s.kind for s in cfg.rl.reward_specs()] == ["environment"]  # the environment is the reward


def test_a_group_larger_than_the_engines_rows_is_refused_not_left_waiting(policy):
    model, tok = policy
    engine = Engine(model, slots=2, max_len=64, eos_ids=end_of_turn_ids(tok), backend="hf")
    records = [{"prompt": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ConfigError, match="rl.num_generations=4 needs 4 cache rows at once, but the rollout engine "
                                          "holds 2"):
        play(engine, tok, Countdown, records, Sampling(), Limits(8, 2, 32), n=4)
