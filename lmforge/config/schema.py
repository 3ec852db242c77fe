"""Typed configuration. Each field's docstring-style comment is its help text.

Groups stay small and stage-specific knobs live in their own group (`pt`, `sft`), so a YAML file
reads like the stage it configures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config.checkpointing import check_setting as check_checkpointing
from lmforge.config.constraints import check_choice, check_group

# The fine-tuning method groups live in their own module, re-exported here.
from lmforge.config.errors import ConfigError
from lmforge.config.methods import (  # noqa: F401  (re-exported: `from lmforge.config.schema import ...`)
    FINETUNING,
    LORA_METHODS,
    ExpandConfig,
    GaloreConfig,
    LoraConfig,
    ModConfig,
)
from lmforge.config.schema_distill import DistillConfig, check_distill_stage  # noqa: F401  (re-exported)
from lmforge.config.schema_rl import REWARD_KINDS, RewardSpec, RLConfig  # noqa: F401  (re-exported)
from lmforge.config.templates import check_template_choice

STAGES = ("pt", "sft", "rm", "dpo", "ppo", "grpo", "rloo", "distill")
RL_STAGES = ("ppo", "grpo", "rloo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto")
DTYPES = ("fp32", "bf16", "fp16", "auto")
SCHEDULERS = ("cosine", "linear", "constant")
FORMATS = ("auto", "text", "alpaca", "sharegpt", "openai")
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio", "all")
"""accelerate's trackers (an unknown name failed with a traceback when the run started)."""


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """A Hugging Face folder, an lmforge artifact, or a short name (`smollm2-135m-instruct`)."""
    gguf_file: str | None = None
    """A GGUF file (inside name_or_path, or a path) to import; converted once and cached."""
    scratch: str | None = None
    """Build a fresh Llama-style model from a preset in lmforge/presets/scratch.yaml (test, tiny, small, base)."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to the model's own."""
    template: str = "auto"
    """Chat template: `auto` (the tokenizer's own, else ChatML), a name in lmforge/templates/ (llama3, qwen, qwen3,
    glm4, mistral, gemma, deepseek, yi, baichuan2, phi, chatml, plain) or the path of a .jinja file; see
    docs/templates.md."""
    dtype: str = "fp32"
    """Weights dtype: fp32, bf16, fp16 or auto (the checkpoint's)."""
    finetuning: str = "full"
    """full, freeze (last N layers), lora, dora, qlora, galore, mod (Mixture-of-Depths), llama_pro (block
    expansion); see docs/finetuning.md."""
    freeze_trainable_layers: int = 2
    """With finetuning=freeze: how many of the last decoder layers train."""
    gradient_checkpointing: bool | int | str = False
    """Activation checkpointing (non-reentrant): false, true (every block), k (the first k blocks) or
    every-N (every N-th block); see docs/performance.md."""
    attn_implementation: str = "auto"
    """auto: sdpa, and for training on a GPU lmforge_varlen (packed documents kept apart through
    variable-length flash attention, no dense mask); or any transformers name (sdpa, eager, ...)."""
    parent_adapter: str = "merge"
    """When name_or_path is a LoRA/DoRA adapter (a previous stage's artifact): `merge` folds it into
    its base and this stage trains its own method on top; `continue` trains that same adapter further,
    so the artifact stays a small adapter over the original base."""
    trust_remote_code: bool = False
    """Run code shipped with a model folder. Off unless you trust the folder."""

    def __post_init__(self) -> None:
        check_group(self, "model")
        check_choice("model", "dtype", self.dtype, DTYPES)
        check_choice("model", "finetuning", self.finetuning, FINETUNING)
        check_template_choice(self.template)
        check_choice("model", "parent_adapter", self.parent_adapter, ("merge", "continue"))
        check_checkpointing(self.gradient_checkpointing)
        if self.parent_adapter == "continue" and self.finetuning not in ("lora", "dora"):
            raise ConfigError("model.parent_adapter=continue trains the parent's adapter further: "
                              "set model.finetuning=lora (or dora)")


@dataclass
class DatasetSpec:
    path: str | None = None
    """A file, a directory or a glob (.txt .jsonl .json .parquet .csv)."""
    name: str | None = None
    """An entry of a LLaMA-Factory `dataset_info.json` (see data.dataset_dir)."""
    formatting: str = "auto"
    """auto, text, alpaca, sharegpt, openai."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename columns: {prompt: instruction, query: input, response: output, messages: conversations, ...}."""
    tags: dict[str, str] = field(default_factory=dict)
    """ShareGPT role/content keys: {role_tag: from, content_tag: value, user_tag: human, ...}."""
    weight: float = 1.0
    """Relative sampling weight when mixing datasets."""
    max_samples: int | None = None
    replacements: dict[str, str] = field(default_factory=dict)
    """Text substitutions applied to every string (e.g. {"{{name}}": "Forge"} for identity.json)."""

    def __post_init__(self) -> None:
        check_group(self, "dataset")
        check_choice("dataset", "formatting", self.formatting, FORMATS)
        if (self.path is None) == (self.name is None):
            raise ConfigError("a dataset needs exactly one of `path` or `name`")


