"""The web UI's words in English and Chinese: every label, button, tab and group title, and the help of
the up-front Train fields, by key. The grouped fields' labels are their config keys (the same in both
languages: they are what a YAML file says); their help is the schema's docstring, with a Chinese text from
HELP_ZH where one is written."""

from __future__ import annotations

LANGUAGES = ("English", "中文")

TEXTS: dict[str, tuple[str, str]] = {
    # tabs
    "tab.train": ("Train", "训练"),
    "tab.runs": ("Runs", "运行记录"),
    "tab.pipeline": ("Pipeline", "流水线"),
    "tab.evaluate": ("Evaluate", "评估"),
    "tab.chat": ("Chat", "对话"),
    "tab.export": ("Export", "导出"),
    "language": ("Language / 语言", "语言 / Language"),
    "header": ("## lmforge\nServing files under `{root}`; runs under `{runs}`.",
               "## lmforge\n服务目录：`{root}`；运行记录目录：`{runs}`。"),
    # Train: up-front fields
    "stage": ("stage", "训练阶段"),
    "model": ("model (folder, GGUF, short name, artifact, scratch:PRESET)",
              "模型（文件夹、GGUF、简称、产物或 scratch:预设）"),
    "tokenizer": ("tokenizer (scratch models)", "分词器（从零训练的模型）"),
    "template": ("chat template", "对话模板"),
    "data": ("datasets (files, folders, dataset_info.json entries; comma-separated)",
             "数据集（文件、文件夹或 dataset_info.json 条目，逗号分隔）"),
    "dataset_dir": ("dataset_info.json folder (for entries)", "dataset_info.json 所在文件夹（按条目名引用时）"),
    "method": ("method", "微调方法"),
    "lr": ("learning rate", "学习率"),
    "epochs": ("epochs", "训练轮数"),
    "max_steps": ("max steps (-1: by epochs)", "最大步数（-1：按轮数）"),
    "batch_size": ("batch size", "批大小"),
    "max_length": ("max length", "最大长度"),
    "lora_r": ("LoRA rank", "LoRA 秩"),
    "dpo_loss": ("DPO loss", "DPO 损失"),
    "output_dir": ("output folder", "输出文件夹"),
    "seed": ("seed", "随机种子"),
    "help.template": ("auto: the tokenizer's own template, else ChatML; or a named family template",
                      "auto：使用分词器自带的模板，没有则用 ChatML；也可选择某个模型家族的模板"),
    "help.data": ("or a YAML list of datasets with columns/formatting, e.g. [{path: a.jsonl, formatting: alpaca}]",
                  "也可写成 YAML 数据集列表（可带 columns/formatting），如 [{path: a.jsonl, formatting: alpaca}]"),
    "help.method": ("full, freeze, LoRA and its kinds, GaLore, MoD, LLaMA-Pro (see docs/finetuning.md)",
                    "全参、冻结、LoRA 系列、GaLore、MoD、LLaMA-Pro（见 docs/finetuning.md）"),
    "help.max_steps": ("optimizer steps; when positive it overrides epochs", "优化器步数；大于 0 时覆盖训练轮数"),
    # Train: groups and buttons
    "group.model": ("model: dtype, attention, freezing, adapters", "模型：精度、注意力实现、冻结层、适配器"),
    "group.data": ("data: eval set, packing, splitting, bad records", "数据：验证集、打包、切分、坏记录处理"),
    "group.train": ("train: optimizer, schedule, logging, checkpoints", "训练：优化器、学习率调度、日志、检查点"),
    "group.lora": ("lora: LoRA, DoRA, QLoRA, LoRA+, rsLoRA, PiSSA", "lora：低秩适配器（LoRA、DoRA、QLoRA、LoRA+、rsLoRA、PiSSA）"),
    "group.galore": ("galore: gradient low-rank projection", "galore：梯度低秩投影"),
    "group.mod": ("mod: Mixture-of-Depths", "mod：深度混合（Mixture-of-Depths）"),
    "group.expand": ("expand: LLaMA-Pro block expansion", "expand：LLaMA-Pro 块扩展"),
    "group.log": ("log: trackers and progress", "log：实验跟踪与进度显示"),
    "group.pt": ("pt: pretraining", "pt：预训练"),
    "group.sft": ("sft: supervised fine-tuning", "sft：监督微调"),
    "group.rm": ("rm: reward model", "rm：奖励模型"),
    "group.dpo": ("dpo: preference losses (DPO, IPO, SimPO, ORPO, KTO, ...)",
                  "dpo：偏好优化损失（DPO、IPO、SimPO、ORPO、KTO 等）"),
    "group.rl": ("rl: PPO, GRPO, RLOO (rewards, sampling, KL)", "rl：PPO、GRPO、RLOO（奖励、采样、KL）"),
    "group.distill": ("distill: on-policy distillation from a teacher (GKD)", "distill：基于教师模型的在策略蒸馏（GKD）"),
    "group.other": ("other settings", "其他设置"),
    "button.preview": ("Preview", "预览"),
    "button.yaml": ("Show YAML", "显示 YAML"),
    "button.load": ("Load YAML into the form", "将 YAML 载入表单"),
    "button.start": ("Start", "开始训练"),
    "config_yaml": ("config (copy it, or paste one and load it)", "配置（可复制，也可粘贴后载入）"),
    # Runs
    "runs_table": ("runs", "运行列表"),
    "run_name": ("run (as listed)", "运行名称（与列表一致）"),
    "curves": ("curves (one axis per metric)", "曲线（每个指标独立坐标轴）"),
    "progress": ("progress", "进度"),
    "log_tail": ("log (last lines, live)", "日志（最新内容，实时刷新）"),
    "button.stop": ("Stop", "停止"),
    "button.resume": ("Resume", "继续训练"),
    "button.report": ("Report", "报告"),
    "report_file": ("HTML report (open or download)", "HTML 报告（打开或下载）"),
    # Pipeline
    "pipeline_path": ("pipeline YAML", "流水线 YAML 文件"),
    "pipeline_text": ("pipeline", "流水线内容"),
    "pipeline_stages": ("stages", "各阶段状态"),
    "button.load_pipeline": ("Load", "载入"),
    "button.save": ("Save", "保存"),
    "button.run": ("Run", "运行"),
    # Evaluate
    "eval_artifact": ("model or artifact to evaluate", "要评估的模型或产物"),
    "eval_suite": ("suite file (YAML with the keys below; optional)", "评估套件文件（含下列键的 YAML，可选）"),
    "eval_files": ("eval data and judges", "评估数据与评判模型"),
    "eval_results": ("results", "评估结果"),
    "eval_log": ("evaluation log", "评估日志"),
    "button.evaluate": ("Evaluate", "开始评估"),
    "button.refresh": ("Refresh", "刷新"),
    # Chat and Export
    "temperature": ("temperature", "温度"),
    "max_new_tokens": ("max new tokens", "最大生成长度"),
    "chat_model": ("model or artifact", "模型或产物"),
    "chat_model_2": ("second model (optional, to compare)", "第二个模型（可选，用于对比）"),
    "export_model": ("model or artifact", "模型或产物"),
    "export_out": ("new folder", "新文件夹"),
    "export_dtype": ("dtype", "数据类型"),
    "export_gguf": ("also GGUF", "同时导出 GGUF"),
    "button.export": ("Export", "导出"),
}

