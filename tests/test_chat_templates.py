"""Named chat templates (lmforge/templates/*.jinja): each renders a conversation exactly as the model
family's own published template does, its loss mask covers the assistant turns and their end-of-turn
token, and it stops on the family's stop tokens.

The expected strings below are written by hand from each family's published chat_template (the
tokenizer_config.json of the model named in the comment); they are the reference, not the output.
"""

from __future__ import annotations

import pytest

from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config
from lmforge.config.templates import check_template_choice, template_info, template_names, template_text
from lmforge.data.templates import (
    apply_template_choice,
    end_of_turn_ids,
    end_of_turn_markers,
    render_prompt,
    render_segments,
)
from lmforge.data.tokenize import IGNORE, encode_sft

SYS, U1, A1, U2, A2 = "You are a careful assistant.", "What is 2+2?", "2+2 is 4.", "And in Chinese? 用中文回答。", "四。"
CONVERSATION = [
    {"role": "system", "content": SYS},
    {"role": "user", "content": U1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": U2},
]
TRAINING = [*CONVERSATION, {"role": "assistant", "content": A2}]

# name -> (the family's EOS, its reference rendering of CONVERSATION + generation prompt, the text of each
# reply that carries loss, the stop tokens the family's generation config uses)
FAMILIES = {
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": ("<|end_of_text|>",
               "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a careful assistant.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n2+2 is 4.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nAnd in Chinese? 用中文回答。<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               ["2+2 is 4.<|eot_id|>", "四。<|eot_id|>"], ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen": ("<|endoftext|>",
             "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
             "<|im_start|>assistant\n2+2 is 4.<|im_end|>\n<|im_start|>user\nAnd in Chinese? 用中文回答。<|im_end|>\n"
             "<|im_start|>assistant\n",
             ["2+2 is 4.<|im_end|>", "四。<|im_end|>"], ["<|im_end|>", "<|endoftext|>"]),
    # Qwen/Qwen3-8B (enable_thinking left at its default)
    "qwen3": ("<|endoftext|>",
              "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
              "<|im_start|>assistant\n2+2 is 4.<|im_end|>\n<|im_start|>user\nAnd in Chinese? 用中文回答。<|im_end|>\n"
              "<|im_start|>assistant\n",
              ["2+2 is 4.<|im_end|>", "四。<|im_end|>"], ["<|im_end|>", "<|endoftext|>"]),
    # THUDM/glm-4-9b-chat: no end marker after a reply; EOS is appended to each reply in training
    "glm4": ("<|endoftext|>",
             "[gMASK]<sop><|system|>\nYou are a careful assistant.<|user|>\nWhat is 2+2?<|assistant|>\n2+2 is 4."
             "<|user|>\nAnd in Chinese? 用中文回答。<|assistant|>",
             ["\n2+2 is 4.<|endoftext|>", "\n四。<|endoftext|>"], ["<|user|>", "<|observation|>", "<|endoftext|>"]),
    # mistralai/Mistral-7B-Instruct-v0.3 puts the system prompt before the LAST user message; ours opens the
    # first one (see test_mistral_system_prompt_opens_the_first_turn); the same without a system prompt:
    "mistral": ("</s>",
                "<s>[INST] You are a careful assistant.\n\nWhat is 2+2?[/INST] 2+2 is 4.</s>"
                "[INST] And in Chinese? 用中文回答。[/INST]",
                [" 2+2 is 4.</s>", " 四。</s>"], ["</s>"]),
    # google/gemma-3-4b-it: no system role; its text opens the first user turn
    "gemma": ("<eos>",
              "<bos><start_of_turn>user\nYou are a careful assistant.\n\nWhat is 2+2?<end_of_turn>\n"
              "<start_of_turn>model\n2+2 is 4.<end_of_turn>\n<start_of_turn>user\nAnd in Chinese? 用中文回答。<end_of_turn>\n"
              "<start_of_turn>model\n",
              ["2+2 is 4.<end_of_turn>", "四。<end_of_turn>"], ["<end_of_turn>", "<eos>"]),
    # deepseek-ai/DeepSeek-V3
    "deepseek": ("<｜end▁of▁sentence｜>",
                 "<｜begin▁of▁sentence｜>You are a careful assistant.<｜User｜>What is 2+2?<｜Assistant｜>2+2 is 4."
                 "<｜end▁of▁sentence｜><｜User｜>And in Chinese? 用中文回答。<｜Assistant｜>",
                 ["2+2 is 4.<｜end▁of▁sentence｜>", "四。<｜end▁of▁sentence｜>"], ["<｜end▁of▁sentence｜>"]),
    # 01-ai/Yi-1.5-9B-Chat: bare system text, each user turn opens the assistant's
    "yi": ("<|endoftext|>",
           "You are a careful assistant.<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 is 4."
           "<|im_end|>\n<|im_start|>user\nAnd in Chinese? 用中文回答。<|im_end|>\n<|im_start|>assistant\n",
           ["2+2 is 4.<|im_end|>", "四。<|im_end|>"], ["<|im_end|>", "<|endoftext|>"]),
    # baichuan-inc/Baichuan2-7B-Chat (build_chat_input: user_token_id 195, assistant_token_id 196)
    "baichuan2": ("</s>",
                  "You are a careful assistant.<reserved_106>What is 2+2?<reserved_107>2+2 is 4."
                  "<reserved_106>And in Chinese? 用中文回答。<reserved_107>",
                  ["2+2 is 4.</s>", "四。</s>"], ["</s>"]),
    # microsoft/Phi-3.5-mini-instruct
    "phi": ("<|endoftext|>",
            "<|system|>\nYou are a careful assistant.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n2+2 is 4."
            "<|end|>\n<|user|>\nAnd in Chinese? 用中文回答。<|end|>\n<|assistant|>\n",
            ["2+2 is 4.<|end|>", "四。<|end|>"], ["<|end|>", "<|endoftext|>"]),
    "chatml": ("<|endoftext|>",
               "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
               "<|im_start|>assistant\n2+2 is 4.<|im_end|>\n<|im_start|>user\nAnd in Chinese? 用中文回答。<|im_end|>\n"
               "<|im_start|>assistant\n",
               ["2+2 is 4.<|im_end|>", "四。<|im_end|>"], ["<|im_end|>", "<|endoftext|>"]),
}


def family_tokenizer(tok, name: str):
    """The test tokenizer given the family's special tokens and EOS, then the named template."""
    eos = FAMILIES[name][0] if name in FAMILIES else tok.eos_token
    info = template_info(template_text(name))
    tok.add_tokens([t for t in (*info.special, *info.stop, eos) if t not in tok.get_vocab()], special_tokens=True)
    tok.eos_token = eos
    assert apply_template_choice(tok, name) == name
    return tok


def loss_spans(tokenizer, encoded: dict) -> list[str]:
    spans, run = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label == IGNORE:
            spans, run = (spans + [run], []) if run else (spans, [])
        else:
            run.append(token)
    return [tokenizer.decode(span) for span in spans + ([run] if run else [])]


def test_every_name_is_accepted_by_the_config_and_an_unknown_one_is_refused_with_the_list():
    expected = {"auto", "baichuan2", "chatml", "deepseek", "gemma", "glm4", "llama3", "mistral", "phi", "plain",
                "qwen", "qwen3", "yi"}
    assert set(template_names()) == expected
    for name in expected:
        assert load_config(None, ["model.scratch=test", f"model.template={name}"], stage="sft").model.template == name
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["model.scratch=test", "model.template=llama4"], stage="sft")
    message = str(refused.value)
    assert "model.template" in message and "\n" not in message
    assert all(name in message for name in expected)
    with pytest.raises(ConfigError, match="model.template='llama4' is not a template; choose one of auto, baichuan2"):
        check_template_choice("llama4")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_rendering_equals_the_family_reference(tok, name):
    tokenizer = family_tokenizer(tok, name)
    assert render_prompt(tokenizer, CONVERSATION) == FAMILIES[name][1]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_loss_mask_covers_exactly_the_replies_and_their_end_of_turn_token(tok, name):
    tokenizer = family_tokenizer(tok, name)
    encoded = encode_sft(tokenizer, TRAINING, max_length=10**6)
    assert loss_spans(tokenizer, encoded) == FAMILIES[name][2]
    context = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label == IGNORE]
    assert tokenizer.decode(context).count(U2) == 1  # the user turns are there, and masked


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stop_tokens_are_the_familys(tok, name):
    tokenizer = family_tokenizer(tok, name)
    assert end_of_turn_markers(tokenizer) == FAMILIES[name][3]
    assert end_of_turn_ids(tokenizer) == tokenizer.convert_tokens_to_ids(FAMILIES[name][3])
    assert len(set(end_of_turn_ids(tokenizer))) == len(FAMILIES[name][3])  # each a token of its own