@dataclass
class DataConfig:
    train: list[DatasetSpec] = field(default_factory=list)
    eval: list[DatasetSpec] = field(default_factory=list)
    dataset_dir: str | None = None
    """Folder holding a LLaMA-Factory dataset_info.json for `name:` datasets."""
    eval_split: float = 0.05
    """Share of train held out for evaluation when no eval data is given (0 disables)."""
    max_length: int = 512
    """Longest SFT sample in tokens. Overlong samples keep the prompt's head and the reply's head
    (the reply gets at least half); see docs/data.md."""
    packing: bool = False
    """SFT: pack several samples per row (documents never attend to each other). PT always packs."""
    text_split: str = "line"
    """Plain .txt files: one document per `line`, per `blank`-line-separated paragraph, or per `file`."""
    on_error: str = "skip"
    """Bad records: `skip` (count them, up to `max_bad_fraction` of a file) or `raise` (stop at the first,
    naming its file and line)."""
    max_bad_fraction: float = 0.05
    """Under `skip`: a file with more than this share of bad records stops the run, naming the file and its
    first bad lines (1 skips any number)."""
    streaming: bool = False
    """Read large files lazily through `datasets` streaming instead of caching them to Arrow."""
    train_on_prompt: bool = False
    """SFT: put loss on prompt tokens too."""
    mask_history: bool = False
    """SFT: put loss only on the last assistant turn of a dialogue."""
    reasoning_loss: bool = True
    """SFT: the reasoning of a reply (its `reasoning_content`, or a `<think>` block opening it) carries
    loss; false makes it context, so only the answer trains."""
    enable_thinking: bool | None = None
    """Passed to the chat template as `enable_thinking` (Qwen3's thinking switch) when set; None leaves
    the template's default."""
    system_prompt: str | None = None
    """The system prompt of every record that has none of its own (SFT, preference and RL prompt data): unset
    keeps the chat template's behaviour (some add a default one, SmolLM2's and qwen do); a string is the
    system turn; "" is none, not even the template's default. See docs/data.md."""
    seed: int = 42

    def __post_init__(self) -> None:
        check_group(self, "data")
        check_choice("data", "text_split", self.text_split, ("line", "blank", "file"))
        check_choice("data", "on_error", self.on_error, ("raise", "skip"))
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ConfigError(f"data.system_prompt must be a string (\"\" for none), got {self.system_prompt!r}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; overrides epochs when positive."""
    batch_size: int = 8
    """Micro-batch size (rows per forward pass)."""
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    """Cosine/linear decay floor as a fraction of lr."""
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    logging_steps: int = 10
    eval_steps: int = 0
    """Evaluate every N steps (0: only at the end)."""
    save_steps: int = 0
    """Checkpoint every N steps (0: only the final model)."""
    save_total_limit: int = 2
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    resume_from: str | None = None
    """Continue from this checkpoint folder."""
    mixed_precision: str = "no"
    """no, bf16, fp16 (autocast through accelerate)."""
    num_workers: int = 0
    fused_loss: bool | None = None
    """Loss and log-probs straight from hidden states in chunks, never the whole [tokens x vocab]
    logits: true, false, or unset (on)."""
    compile: bool = False
    """torch.compile each transformer block (compiled once, shared by all blocks)."""
    group_by_length: bool = False
    """Batch rows of similar length together (shuffled within chunks of 50 batches, batch order
    shuffled): far less padding when lengths vary, e.g. long rejected answers among short ones."""

    def __post_init__(self) -> None:
        check_group(self, "train")
        check_choice("train", "scheduler", self.scheduler, SCHEDULERS)
        check_choice("train", "mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))


@dataclass
class LogConfig:
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers: tensorboard, wandb, mlflow; [] for metrics.jsonl only."""
    run_name: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for tracker in filter(None, self.report_to):  # an empty name is dropped, as `report_to: ""` means none
            check_choice("log", "report_to", tracker, TRACKERS)


@dataclass
class PTConfig:
    block_size: int = 256
    """Packed row length in tokens."""

    def __post_init__(self) -> None:
        check_group(self, "pt")


@dataclass
class SFTConfig:
    eval_generate: int = 64
    """Held-out samples answered by generation at the end (exact match); 0 disables."""
    max_new_tokens: int = 64
    neftune_alpha: float = 0.0
    """NEFTune (Jain et al. 2023): uniform noise of scale alpha/sqrt(length x width) on the input embeddings
    while training (e.g. 5); 0 turns it off."""

    def __post_init__(self) -> None:
        check_group(self, "sft")


@dataclass
class RMConfig:
    margin: float = 0.0
    """Required gap between chosen and rejected rewards in the Bradley-Terry loss."""
    center_coef: float = 0.0
    """Weight of the centring term mean((r_c + r_r)^2) that keeps rewards near zero (e.g. 0.01)."""

    def __post_init__(self) -> None:
        check_group(self, "rm")


@dataclass
class DPOConfig:
    loss: str = "sigmoid"
    """sigmoid (DPO), ipo, hinge, robust, simpo, orpo, kto."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    """Conservative DPO (sigmoid) / robust DPO: assumed share of flipped labels."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term next to the SFT loss."""
    sft_weight: float = 0.0
    """Add this times the chosen replies' per-token NLL to DPO/IPO/hinge/robust (RPO, TRL's rpo_alpha,
    LLaMA-Factory's pref_ftx) or SimPO (CPO-SimPO): keeps the chosen answers likely while the pairs
    separate."""
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reference: str = "auto"
    """Where reference log-probs come from: auto (adapter-disabled model under LoRA, else a frozen
    copy), copy, adapter. Unused by simpo and orpo."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training, cache them on disk, and drop the reference."""
    share_prompt: bool | None = None
    """Run each pair as one row [prompt, chosen, rejected] under a prefix-sharing mask, so the prompt's
    forward pass and activations exist once: true, false, or unset (on wherever it is exact: sdpa or
    eager attention, no sliding window shorter than data.max_length, no mixture-of-depths)."""
    eval_generate: int = 64
    """Held-out prompts answered greedily before and after training (exact match vs chosen); 0 disables."""
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        check_group(self, "dpo")
        check_choice("dpo", "loss", self.loss, DPO_LOSSES)
        check_choice("dpo", "reference", self.reference, ("auto", "copy", "adapter"))
        if self.sft_weight and self.loss not in ("sigmoid", "ipo", "hinge", "robust", "simpo"):
            raise ConfigError(f"dpo.sft_weight applies to sigmoid, ipo, hinge, robust and simpo, not {self.loss} "
                              "(orpo has its own SFT term)")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust", "simpo"):
            raise ConfigError(f"dpo.label_smoothing applies to sigmoid, robust and simpo, not {self.loss}")


@dataclass
class StageConfig:
    stage: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    mod: ModConfig = field(default_factory=ModConfig)
    expand: ExpandConfig = field(default_factory=ExpandConfig)
    log: LogConfig = field(default_factory=LogConfig)
    pt: PTConfig = field(default_factory=PTConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        check_choice("", "stage", self.stage, STAGES)
        if self.stage == "distill":
            check_distill_stage(self.distill)
        if self.stage in RL_STAGES:
            if not self.rl.reward_specs():
                raise ConfigError(f"{self.stage} needs a reward: set rl.reward_model or rl.rewards")
            if self.stage in ("grpo", "rloo") and self.rl.num_generations < 2:
                raise ConfigError(f"{self.stage} compares samples of one prompt: set rl.num_generations >= 2")
            if self.stage == "ppo" and self.rl.grpo_family_settings():
                raise ConfigError(f"{', '.join(self.rl.grpo_family_settings())} apply to grpo and rloo, not ppo: "
                                  "remove them or use stage grpo")
            if self.stage == "rloo" and self.rl.scale_rewards != "auto":
                raise ConfigError("rl.scale_rewards applies to grpo; rloo's baseline is leave-one-out and "
                                  "rl.whiten_advantages scales it")
            if self.rl.reference == "adapter" and self.model.finetuning not in LORA_METHODS:
                raise ConfigError("rl.reference=adapter needs model.finetuning=lora, dora or qlora")
        if self.stage in ("rm", "dpo", "distill", *RL_STAGES) and self.data.streaming:
            raise ConfigError(f"{self.stage} reads preference data into a table; data.streaming is for pt/sft")
        if "adapter" in (self.dpo.reference, self.rl.reference) and self.lora.init.startswith("pissa"):
            raise ConfigError("a PiSSA adapter switched off is not the starting model: use reference auto or copy")
        if self.dpo.reference == "adapter" and self.model.finetuning not in LORA_METHODS:
            raise ConfigError("dpo.reference=adapter needs model.finetuning=lora, dora or qlora")
        if self.model.name_or_path is None and self.model.scratch is None:
            raise ConfigError("set model.name_or_path (a model to load) or model.scratch (a preset)")

