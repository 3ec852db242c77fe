"""PPO's critic when it is a separate model: the reward model (InstructGPT initialises the value
function from it), a model named by `rl.critic_path`, or the starting policy with a fresh head."""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForSequenceClassification

from lmforge.config.errors import ConfigError
from lmforge.config.schema import StageConfig
from lmforge.models.adapters import apply_finetuning
from lmforge.models.load import as_reward_model, load_model_and_tokenizer, local_folder, require_safetensors


def critic_source(cfg: StageConfig) -> str | None:
    if cfg.rl.critic_path:
        return cfg.rl.critic_path
    return next((spec.path for spec in cfg.rl.reward_specs() if spec.kind == "model"), None)


def load_critic(cfg: StageConfig, dtype: torch.dtype, policy_vocab: int):
    source = critic_source(cfg)
    if source:
        local_folder("rl.critic_path" if cfg.rl.critic_path else "rl.rewards (model)", source)
        require_safetensors(source)
        critic = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype,
                                                                    use_safetensors=True)
        if critic.get_input_embeddings().num_embeddings < policy_vocab:
            raise ConfigError(f"the critic {source} has another vocabulary than the policy (it reads the "
                              "policy's tokens): set rl.critic=shared or rl.critic_path to a model that shares it")
    else:
        causal, tokenizer, _ = load_model_and_tokenizer(cfg.model, seed=cfg.train.seed)
        critic = as_reward_model(causal, cfg.train.seed)
        critic.config.pad_token_id = tokenizer.pad_token_id
    critic.config.use_cache = False
    # The critic trains the way the policy does, except that a 4-bit policy gets a plain LoRA critic.
    method = "lora" if cfg.model.finetuning == "qlora" else cfg.model.finetuning
    model_cfg = dataclasses.replace(cfg.model, finetuning=method)
    return apply_finetuning(critic, model_cfg, cfg.lora, ("score",), "SEQ_CLS", galore=cfg.galore, mod=cfg.mod,
                            expand=cfg.expand, seed=cfg.train.seed)