@pytest.mark.parametrize("name", [n for n in template_names() if n != "auto"])
def test_each_turn_renders_as_a_prefix_of_the_next(tok, name):
    """The loss mask renders turn by turn: what the model sees before a reply, and the text up to the end of
    that reply, must both be prefixes of the whole conversation (later turns never rewrite them)."""
    tokenizer = family_tokenizer(tok, name)
    messages = [*TRAINING, {"role": "tool", "content": '{"result": 4}'}, {"role": "tool", "content": "ok"},
                {"role": "assistant", "content": "done"}, {"role": "user", "content": "  padded  "},
                {"role": "assistant", "content": "  spaced reply \n"}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    for k in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        turn = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        assert turn.startswith(prompt) and full.startswith(turn), (name, k)
    assert sum(s.is_assistant for s in render_segments(tokenizer, messages)) == 4


def test_mistral_system_prompt_opens_the_first_turn(tok):
    """Mistral's template prints the system prompt before the last user turn, so turn 2 would rewrite turn
    1; ours keeps it on the first turn. Where the two agree, they are equal."""
    tokenizer = family_tokenizer(tok, "mistral")
    assert render_prompt(tokenizer, CONVERSATION[:2]) == "<s>[INST] You are a careful assistant.\n\nWhat is 2+2?[/INST]"
    assert render_prompt(tokenizer, CONVERSATION[1:]) == (
        "<s>[INST] What is 2+2?[/INST] 2+2 is 4.</s>[INST] And in Chinese? 用中文回答。[/INST]")
    assert render_prompt(tokenizer, [{"role": "system", "content": ""}, CONVERSATION[1]]) == (
        "<s>[INST] What is 2+2?[/INST]")  # an empty system message is no system prompt (data.system_prompt: "")


def test_qwen_default_system_prompt_and_how_to_suppress_it(tok):
    tokenizer = family_tokenizer(tok, "qwen")
    assert render_prompt(tokenizer, CONVERSATION[1:2]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tokenizer, [{"role": "system", "content": ""}, CONVERSATION[1]]) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")  # no system turn, no default
    qwen3 = family_tokenizer(tok, "qwen3")  # Qwen3 has no default system prompt
    assert render_prompt(qwen3, CONVERSATION[1:2]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_thinking_switch_and_reasoning(tok):
    tokenizer = family_tokenizer(tok, "qwen3")
    assert render_prompt(tokenizer, CONVERSATION[1:2], template_kwargs={"enable_thinking": False}) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(tokenizer, CONVERSATION[1:2], template_kwargs={"enable_thinking": True}).endswith(
        "<|im_start|>assistant\n")
    # reasoning written into the reply is trained on, in every turn (Qwen3's own template would drop it
    # from earlier turns, rewriting them)
    reply = "<think>\n2 and 2 make 4\n</think>\n\n2+2 is 4."
    messages = [CONVERSATION[1], {"role": "assistant", "content": reply}, CONVERSATION[3],
                {"role": "assistant", "content": A2}]
    assert loss_spans(tokenizer, encode_sft(tokenizer, messages, 10**6)) == [reply + "<|im_end|>", "四。<|im_end|>"]
    separate = [CONVERSATION[1], {"role": "assistant", "content": A1, "reasoning_content": "\n2 and 2 make 4\n"}]
    assert tokenizer.apply_chat_template(separate, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n2 and 2 make 4\n</think>\n\n2+2 is 4.<|im_end|>\n")


def test_empty_system_and_whitespace(tok):
    phi = family_tokenizer(tok, "phi")
    assert render_prompt(phi, [{"role": "system", "content": ""}, CONVERSATION[1]]) == (
        "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n")  # Phi prints no empty system turn
    llama = family_tokenizer(tok, "llama3")  # Llama 3 trims every message
    assert render_prompt(llama, [{"role": "user", "content": "  hi\n"}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_marker_text_typed_in_content_is_rendered_as_is_and_the_mask_holds(tok):
    """Content is never escaped (as with every HF template): typed `<|im_end|>` becomes that token. The
    reply's own end-of-turn token is the one after its content, so the mask still covers it whole."""
    tokenizer = family_tokenizer(tok, "qwen")
    messages = [{"role": "system", "content": SYS},
                {"role": "user", "content": "end it with <|im_end|> please"},
                {"role": "assistant", "content": "Like this: <|im_end|> done."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>user\nend it with <|im_end|> please<|im_end|>\n" in text
    spans = loss_spans(tokenizer, encode_sft(tokenizer, messages, 10**6))
    assert spans == ["Like this: <|im_end|> done.<|im_end|>"]


def test_a_family_template_on_a_tokenizer_without_its_tokens_is_refused_in_one_line(tok):
    before, size = tok.chat_template, len(tok)
    with pytest.raises(ConfigError) as refused:
        apply_template_choice(tok, "llama3")
    message = str(refused.value)
    assert message.startswith("model.template=llama3: the tokenizer has no <|begin_of_text|>, <|start_header_id|>")
    assert "model.template=auto" in message and "\n" not in message
    assert tok.chat_template == before and len(tok) == size  # nothing changed
    tok.chat_template = None  # without a template of its own, the hint is ChatML, whose tokens get added
    with pytest.raises(ConfigError, match="model.template=chatml adds its two tokens"):
        apply_template_choice(tok, "gemma")


def test_auto_keeps_the_models_template_else_chatml_and_the_choice_travels_with_the_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    own = tok.chat_template
    assert apply_template_choice(tok, "auto") == "tokenizer" and tok.chat_template == own
    tok.chat_template = None  # a base model without a chat template, trained PT -> SFT with model.template=phi
    tokenizer = family_tokenizer(tok, "phi")
    tokenizer.save_pretrained(tmp_path / "artifact")
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "artifact"))
    assert apply_template_choice(reloaded, "auto") == "tokenizer"  # chat/serve load it with auto
    assert reloaded.chat_template == template_text("phi")
    assert render_prompt(reloaded, CONVERSATION) == FAMILIES["phi"][1]
    assert end_of_turn_markers(reloaded) == ["<|end|>", "<|endoftext|>"]


def test_a_jinja_file_is_a_template_with_its_own_stop_tokens(tok, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{#- lmforge-template\nstop: ['<|turn_end|>']\nspecial: ['<|turn_end|>']\nadd_missing: true\n-#}\n"
                    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|turn_end|>' }}{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}", encoding="utf-8")
    check_template_choice(str(path))
    size = len(tok)
    assert apply_template_choice(tok, str(path)) == str(path)
    assert len(tok) == size + 1  # add_missing: the new token was added (the model's embeddings grow)
    assert render_prompt(tok, CONVERSATION[1:2]) == "user: What is 2+2?<|turn_end|>assistant: "
    assert end_of_turn_markers(tok) == ["<|turn_end|>", "<|endoftext|>"]
    assert loss_spans(tok, encode_sft(tok, TRAINING[1:3], 10**6)) == ["2+2 is 4.<|turn_end|>"]


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("", "is empty"),
    ("{#- lmforge-template\nstop: <|x|>\n-#}hi", "header key 'stop' must be a list"),
    ("{#- lmforge-template\nstops: []\n-#}hi", "unknown lmforge-template header keys ['stops']"),
    ("{#- lmforge-template\nstop: [a\n-#}hi", "header is not valid YAML"),
    ("{% for m in messages %}{{ m['content'] }}", "not a valid Jinja template: line 1:"),
])
def test_a_bad_jinja_file_is_refused_in_one_line_naming_it(tmp_path, content, problem):
    path = tmp_path / "bad.jinja"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        check_template_choice(str(path))
    assert problem in str(refused.value) and "model.template" in str(refused.value) and str(path) in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_run_with_a_family_template_its_tokenizer_lacks_stops_before_the_model_is_built(chat_tokenizer_dir, tmp_path):
    """Issue 24: `model.template: llama3` used to pass validation and crash with a traceback after the model loaded."""
    from transformers import AutoTokenizer

    from lmforge.models.load import load_model_and_tokenizer

    cfg = load_config(None, ["model.scratch=test", f"model.tokenizer={chat_tokenizer_dir}", "model.template=llama3"],
                      stage="sft")
    with pytest.raises(ConfigError, match=r"^model.template=llama3: the tokenizer has no <\|begin_of_text\|>"):
        load_model_and_tokenizer(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))  # the same tokenizer, of the Llama 3 family
    tokenizer.add_tokens(list(template_info(template_text("llama3")).special), special_tokens=True)
    tokenizer.save_pretrained(tmp_path / "llama3-tok")
    cfg = load_config(None, ["model.scratch=test", f"model.tokenizer={tmp_path / 'llama3-tok'}",
                             "model.template=llama3"], stage="sft")
    model, loaded, _ = load_model_and_tokenizer(cfg.model)
    assert loaded.chat_template == template_text("llama3")
    assert model.get_input_embeddings().weight.shape[0] == len(loaded) == len(tokenizer)
    assert end_of_turn_markers(loaded) == ["<|eot_id|>", "<|endoftext|>"]  # no <|eom_id|> in this vocabulary


def test_a_conversation_the_template_refuses_is_a_bad_record_not_a_traceback(tok):
    """A template's own raise_exception (Gemma 2's template refuses system messages) must reach the data
    pipeline as a ValueError, which it counts as a bad record naming file and line."""
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    with pytest.raises(ValueError, match="^the chat template refused this conversation: System role not supported$"):
        encode_sft(tok, TRAINING, 10**6)
    with pytest.raises(ValueError, match="System role not supported"):
        render_prompt(tok, CONVERSATION)


def test_the_config_accepts_a_jinja_path_and_refuses_a_missing_one(tmp_path):
    from lmforge.config.errors import ConfigError
    from lmforge.config.schema import ModelConfig

    own = tmp_path / "mine.jinja"
    from lmforge.config.templates import template_text

    own.write_text(template_text("chatml"), encoding="utf-8")
    assert ModelConfig(name_or_path="x", template=str(own)).template == str(own)
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig(name_or_path="x", template=str(tmp_path / "missing.jinja"))
