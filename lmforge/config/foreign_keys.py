"""LLaMA-Factory and TRL setting names, and what each one is in lmforge: the data that `config/foreign.py`
converts with, that `load.py`'s "did you mean" hint and docs/switching.md read (a test checks the page
against these tables, so the page cannot drift).

Each entry is one of
- `Target(*keys)`: the value goes to these lmforge keys as it is (the schema checks its type and range);
- `Special(*keys, note)`: converted by a function in foreign.py (units, choices, several keys at once);
  the keys name where it lands, for the hint and the docs;
- `Ignored(why)`: accepted and reported, it changes nothing in lmforge (caching, plotting, workers...);
- `Refused(what_to_do)`: lmforge has no equivalent; listed with the others in one message.
A key in neither format's table is listed as unknown in that same message.

Key names and defaults are LLaMA-Factory's documented arguments (hparams/*_args.py, transformers'
TrainingArguments) and TRL's `trl sft`/`trl dpo` CLI flags (ModelConfig, SFTConfig, DPOConfig, ScriptArguments).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    keys: tuple[str, ...]

    def __init__(self, *keys: str) -> None:
        object.__setattr__(self, "keys", keys)


@dataclass(frozen=True)
class Special:
    keys: tuple[str, ...]
    note: str

    def __init__(self, *keys: str, note: str) -> None:
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "note", note)


@dataclass(frozen=True)
class Ignored:
    why: str


@dataclass(frozen=True)
class Refused:
    what_to_do: str


Rule = Target | Special | Ignored | Refused

_NO_DOWNLOAD = "lmforge never downloads or uploads; remove it"
_ACCELERATE = "lmforge runs on several GPUs under `accelerate launch --config_file examples/accelerate/zero3.yaml` " \
              "(or fsdp2.yaml), see docs/distributed.md; remove it"

# transformers' TrainingArguments (both formats pass them through) and the model keys both share.
COMMON: dict[str, Rule] = {
    "model_name_or_path": Target("model.name_or_path"),
    "trust_remote_code": Target("model.trust_remote_code"),
    "output_dir": Target("train.output_dir"),
    "learning_rate": Target("train.lr"),
    "num_train_epochs": Target("train.epochs"),
    "max_steps": Target("train.max_steps"),
    "per_device_train_batch_size": Target("train.batch_size"),
    "gradient_accumulation_steps": Target("train.grad_accum"),
    "weight_decay": Target("train.weight_decay"),
    "adam_beta1": Target("train.adam_beta1"),
    "adam_beta2": Target("train.adam_beta2"),
    "max_grad_norm": Target("train.max_grad_norm"),
    "warmup_ratio": Target("train.warmup_ratio"),
    "logging_steps": Target("train.logging_steps"),
    "save_steps": Target("train.save_steps"),
    "dataloader_num_workers": Target("train.num_workers"),
    "group_by_length": Target("train.group_by_length"),
    "torch_compile": Target("train.compile"),
    "run_name": Target("log.run_name"),
    "neftune_noise_alpha": Target("sft.neftune_alpha"),
    "gradient_checkpointing": Target("model.gradient_checkpointing"),
    "lora_alpha": Target("lora.alpha"),
    "lora_dropout": Target("lora.dropout"),
    "packing": Target("data.packing"),
    "seed": Special("train.seed", "data.seed", note="one seed for the run and the data split"),
    "data_seed": Target("data.seed"),
    "save_total_limit": Special("train.save_total_limit", note="null (keep all) is 0"),
    "resume_from_checkpoint": Special("train.resume_from", "train.resume",
                                      note="a folder is train.resume_from; true is train.resume"),
    "report_to": Special("log.report_to", note="`none` is []"),
    "lr_scheduler_type": Special("train.scheduler", "train.min_lr_ratio",
                                 note="cosine, linear (decay to 0: min_lr_ratio 0), constant, constant_with_warmup, "
                                      "cosine_with_min_lr (lr_scheduler_kwargs.min_lr_rate)"),
    "lr_scheduler_kwargs": Special("train.min_lr_ratio", note="only min_lr_rate, with cosine_with_min_lr"),
    "warmup_steps": Special("train.warmup_ratio", note="steps / max_steps; needs max_steps"),
    "bf16": Special("train.mixed_precision", note="true is bf16"),
    "fp16": Special("train.mixed_precision", note="true is fp16"),
    "eval_strategy": Special("train.eval_steps", note="steps: every eval_steps; no: only at the end"),
    "evaluation_strategy": Special("train.eval_steps", note="old name of eval_strategy"),
    "eval_steps": Special("train.eval_steps", note="with eval_strategy: steps"),
    "save_strategy": Special("train.save_steps", note="no: save_steps 0; steps: save_steps"),
    "optim": Special(note="adamw_torch, adamw_torch_fused, adamw_hf: lmforge's AdamW"),
    "adam_epsilon": Special(note="1e-8, AdamW's own"),
    "do_train": Special(note="true; lmforge train always trains"),
    "do_eval": Ignored("lmforge evaluates held-out data when there is some"),
    "overwrite_output_dir": Ignored("lmforge writes output_dir again (train.resume continues a run instead)"),
    "ddp_timeout": Ignored("process-group timeout of multi-GPU runs"),
    "logging_dir": Ignored("trackers write under output_dir"),
    "logging_first_step": Ignored("lmforge logs the first step"),
    "logging_strategy": Ignored("train.logging_steps sets the cadence"),
    "per_device_eval_batch_size": Ignored("lmforge evaluates with train.batch_size"),
    "remove_unused_columns": Ignored("lmforge reads the columns it needs"),
    "ddp_find_unused_parameters": Ignored("set by lmforge"),
    "save_only_model": Ignored("checkpoints keep optimizer state so a run can resume"),
    "save_safetensors": Ignored("lmforge always writes safetensors"),
    "tf32": Ignored("matmul precision of Ampere+ GPUs"),
    "bf16_full_eval": Ignored("evaluation runs in the training precision"),
    "fp16_full_eval": Ignored("evaluation runs in the training precision"),
    "include_num_input_tokens_seen": Ignored("lmforge logs tokens/s"),
    "dataloader_pin_memory": Ignored("set by lmforge"),
    "disable_tqdm": Ignored("log.progress switches the progress bar"),
    "log_level": Ignored("logging verbosity"),
    "local_rank": Ignored("set by the launcher"),
    "eval_on_start": Ignored("lmforge evaluates before and after training"),
    "hub_token": Ignored(_NO_DOWNLOAD),
    "model_revision": Special(note="main only (a local folder has one revision)"),
    "deepspeed": Refused(_ACCELERATE),
    "fsdp": Refused(_ACCELERATE),
    "fsdp_config": Refused(_ACCELERATE),
    "push_to_hub": Refused(_NO_DOWNLOAD),
    "hub_model_id": Refused(_NO_DOWNLOAD),
    "load_best_model_at_end": Refused("lmforge keeps the final model; pick a checkpoint with --resume or lmforge eval"),
    "metric_for_best_model": Refused("lmforge keeps the final model; remove it"),
    "greater_is_better": Refused("lmforge keeps the final model; remove it"),
    "label_smoothing_factor": Refused("lmforge's SFT loss has no label smoothing; remove it"),
}

LLAMAFACTORY: dict[str, Rule] = {
    "stage": Special("stage", note="pt, sft, rm, dpo, ppo; kto is dpo with dpo.loss kto"),
    "finetuning_type": Special("model.finetuning", note="lora, full, freeze (default lora)"),
    "template": Special("model.template", note="a family name (llama3, qwen, ...); empty is plain"),
    "dataset": Special("data.train", note="comma list of dataset_info.json names"),
    "eval_dataset": Special("data.eval", note="comma list of dataset_info.json names"),
    "dataset_dir": Target("data.dataset_dir"),
    "cutoff_len": Special("data.max_length", "pt.block_size", note="pt: the packed block size"),
    "max_samples": Special("data.train", note="each dataset's max_samples"),
    "val_size": Special("data.eval_split", note="a fraction in [0, 1)"),
    "train_on_prompt": Target("data.train_on_prompt"),
    "mask_history": Target("data.mask_history"),
    "streaming": Target("data.streaming"),
    "neat_packing": Special("data.packing", note="lmforge's packing always keeps documents apart"),
    "lora_rank": Target("lora.r"),
    "lora_target": Special("lora.target_modules", note="all is all-linear; a comma list is a list"),
    "loraplus_lr_ratio": Target("lora.plus_ratio"),
    "use_rslora": Target("lora.use_rslora"),
    "use_dora": Special("model.finetuning", note="true is dora"),
    "pissa_init": Special("lora.init", note="true is pissa (pissa_niter_N with pissa_iter)"),
    "pissa_iter": Special("lora.init", note="with pissa_init"),
    "quantization_bit": Special("model.finetuning", "lora.bits", note="4 or 8 with lora: qlora"),
    "quantization_method": Special(note="bitsandbytes (bnb) only"),
    "quantization_type": Special(note="nf4 only"),
    "double_quantization": Special(note="true only"),
    "freeze_trainable_layers": Special("model.freeze_trainable_layers", note="positive: the last N layers"),
    "freeze_trainable_modules": Special(note="all only"),
    "use_galore": Special("model.finetuning", note="true is galore"),
    "galore_rank": Target("galore.rank"),
    "galore_update_interval": Target("galore.update_interval"),
    "galore_scale": Target("galore.scale"),
    "galore_target": Special("galore.target_modules", note="all is all-linear"),
    "mixture_of_depths": Special("model.finetuning", note="convert is mod"),
    "pure_bf16": Special("model.dtype", note="true is bf16 weights without autocast"),
    "flash_attn": Special("model.attn_implementation", note="auto, sdpa, fa2, disabled (eager)"),
    "disable_gradient_checkpointing": Special("model.gradient_checkpointing", note="the opposite"),
    "enable_liger_kernel": Special("train.fused_loss", note="true: lmforge's chunked fused loss"),
    "use_swanlab": Special("log.report_to", note="true adds swanlab"),
    "pref_beta": Special("dpo.beta", "dpo.orpo_lambda", note="orpo: dpo.orpo_lambda"),
    "pref_loss": Special("dpo.loss", note="sigmoid, hinge, ipo, orpo, simpo"),
    "pref_ftx": Target("dpo.sft_weight"),
    "dpo_label_smoothing": Target("dpo.label_smoothing"),
    "simpo_gamma": Target("dpo.simpo_gamma"),
    "kto_chosen_weight": Target("dpo.kto_desirable_weight"),
    "kto_rejected_weight": Target("dpo.kto_undesirable_weight"),
    "reward_model": Target("rl.reward_model"),
    "reward_model_type": Special(note="full or lora: rl.reward_model is an lmforge RM artifact"),
    "ppo_epochs": Target("rl.ppo_epochs"),
    "ppo_target": Target("rl.kl_target"),
    "ppo_score_norm": Special("rl.reward_norm", note="true is running"),
    "ppo_whiten_rewards": Special("rl.reward_norm", note="true is batch"),
    "ppo_buffer_size": Special("rl.prompts_per_step", "rl.minibatch_size",
                               note="a rollout is batch x accumulation x buffer prompts"),
    "max_new_tokens": Special("rl.max_new_tokens", note="ppo; ignored by other stages"),
    "temperature": Special("rl.temperature", note="ppo; ignored by other stages"),
    "top_p": Special("rl.top_p", note="ppo; ignored by other stages"),
    "top_k": Special("rl.top_k", note="ppo; ignored by other stages"),
    "do_sample": Ignored("rollouts sample; evaluation answers are greedy"),
    "overwrite_cache": Ignored("lmforge's data cache is keyed by the files and settings"),
    "preprocessing_num_workers": Ignored("tokenisation runs in this process"),
    "preprocessing_batch_size": Ignored("tokenisation runs in this process"),
    "plot_loss": Ignored("lmforge writes metrics.jsonl and `lmforge report` draws the curves"),
    "cache_dir": Ignored(_NO_DOWNLOAD),
    "use_fast_tokenizer": Ignored("lmforge loads the fast tokenizer"),
    "low_cpu_mem_usage": Ignored("set by lmforge"),
    "resize_vocab": Ignored("lmforge resizes the embeddings when the tokenizer grows"),
    "print_param_status": Ignored("lmforge prints the trainable parameter count"),
    "infer_backend": Ignored("inference setting"),
    "infer_dtype": Ignored("inference setting"),
    "use_kv_cache": Ignored("inference setting"),
    "upcast_layernorm": Ignored("lmforge keeps fp32 weights unless model.dtype says otherwise"),
    "upcast_lmhead_output": Ignored("lmforge computes the loss in fp32"),
    "use_unsloth": Ignored("a speed option; lmforge has its own fast paths"),
    "use_unsloth_gc": Ignored("a speed option; model.gradient_checkpointing sets checkpointing"),
    "use_reentrant_gc": Ignored("lmforge uses non-reentrant checkpointing"),
    "ignore_pad_token_for_loss": Ignored("padding never carries loss in lmforge"),
    "include_effective_tokens_per_second": Ignored("lmforge logs tokens/s"),
    "compute_accuracy": Ignored("lmforge reports held-out loss and exact-match answers"),
    "buffer_size": Ignored("streaming shuffle buffer"),
    "mix_strategy": Special(note="concat only (weights per dataset: docs/data.md#mixing-datasets)"),
    "freeze_vision_tower": Ignored("multimodal setting"),
    "freeze_multi_modal_projector": Ignored("multimodal setting"),
    "pissa_convert": Ignored("lmforge saves a PiSSA run merged"),
    "create_new_adapter": Ignored("lmforge starts a new adapter for each stage"),
    "hf_hub_token": Ignored(_NO_DOWNLOAD),
    "ms_hub_token": Ignored(_NO_DOWNLOAD),
    "om_hub_token": Ignored(_NO_DOWNLOAD),
    "adapter_name_or_path": Refused("set model_name_or_path to the adapter folder (an lmforge LoRA artifact): "
                                    "lmforge merges it into its base"),
    "adapter_folder": Refused("set model_name_or_path to the adapter folder"),
    "ref_model": Refused("the reference is the starting model (dpo.reference: copy or adapter)"),
    "ref_model_adapters": Refused("the reference is the starting model; remove it"),
    "ref_model_quantization_bit": Refused("the reference is not quantised; remove it"),
    "reward_model_adapters": Refused("rl.reward_model is a whole RM artifact (lmforge train rm); remove it"),
    "reward_model_quantization_bit": Refused("the reward model is not quantised; remove it"),
    "use_llama_pro": Refused("use model.finetuning: llama_pro with expand.num_new_blocks on the original "
                             "model (lmforge expands it itself)"),
    "rope_scaling": Refused("lmforge does not change RoPE; remove it"),
    "shift_attn": Refused("LongLoRA's shift attention is not in lmforge; remove it"),
    "moe_aux_loss_coef": Refused("lmforge trains dense models; remove it"),
    "train_from_scratch": Refused("use model.scratch (a preset) with model.tokenizer"),
    "add_tokens": Refused("run `lmforge tokenizer extend` first and point model_name_or_path at the result"),
    "add_special_tokens": Refused("run `lmforge tokenizer extend` first and point model_name_or_path at the result"),
    "new_special_tokens": Refused("run `lmforge tokenizer extend` first and point model_name_or_path at the result"),
    "split_special_tokens": Refused("lmforge never splits special tokens; remove it"),
    "interleave_probs": Refused("give each data.train entry a weight (docs/data.md#mixing-datasets)"),
    "tool_format": Refused("tool calls render through the chat template; remove it"),
    "tokenized_path": Refused("lmforge tokenises on each run (cached); remove it"),
    "freeze_extra_modules": Refused("freeze trains the last layers only; remove it"),
    "additional_target": Refused("lmforge trains embeddings with LoRA only when the vocabulary grows; remove it"),
    "galore_layerwise": Refused("lmforge's GaLore is not layer-wise; remove it"),
    "galore_proj_type": Special(note="std only"),
    "use_badam": Refused("BAdam is not in lmforge: model.finetuning freeze or galore"),
    "use_apollo": Refused("APOLLO is not in lmforge: model.finetuning galore is the nearest"),
    "use_adam_mini": Refused("Adam-mini is not in lmforge; remove it"),
    "use_muon": Refused("Muon is not in lmforge; remove it"),
    "use_dft_loss": Refused("the DFT loss is not in lmforge; remove it"),
    "pref_bco_weight": Refused("BCO is not in lmforge; remove it"),
    "ld_alpha": Refused("LD-DPO is not in lmforge; remove it"),
    "disable_shuffling": Refused("lmforge shuffles each epoch with train.seed; remove it"),
    "early_stopping_steps": Refused("lmforge has no early stopping; set max_steps"),
    "do_predict": Refused("predict with `lmforge generate MODEL --data F --out F`"),
    "predict_with_generate": Refused("predict with `lmforge generate MODEL --data F --out F`"),
    "eval_on_each_dataset": Refused("evaluate each set with `lmforge eval`; remove it"),
    "media_dir": Refused("lmforge trains text models; remove it"),
    "fp8": Refused("lmforge trains in bf16/fp16 at the lowest; remove it"),
    "quantization_device_map": Refused("set by lmforge; remove it"),
    "finetuning_args": Refused("write the arguments as top-level keys"),
}

TRL: dict[str, Rule] = {
    "dataset_name": Special("data.train", note="a local file or folder (lmforge never downloads)"),
    "dataset_train_split": Special(note="train only (a local file is one split)"),
    "dataset_test_split": Ignored("held-out data comes from data.eval or data.eval_split"),
    "dataset_config": Refused("point dataset_name at the local file of that configuration"),
    "dataset_text_field": Special(note="text only (lmforge reads `text` columns; data.train columns renames)"),
    "use_peft": Special("model.finetuning", note="true is lora"),
    "lora_r": Target("lora.r"),
    "lora_target_modules": Special("lora.target_modules", note="all-linear or a list"),
    "lora_task_type": Ignored("lmforge adapts causal LMs"),
    "load_in_4bit": Special("model.finetuning", "lora.bits", note="with use_peft: qlora, 4 bits"),
    "load_in_8bit": Special("model.finetuning", "lora.bits", note="with use_peft: qlora, 8 bits"),
    "use_bnb_nested_quant": Ignored("lmforge's 4-bit QLoRA uses double quantisation"),
    "bnb_4bit_quant_type": Special(note="nf4 only"),
    "torch_dtype": Special("model.dtype", note="float32, bfloat16, float16, auto"),
    "dtype": Special("model.dtype", note="float32, bfloat16, float16, auto"),
    "attn_implementation": Target("model.attn_implementation"),
    "use_liger_kernel": Special("train.fused_loss", note="true: lmforge's chunked fused loss"),
    "max_length": Target("data.max_length"),
    "max_seq_length": Target("data.max_length"),
    "max_prompt_length": Ignored("lmforge never cuts a prompt; replies are cut to fit data.max_length"),
    "completion_only_loss": Special("data.train_on_prompt", note="false: loss on the prompt too"),
    "assistant_only_loss": Special(note="lmforge puts loss on assistant replies (data.train_on_prompt adds the rest)"),
    "beta": Special("dpo.beta", "rl.kl_coef", note="dpo: dpo.beta; grpo/rloo/ppo: rl.kl_coef"),
    "loss_type": Special("dpo.loss", note="dpo: sigmoid, hinge, ipo, robust; sft: nll"),
    "rpo_alpha": Target("dpo.sft_weight"),
    "label_smoothing": Target("dpo.label_smoothing"),
    "precompute_ref_log_probs": Target("dpo.precompute_ref"),
    "num_generations": Target("rl.num_generations"),
    "max_completion_length": Target("rl.max_new_tokens"),
    "temperature": Target("rl.temperature"),
    "top_p": Target("rl.top_p"),
    "top_k": Target("rl.top_k"),
    "model_init_kwargs": Refused("use model.dtype and model.attn_implementation"),
    "ref_model_init_kwargs": Refused("the reference is loaded like the model; remove it"),
    "reward_funcs": Refused("use rl.rewards (kinds exact_match, answer_match, regex, length, function)"),
}

FORMAT_NAMES = {"llamafactory": "LLaMA-Factory", "trl": "TRL"}
TABLES = {"llamafactory": {**COMMON, **LLAMAFACTORY}, "trl": {**COMMON, **TRL}}

LF_STAGES = {"pt": "pt", "sft": "sft", "rm": "rm", "dpo": "dpo", "kto": "dpo", "ppo": "ppo"}

TEMPLATES = {
    "llama3": "llama3", "qwen": "qwen", "qwen3": "qwen3", "glm4": "glm4", "mistral": "mistral", "gemma": "gemma",
    "deepseek": "deepseek", "yi": "yi", "baichuan2": "baichuan2", "phi": "phi", "chatml": "chatml", "empty": "plain",
}
"""LLaMA-Factory `template` names → lmforge `model.template` names (a name is taken only once the template is
installed in lmforge/templates/)."""

LF_DEFAULTS: dict[str, object] = {
    "train.lr": 5e-5, "train.epochs": 3.0, "train.batch_size": 8, "train.scheduler": "linear",
    "train.warmup_ratio": 0.0, "train.min_lr_ratio": 0.0, "train.adam_beta2": 0.999,
    "data.max_length": 2048, "data.eval_split": 0.0, "data.dataset_dir": "data",
    "model.finetuning": "lora", "model.gradient_checkpointing": True,
}
"""What a LLaMA-Factory run does when its file leaves a key out (its own and transformers' defaults), where
lmforge's default differs. LoRA's alpha defaults to twice the rank."""

TRL_DEFAULTS: dict[str, object] = {
    "train.lr": 5e-5, "train.epochs": 3.0, "train.batch_size": 8, "train.scheduler": "linear",
    "train.warmup_ratio": 0.0, "train.min_lr_ratio": 0.0, "train.adam_beta2": 0.999,
    "data.max_length": 1024, "data.eval_split": 0.0,
}
"""TRL's defaults (transformers' where TRL keeps them) where lmforge's differ; the learning rate is the
trainer's own (TRL_LR), and with use_peft LoRA is r 16, alpha 32, dropout 0.05."""
TRL_LR = {"sft": 2e-5, "dpo": 1e-6}
TRL_LORA = {"lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05}


def lmforge_keys_of(key: str) -> tuple[str, ...]:
    """The lmforge keys a LLaMA-Factory or TRL key lands in (empty when it has none): the "did you mean"
    hint for a foreign name typed into an lmforge config."""
    for table in (COMMON, LLAMAFACTORY, TRL):
        rule = table.get(key)
        if isinstance(rule, (Target, Special)) and rule.keys:
            return rule.keys
    return ()


def foreign_rule(key: str) -> Rule | None:
    for table in (COMMON, LLAMAFACTORY, TRL):
        if key in table:
            return table[key]
    return None