HELP_ZH: dict[str, str] = {
    "train.scheduler": "学习率调度：cosine、linear 或 constant。",
    "train.grad_accum": "梯度累积步数：每个优化器步累积的微批次数。",
    "train.warmup_ratio": "预热步数占总步数的比例。",
    "train.weight_decay": "权重衰减系数。",
    "train.logging_steps": "每隔多少步记录一次指标。",
    "train.eval_steps": "每隔多少步评估一次（0：只在结束时评估）。",
    "train.save_steps": "每隔多少步保存检查点（0：只保存最终模型）。",
    "train.mixed_precision": "混合精度：no、bf16、fp16（通过 accelerate 自动转换）。",
    "train.resume": "从 output_dir 中最新的检查点继续训练。",
    "model.dtype": "权重精度：fp32、bf16、fp16 或 auto（与检查点一致）。",
    "model.gradient_checkpointing": "梯度检查点：以计算换显存。",
    "model.trust_remote_code": "运行模型文件夹自带的代码；网页界面需以 --allow-remote-code 启动才允许。",
    "data.packing": "SFT：每行打包多个样本（样本之间互不注意）。预训练总是打包。",
    "data.on_error": "坏记录：raise（报出文件与行号）或 skip（跳过并计数）。",
    "data.eval_split": "未提供验证数据时，从训练集划出的验证比例（0 表示不划分）。",
    "data.train_on_prompt": "SFT：提示部分也计算损失。",
    "data.mask_history": "SFT：只在对话的最后一轮助手回复上计算损失。",
    "lora.alpha": "LoRA 缩放系数 alpha。",
    "lora.dropout": "LoRA 的 dropout 比例。",
    "lora.target_modules": "要加适配器的模块名列表，或 all-linear（除输出头外的所有线性层）。",
    "dpo.beta": "DPO 的 beta：偏离参考模型的惩罚强度。",
    "dpo.reference": "参考模型的对数概率来源：auto、copy 或 adapter。",
    "rl.reward_model": "奖励模型路径（一个权重为 1 的 model 奖励的简写）。",
    "rl.rewards": "奖励列表，按权重求和，如 [{kind: answer_match, weight: 1}]。",
    "rl.num_generations": "每个提示的采样数；GRPO 与 RLOO 需要至少 2 个。",
    "rl.kl_coef": "KL 惩罚系数（0 表示关闭）。",
    "rl.loss_type": "GRPO/RLOO 的逐词损失聚合方式：grpo、bnpo、dr_grpo 或 dapo。",
    "rl.temperature": "采样温度。",
    "rl.max_new_tokens": "每条回复最多生成的词元数。",
    "log.report_to": "实验跟踪器：tensorboard、wandb、mlflow 等；留空则只写 metrics.jsonl。",
    # the Evaluate tab's fields (lmforge/eval/spec.py)
    "perplexity": "留出文本（或对话）：按 block_size 个词元分块计算困惑度。",
    "answers": "带参考回复的提示：贪心解码的精确匹配，以及 contains（回复中是否给出记录的简短答案或参考回复）。",
    "choice": "C-Eval / CMMLU / MMLU 格式的选择题，按各选项的对数似然打分。",
    "pairs": "偏好对：奖励模型的成对准确率。",
    "prompts": "用于奖励、KL 和胜率评估的提示（默认使用 answers 文件）。",
    "reward_model": "评判模型：对贪心回复打分，并计算相对 baseline 的胜率。",
    "reference": "参考模型：在策略模型采样的回复上计算 KL(策略 ‖ 参考)。",
    "baseline": "胜率的比较对象：该模型的贪心回复。",
    "max_samples": "每个文件最多读取的记录数。",
    "max_new_tokens": "每条回复最多生成的词元数。",
    "block_size": "困惑度计算的分块长度（词元）。",
    "perplexity_tokens": "困惑度文本最多使用的词元数（长文档在 CPU 上很慢）。",
    "show_samples": "保留到报告中的留出提示及其回复的条数。",
    "seed": "随机种子。",
}


def text(key: str, language: str = "English") -> str:
    """The text of `key` in `language` (one of LANGUAGES)."""
    english, chinese = TEXTS[key]
    return chinese if language == LANGUAGES[1] else english


def field_help(key: str, english: str, language: str) -> str:
    """A grouped field's help: the schema's docstring, or its Chinese text where one is written."""
    return HELP_ZH.get(key, english) if language == LANGUAGES[1] else english
