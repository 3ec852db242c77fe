"""`lmforge export`: a merged, plain Hugging Face folder that transformers alone loads with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lmforge.cli import main
from lmforge.config.load import load_config
from lmforge.stages import STAGE_RUNNERS

IDS = [[5, 6, 7, 8, 9, 10, 11]]
FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert not any(name.startswith(("lmforge", "peft")) for name in sys.modules), "needs only transformers"
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"dtype": str(next(model.parameters()).dtype), "logits": logits.float().tolist()}))
"""


@pytest.fixture(scope="module")
def adapter(base, world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_sft")
    cfg = load_config(None, [f"model.name_or_path={base}", "model.finetuning=lora", "lora.r=4",
                             f"data.train={world_dir}/sft/train.jsonl", "data.eval_split=0", "data.max_length=96",
                             "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2", f"train.output_dir={out}",
                             "log.progress=false", "log.report_to=[]"], stage="sft")
    STAGE_RUNNERS["sft"](cfg)
    return out


def fresh_logits(folder) -> dict:
    done = subprocess.run([sys.executable, "-c", FRESH, str(folder), json.dumps(IDS)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_export_merges_the_adapter_and_loads_with_transformers_alone(base, adapter, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", str(adapter), "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert json.loads((out / "lmforge_source.json").read_text())["stage"] == "sft"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"]  # stops at the end of a turn

    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(
            input_ids=torch.tensor(IDS)).logits
        plain_base = AutoModelForCausalLM.from_pretrained(base)(input_ids=torch.tensor(IDS)).logits
    got = torch.tensor(fresh_logits(out)["logits"])
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, plain_base, atol=1e-3)  # the adapter's change is in the weights


def test_export_casts_shards_and_never_overwrites(adapter, tmp_path):
    out = tmp_path / "bf16"
    assert main(["export", str(adapter), "--out", str(out), "--dtype", "bf16", "--max-shard-size", "100KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert fresh_logits(out)["dtype"] == "torch.bfloat16"
    assert main(["export", str(adapter), "--out", str(out)]) == 2  # not empty: refused, nothing touched
    assert len(list(out.glob("model-*.safetensors"))) > 1


GGUF_READ = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, name, text = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
ids = tokenizer(text, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits
print(json.dumps({"ids": ids, "logits": logits.tolist()}))
"""


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 1e-6)])
def test_gguf_export_reads_back_with_the_same_tokens_and_logits(adapter, tmp_path, dtype, tolerance):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    out = tmp_path / f"gguf-{dtype}"
    assert main(["export", str(adapter), "--out", str(out), "--gguf", "--dtype", dtype]) == 0
    name = "model-f32.gguf" if dtype == "fp32" else "model-bf16.gguf"
    assert (out / name).is_file() and not list(out.glob("*.partial"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3? 你好"}], tokenize=False,
                                         add_generation_prompt=True)
    done = subprocess.run([sys.executable, "-c", GGUF_READ, str(out), name, text], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    back = json.loads(done.stdout.strip().splitlines()[-1])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert back["ids"] == ids  # special tokens whole, byte-level pieces the same
    field = GGUFReader(out / name).fields["tokenizer.chat_template"]  # what llama.cpp and Ollama read
    assert bytes(field.parts[field.data[0]]).decode() == tokenizer.chat_template
    with torch.no_grad():  # the exported HF folder in the same dtype, upcast like the GGUF reader does
        expected = AutoModelForCausalLM.from_pretrained(out).float()(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(torch.tensor(back["logits"]), expected, atol=tolerance)


def test_gguf_export_refuses_other_architectures(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.config.errors import ConfigError
    from lmforge.models.gguf_export import write_gguf

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="GGUF export supports LlamaForCausalLM; this model is GPT2LMHeadModel"):
        write_gguf(model, None, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def _string(reader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def _tokens(reader) -> list[str]:
    field = reader.fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode() for i in field.data]


def _number(reader, key: str) -> int:
    field = reader.fields[key]
    return int(field.parts[field.data[0]][0])


def test_gguf_export_carries_the_source_gguf_identity(base, world_dir, tmp_path, monkeypatch):
    """A model that came from a GGUF (as SmolLM2 does, with tokenizer.ggml.pre = "smollm") keeps that
    identity through SFT and export: llama.cpp picks its pre-tokenizer rules by that name."""
    import gguf
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.models.gguf_export import write_gguf

    source = tmp_path / "source" / "tiny-src.gguf"
    source.parent.mkdir()
    real_pre = gguf.GGUFWriter.add_tokenizer_pre
    with monkeypatch.context() as patch:  # as llama.cpp's converter names SmolLM2's rules
        patch.setattr(gguf.GGUFWriter, "add_tokenizer_pre", lambda self, _: real_pre(self, "smollm"))
        write_gguf(AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), source, name="src")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    trained = tmp_path / "sft"
    cfg = load_config(None, [f"model.name_or_path={source.parent}", f"model.gguf_file={source.name}",
                             "model.finetuning=lora", "lora.r=4",
                             f"data.train={world_dir}/sft/train.jsonl", "data.eval_split=0", "data.max_length=64",
                             "train.max_steps=2", "train.batch_size=2", f"train.output_dir={trained}",
                             "log.progress=false", "log.report_to=[]"], stage="sft")
    STAGE_RUNNERS["sft"](cfg)
    out = tmp_path / "tiny-chat"
    assert main(["export", str(trained), "--out", str(out), "--gguf"]) == 0
    exported, original = GGUFReader(out / "model-f32.gguf"), GGUFReader(source)
    assert _string(exported, "general.name") == "tiny-chat"  # not "tiny-chat.partial"
    assert _string(exported, "tokenizer.ggml.pre") == "smollm"
    assert _tokens(exported) == _tokens(original)
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if key in original.fields:
            assert _number(exported, key) == _number(original, key), key
    assert _string(exported, "tokenizer.chat_template") == AutoTokenizer.from_pretrained(trained).chat_template


def test_gguf_export_of_a_changed_vocabulary_describes_itself(adapter, tmp_path):
    """No GGUF behind the weights (or a vocabulary that is no longer the source's): the identity comes from
    the tokenizer itself, a plain byte-level BPE being GPT-2's rules."""
    from gguf import GGUFReader

    from lmforge.models.gguf_export import source_identity

    out = tmp_path / "plain"
    assert main(["export", str(adapter), "--out", str(out), "--gguf"]) == 0
    reader = GGUFReader(out / "model-f32.gguf")
    assert _string(reader, "general.name") == "plain" and _string(reader, "tokenizer.ggml.pre") == "gpt2"
    tokens = _tokens(reader)
    assert source_identity(out / "model-f32.gguf", tokens)["tokenizer.ggml.pre"] == "gpt2"
    assert source_identity(out / "model-f32.gguf", ["x", *tokens[1:]]) == {}  # another vocabulary: nothing kept
