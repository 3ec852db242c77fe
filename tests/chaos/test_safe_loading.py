"""Safe loading (issue 10): a planted pickle — in a model folder, an adapter folder or a checkpoint — is never
unpickled; YAML that builds Python objects is refused; remote code runs only when the config asks.

Each payload is first shown to be live (loaded the unsafe way, it creates its marker file), so a test that
finds no marker proves lmforge refused it rather than that the payload was inert."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config
from lmforge.config.schema import ModelConfig
from lmforge.loop.checkpoint import CHECKSUMS, CheckpointError, LoopState, load_checkpoint, save_checkpoint
from lmforge.models.load import load_for_inference, load_model_and_tokenizer


class Planted:
    """Unpickling this calls open(marker, "w"): the marker file exists only if the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path, marker) -> None:
    torch.save({"model.embed_tokens.weight": Planted(marker)}, path)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PICKLE-RAN"


@pytest.fixture(scope="module")
def model_dir(chat_tokenizer_dir, tmp_path_factory):
    """A tiny Llama saved the ordinary way (safetensors) with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def copy_without_weights(model_dir, target):
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


def test_the_planted_pickle_is_live(tmp_path, marker):
    plant_pickle(tmp_path / "p.bin", marker)
    loaded = torch.load(tmp_path / "p.bin", weights_only=False)  # the unsafe way, on purpose
    loaded["model.embed_tokens.weight"].close()
    assert marker.is_file()


def test_model_folder_with_only_pickled_weights_is_refused_unread(model_dir, tmp_path, marker):
    folder = copy_without_weights(model_dir, tmp_path / "bin-only")
    plant_pickle(folder / "pytorch_model.bin", marker)
    for load in (lambda: load_model_and_tokenizer(ModelConfig(name_or_path=str(folder))),
                 lambda: load_for_inference(str(folder))):
        with pytest.raises(ConfigError) as info:
            load()
        message = str(info.value)
        assert str(folder) in message and "pytorch_model.bin" in message and "safetensors" in message
        assert not marker.exists()


def test_safetensors_are_loaded_and_a_planted_pickle_beside_them_is_ignored(model_dir, tmp_path, marker):
    folder = tmp_path / "both"
    shutil.copytree(model_dir, folder)
    plant_pickle(folder / "pytorch_model.bin", marker)
    plant_pickle(folder / "training_args.bin", marker)
    model, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    reference = LlamaForCausalLM.from_pretrained(model_dir)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert not marker.exists()


def test_adapter_with_pickled_weights_is_refused_unread(model_dir, tmp_path, marker):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(model_dir), "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    plant_pickle(adapter / "adapter_model.bin", marker)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, adapter / name)
    with pytest.raises(ConfigError, match=r"adapter_model\.bin.*never loads"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(adapter)))
    assert not marker.exists()


def test_folder_without_weights_says_so(model_dir, tmp_path):
    folder = copy_without_weights(model_dir, tmp_path / "none")
    with pytest.raises(ConfigError, match=r"no weights found \(\*\.safetensors\)"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "run", LoopState(step=1), model, optimizer, scheduler, keep=1)
    return path, model, optimizer, scheduler


def test_checkpoint_with_a_planted_optimizer_file_is_refused_by_its_checksum(tmp_path, marker):
    path, model, optimizer, scheduler = _checkpoint(tmp_path)
    plant_pickle(path / "optimizer.pt", marker)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is corrupted"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert not marker.exists()


def test_checkpoint_without_checksums_still_never_unpickles_objects(tmp_path, marker):
    """Checkpoints from before checksums are taken as they are: then torch.load(weights_only=True) refuses."""
    path, model, optimizer, scheduler = _checkpoint(tmp_path)
    (path / CHECKSUMS).unlink()
    plant_pickle(path / "optimizer.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match=r"(?s)Weights only load failed.*Unsupported global: GLOBAL io\.open"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert not marker.exists()


def test_yaml_python_tags_are_refused_naming_file_and_line(tmp_path, marker):
    payload = f"!!python/object/apply:builtins.open [{str(marker)!r}, w]"
    yaml.unsafe_load(payload).close()  # the unsafe loader runs it: the payload is live
    assert marker.is_file()
    marker.unlink()
    config = tmp_path / "run.yaml"
    config.write_text(f"stage: sft\ntrain:\n  lr: {payload}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert message.startswith(f"{config}: invalid YAML (line 3): ") and "python/object/apply:builtins.open" in message
    assert "safe loader" in message
    with pytest.raises(ConfigError, match=r"override .train\.lr=!!python.*safe loader"):
        load_config(None, [f"train.lr={payload}"], stage="sft")
    assert not marker.exists()


def test_config_that_is_not_utf8_is_a_config_error(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(b"stage: sft\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(invalid continuation byte at byte 16\)"):
        load_config(config)


# A subclass, not LlamaForCausalLM itself: transformers marks a remote-code class for auto-class saving,
# and marking the real Llama class would make every later save_pretrained in the process copy code.
PLANTED_MODULE = """from pathlib import Path
Path({marker!r}).touch()
from transformers import LlamaForCausalLM


class PlantedModel(LlamaForCausalLM):
    pass
"""


def test_remote_code_runs_only_when_the_config_asks(model_dir, tmp_path, marker):
    folder = tmp_path / "custom"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_planted.PlantedModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_planted.py").write_text(PLANTED_MODULE.format(marker=str(marker)))
    assert ModelConfig().trust_remote_code is False
    assert load_config(None, ["model.name_or_path=x"], stage="sft").model.trust_remote_code is False
    model, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert type(model) is LlamaForCausalLM and not marker.exists()
    remote, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder), trust_remote_code=True))
    assert marker.is_file()  # asked for, the folder's code ran: the flag is what decides
    assert type(remote).__name__ == "PlantedModel" and LlamaForCausalLM._auto_class is None
