"""Typed config schemas, registered in Hydra's ConfigStore, and the cross-field rules.

Each config group (`model`, `vision`, `projector`, `freeze`, `quant`, `data`, `stage`, `train`,
`eval`, `logger`) has one dataclass here; the YAML files under `conf/` only supply values, so a
misspelt key or a wrong type fails when Hydra composes. `validate` checks the rules that span
several groups before any weights are loaded, each failure saying what to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from vlmablate.errors import ConfigError  # its own module: projector_io raises it without importing config
from vlmablate.eval.extract import DEFAULT_EXTRACTION, EXTRACTIONS


@dataclass
class TinyModelConfig:
    """Sizes of `model=tiny_random` (built in code, nothing downloaded)."""

    arch: str = "llava"  # llava | llava_next
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 64
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 600


# The tiny world's question categories (world/language.py's CATEGORIES), each asked equally often by default.
QUESTION_WEIGHTS = {c: 1.0 for c in ("existence", "colour", "shape", "counting", "position", "spatial", "size", "fill",
                                     "mark")}


@dataclass
class WorldConfig:
    """The embedded tiny world: its seed and data sizes, and which components it runs on.

    `components`: "shipped" (the pretrained vision tower and LM inside the package) or "build" (the
    same recipe built into the cache, once per config hash). With "build", `vision` and `lm` override
    fields of `world.pretrain.VisionPretrainConfig` / `world.reader.ReaderConfig` (`lm.reading.*` for
    the reading documents, `lm.vocab_size` for the tokenizer). `seed` varies the data, never the
    components.
    """

    name: str = MISSING
    seed: int = 0
    n_caption: int = 12000
    n_instruct: int = 5000
    n_bench: int = 300
    n_vqa: int = 200
    image_size: int = 64
    components: str = "shipped"
    # how often stage 2 asks each question category, relative to the others (world.question_weights.mark=3)
    question_weights: dict[str, float] = field(default_factory=lambda: dict(QUESTION_WEIGHTS))
    vision: dict[str, Any] = field(default_factory=dict)
    lm: dict[str, Any] = field(default_factory=dict)
    cache_dir: Optional[str] = None


@dataclass
class ModelConfig:
    """Which checkpoint to load, or which parts to compose into one Llava model."""

    name: str = MISSING
    # pretrained: a Llava / LlavaNext checkpoint (hub id or folder) with its processor;
    # compose: vision encoder + causal LM + fresh projector; tiny_random: built in code;
    # tiny_world: compose the tiny world's pretrained vision encoder and language model.
    source: str = "pretrained"
    checkpoint: Optional[str] = None
    vision_checkpoint: Optional[str] = None
    llm_checkpoint: Optional[str] = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    # Chat template for stage 2: null = the tokenizer's own (Vicuna v1 when it has none).
    chat_template: Optional[str] = None
    # Stage-1 projector weights to start from (LLaVA's --pretrain_mm_mlp_adapter): a projector
    # folder, or `auto` = the stage-1 run of this model and projector on `stage1_data`, trained once
    # and found again by the hash of its resolved config.
    pretrained_projector: Optional[str] = None
    stage1_data: Optional[str] = None  # the data option stage 1 trains on (for pretrained_projector=auto)
    torch_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_length: int = 2048
    # The model's own image mode, which wins over the stage's (null: the stage's): LLaVA-NeXT
    # checkpoints are trained on anyres tiles.
    image_aspect: Optional[str] = None
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # where tiny/composed checkpoints are built
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    """LoRA on one component, targeted by module names anchored to that component's path."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Leaf names of the linear layers inside the component; "all-linear" = every nn.Linear in it.
    targets: Any = "all-linear"


@dataclass
class VisionConfig:
    """Vision encoder policy: frozen | unfrozen | lora | last_n (last N encoder blocks)."""

    policy: str = "frozen"
    last_n: int = 0
    lr: Optional[float] = None  # null = the stage's learning rate
    lora: LoraConfig = field(default_factory=LoraConfig)  # read only when policy=lora


@dataclass
class ProjectorConfig:
    """Connector type (linear | mlp2x_gelu) and whether it trains."""

    type: str = "mlp2x_gelu"
    trainable: bool = True
    lr: Optional[float] = None  # LLaVA's mm_projector_lr; null = the stage's learning rate


@dataclass
class FreezeConfig:
    """Language model policy: frozen_llm | lora_llm | full_llm."""

    name: str = MISSING
    policy: str = "frozen"  # frozen | lora | full
    lr: Optional[float] = None  # null = the stage's learning rate
    lora: LoraConfig = field(default_factory=LoraConfig)  # read only when policy=lora


@dataclass
class QuantConfig:
    """bitsandbytes quantization of the language model only."""

    mode: str = "none"  # none | nf4 | int8
    double_quant: bool = True
    # nf4's storage dtype (bnb_4bit_quant_storage); null: uint8. FSDP shards only floating-point tensors,
    # so QLoRA under FSDP stores the 4-bit weights in the model's dtype (bfloat16).
    storage: Optional[str] = None


@dataclass
class SourceConfig:
    """One data source of a mix: a LLaVA JSON file, a local HF `datasets` source, or generated data.

    How much of it goes into the mix: all of it by default; `count: N` (or the name suffix `#N`, as in
    ms-swift's `llava_pretrain#3000`) takes N records drawn deterministically from `data.seed` (whole
    repetitions first when N is larger than the source); `weight: w` takes round(w x its size).
    """

    name: str = MISSING
    # llava_json | hf | tiny_world_caption | tiny_world_instruct | synthetic_caption | synthetic_instruct
    kind: str = "llava_json"
    path: Optional[str] = None  # llava_json: the file (null: data.path)
    image_root: Optional[str] = None  # llava_json / hf: folder that relative image paths resolve in
    count: Optional[int] = None
    weight: Optional[float] = None
    num_records: int = 64  # synthetic sources only
    # hf sources: datasets.load_dataset(builder, data_files=..., split=...), columns mapped to a record
    builder: str = "json"  # json | parquet | arrow | csv | a local dataset folder
    data_files: Optional[Any] = None
    split: str = "train"
    columns: dict[str, Optional[str]] = field(
        default_factory=lambda: {"conversations": "conversations", "image": "image", "id": "id"})


@dataclass
class DataConfig:
    name: str = MISSING
    sources: list[SourceConfig] = field(default_factory=list)
    seed: int = 0
    cache_dir: Optional[str] = None
    preflight_records: int = 256
    # The ad-hoc LLaVA JSON source: `data=llava_json data.path=FILE data.image_root=DIR`.
    path: Optional[str] = None
    image_root: Optional[str] = None
    # Bad records (docs/data.md#bad-samples; data/verdict.py): `error` stops at the first one (naming file,
    # record, id and reason); `skip` leaves them out, counts them by reason in summary.json, and stops when
    # their share passes max_bad_fraction, or when more than max_bad_in_a_row consecutive samples of a source
    # fail to encode (each is replaced by the next that encodes; past that, the source looks broken).
    # `python -m vlmablate.data.check` applies the same rule.
    on_bad_sample: str = "error"
    max_bad_fraction: float = 0.01
    max_bad_in_a_row: int = 16
    verify_images: bool = False  # also decode every image in the scan, as encoding does (cached with the scan)
    # Records in one epoch of the mix as published, read by `python -m vlmablate.plan` for its time per epoch
    # (null: unknown, the plan gives the time per 1M tokens only). Training counts the data itself.
    size: Optional[int] = None


@dataclass
class StageConfig:
    """A training stage: template, base learning rate, image mode, and where the projector comes from."""

    name: str = MISSING  # align | instruct | single
    template: str = "chat"  # plain (LLaVA: caption + "\n") | plain_eos (caption + EOS) | chat
    lr: float = 2e-5
    image_aspect: str = "pad"  # square | pad | anyres (model.image_aspect, when set, wins)
    # random | length (HF's length grouping) | modality_length (LLaVA's group_by_modality_length) |
    # modality_megabatch (HF's megabatches within each modality) | sorted (fixed batches); see data/sampler.py
    sampler: str = "modality_megabatch"
    # The recipe's global batch (LLaVA: 256 in stage 1, 128 in stage 2); presets with
    # train.gradient_accumulation_steps=null derive their accumulation from it.
    global_batch_size: Optional[int] = None
    # A composed model's projector is fresh: instruct needs stage-1 weights, single trains it from scratch.
    requires_pretrained_projector: bool = False


@dataclass
class TrainConfig:
    """TrainingArguments preset (only the fields vlmablate reads or sets)."""

    name: str = MISSING
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: Optional[int] = 1  # null = stage.global_batch_size / (batch × world size)
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    # Multiplies every component's learning rate (ratios kept): the recipe's LRs suit 7B models; the
    # tiny world's presets scale them up so that a few hundred CPU steps learn something.
    lr_scale: float = 1.0
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # The LM head only on the positions the loss reads (the labelled ones, shifted by one; train/loss.py): the
    # same loss and gradients without the full (batch, sequence, vocabulary) logits. false: the library's
    # full-logits path, for debugging.
    labelled_logits_only: bool = True
    logging_steps: int = 1
    progress: bool = True  # progress bars
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    dataloader_num_workers: int = 0
    seed: int = 42
    deepspeed: Optional[str] = None  # a name under conf/deepspeed/ (zero2, zero3) or a JSON path
    # PyTorch FSDP (TrainingArguments.fsdp / fsdp_config): e.g. "full_shard auto_wrap"; "" = off.
    fsdp: str = ""
    fsdp_config: Optional[dict[str, Any]] = None
    # DDP: whether some trainable parameter can miss a step's graph (null: decided from the plan and
    # the data: a mix with text-only samples leaves the vision side out of those steps).
    ddp_find_unused_parameters: Optional[bool] = None
    ddp_backend: Optional[str] = None  # null: gloo on CPU, nccl on CUDA (accelerate's choice)
    use_cpu: bool = False
    export_merged: bool = False  # LoRA runs: also write a merged Llava checkpoint
    # Resume: null = start fresh; auto = the newest complete checkpoint in the run directory (a fresh
    # start when there is none); or a checkpoint folder.
    resume: Optional[str] = None
    # On SIGTERM (preemption, scancel): write a checkpoint at the end of the current step, then stop.
    checkpoint_on_sigterm: bool = True
    # torch.use_deterministic_algorithms, cuDNN deterministic, no cuDNN benchmark, CUBLAS workspace
    # (TrainingArguments.full_determinism): identical results on a GPU too, at a cost in speed.
    deterministic: bool = False
    # Record which records each optimizer step trained on (all ranks) in data_order.json.
    record_data_order: bool = False
    # The device's peak TFLOP/s for train.mfu (per device); null: the GPU table (bf16 dense, train/mfu.py), or a
    # measured fp32 matmul rate on the CPU. An unknown GPU without it leaves mfu null.
    peak_tflops: Optional[float] = None


@dataclass
class RetentionConfig:
    """What stage 2 cost the LM on text alone (eval/retention.py): the loss on a text-only set before and
    after training. The tiny world scores text-only dialogues of the kind its LM was pretrained on; a real
    model scores `data` (null: retention is off for real models)."""

    enabled: bool = True
    # a LLaVA-format JSON of text-only conversations (scored on the assistant tokens, as training scores
    # them) or a JSONL of {"text": ...} lines (scored on every token)
    data: Optional[str] = None
    max_items: Optional[int] = None  # the first N records of `data` (null: all)
    n_world: int = 150  # tiny world: text-only dialogues generated, always the same ones
    # tiny world: held-out board-reading questions per kind and answer format that the LM answers before and
    # after (its pretrained skill, read through the trained model's LM); 0: off
    reading_per_kind: int = 25  # 18 kinds and formats x 25: about 4.5 s a first run, 2 s with the base cached
    batch_size: int = 32  # items per forward, in order of length
    max_length: Optional[int] = None  # longer items are cut from the end (null: model.max_length)
    # lm-evaluation-harness tasks run on the LM's text path before and after training (eval/lm_eval_retention.py;
    # the optional extra: pip install "vlmablate[lmeval]"); empty: none
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include_path: Optional[str] = None  # a folder of task YAMLs of your own (lm-eval's --include_path)
    lm_eval_limit: Optional[int] = None  # the first N documents of each task (null: all)
    lm_eval_num_fewshot: Optional[int] = None  # null: each task's own n-shot
    lm_eval_batch_size: int = 8


@dataclass
class EvalConfig:
    """Evaluation after training (and by `python -m vlmablate.eval`)."""

    name: str = "none"
    tasks: list[str] = field(default_factory=list)  # mmbench, textvqa
    # generate: greedy + exact matching (comparable to published MMBench numbers);
    # likelihood: option-letter scores at the answer position (fast, for sweeps)
    mode: str = "generate"
    # generate mode's answer extraction: the exact-matching rule of this VLMEvalKit revision (README: Evaluation)
    extraction: str = DEFAULT_EXTRACTION
    tsv: Optional[str] = None  # an MMBench TSV; null = the tiny world's benchmark
    # dev: every row has its answer and is scored | test: no answers; writes MMBench's submission file
    split: str = "dev"
    circular: str = "auto"  # auto | expand (rotate options when the file has no copies) | off
    vqa_json: Optional[str] = None  # a TextVQA-layout JSON; null = the tiny world's open-ended set
    vqa_image_root: Optional[str] = None
    use_ocr: bool = True
    text_only_baseline: bool = False  # also score MMBench and VQA with a blank image
    batch_size: int = 16
    # generation's length limit (likelihood mode generates nothing); eval=mmbench: LLaVA's 1024, so a
    # sentence-long reply is scored and submitted whole; eval=tiny_world: 8, its replies are one word
    max_new_tokens: int = 8
    max_questions: Optional[int] = None
    n_boot: int = 1000
    wandb_samples: int = 32  # predictions (with images) in a wandb.Table
    retention: RetentionConfig = field(default_factory=RetentionConfig)


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "vlmablate"
    entity: Optional[str] = None
    group: Optional[str] = None
    mode: str = "auto"  # auto (offline without an API key) | online | offline
    tags: list[str] = field(default_factory=list)


@dataclass
class CellConfig:
    """A named cell of the reference freeze grid: it picks `vision` and `freeze` together (`none`: leave them)."""

    name: str = "none"
    label: str = ""  # how the report names the cell (the reference freeze table's wording)
    vision: Optional[str] = None  # the vision policy and freeze option the cell stands for
    freeze: Optional[str] = None


@dataclass
class PlanConfig:
    """`python -m vlmablate.plan`: the GPU to fit, and the sequence length of the memory and FLOPs estimates."""

    gpu_gb: float = 24.0  # an RTX 4090
    seq_len: Optional[int] = None  # null: model.max_length (the worst case)
    grid: bool = True  # also plan the reference freeze table's four cells
    gpu: str = "rtx4090"  # the GPU of the time estimate: a key of train/mfu.py's GPU_PEAKS (its bf16 dense peak)
    mfu: float = 0.35  # the model FLOPs utilisation the time estimate assumes
    # Assistant (labelled) tokens a sample, for the logits term under train.labelled_logits_only (at most
    # the sequence length). LLaVA's answers run to a few hundred tokens; long text-only chats have more.
    labelled_tokens: int = 512


@dataclass
class ReportConfig:
    """What a sweep's report decides on (`python -m vlmablate.report` takes the same as arguments; `plan` decides
    on `budgets` from its estimates): GPU memory (`24GiB`, or a plain number of GiB) and/or wall-clock per run
    (`2h`, `30min`, `90s`) budgets, and the most retention loss a pick may have (null: retention is not asked)."""

    budgets: list[str] = field(default_factory=lambda: ["24GiB", "80GiB"])  # one RTX 4090; one A100 or H100
    max_retention_loss: Optional[float] = None


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    vision: VisionConfig = MISSING
    projector: ProjectorConfig = MISSING
    freeze: FreezeConfig = MISSING
    quant: QuantConfig = MISSING
    data: DataConfig = MISSING
    stage: StageConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    world: WorldConfig = MISSING
    cell: CellConfig = field(default_factory=CellConfig)
    run_dir: Optional[str] = None  # `python -m vlmablate.eval run_dir=PATH`: the finished run to evaluate
    plan: PlanConfig = field(default_factory=PlanConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "vision": VisionConfig,
    "projector": ProjectorConfig,
    "freeze": FreezeConfig,
    "quant": QuantConfig,
    "data": DataConfig,
    "stage": StageConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "logger": LoggerConfig,
    "world": WorldConfig,
    "cell": CellConfig,
}


def register_configs() -> None:
    """Register the run schema and one `base_<group>` schema per group (YAML files extend them)."""
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


# --- cross-field rules ----------------------------------------------------------------------------

AUTO = "auto"
COMPOSED_SOURCES = ("compose", "tiny_world")  # models whose projector starts fresh

_CHOICES = {
    "model.source": ("pretrained", "compose", "tiny_random", "tiny_world"),
    "model.tiny.arch": ("llava", "llava_next"),
    "model.torch_dtype": ("auto", "float32", "bfloat16", "float16"),
    "vision.policy": ("frozen", "unfrozen", "lora", "last_n"),
    "projector.type": ("mlp2x_gelu", "linear"),
    "freeze.policy": ("frozen", "lora", "full"),
    "quant.mode": ("none", "nf4", "int8"),
    "quant.storage": (None, "uint8", "bfloat16", "float16", "float32"),
    "stage.name": ("align", "instruct", "single"),
    "stage.template": ("plain", "plain_eos", "chat"),
    "stage.image_aspect": ("square", "pad", "anyres"),
    "model.image_aspect": (None, "square", "pad", "anyres"),
    "data.on_bad_sample": ("error", "skip"),
    "stage.sampler": ("random", "length", "modality_length", "modality_megabatch", "sorted"),
    "logger.name": ("none", "wandb"),
    "eval.mode": ("generate", "likelihood"),
    "eval.circular": ("auto", "expand", "off"),
    "eval.split": ("dev", "test"),
    "eval.extraction": tuple(EXTRACTIONS),
    "logger.mode": ("auto", "online", "offline"),
}


def _get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_run_config(cfg: Any) -> RunConfig:
    """Turn a composed DictConfig into typed `RunConfig` objects (once, at the edge)."""
    if isinstance(cfg, RunConfig):
        return cfg
    # Through a plain container: a key forced in with `++group.key=...` must still fail the schema.
    plain = OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), plain))


def _override_keys(overrides: Sequence[str]):
    """(key, value) of command-line overrides such as `+freeze.lora.r=64`."""
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        yield key, value


def validate(cfg: RunConfig, overrides: Sequence[str] = ()) -> None:
    """Check every rule that spans groups; raise ConfigError naming what to change.

    `overrides` are the command line's (Hydra's `hydra.overrides.task`): LoRA settings typed for a
    component whose policy has no LoRA are an error, not something to ignore silently.
    """
    for dotted, choices in _CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(map(str, choices))}")

    vision_trains = cfg.vision.policy != "frozen"
    if not (vision_trains or cfg.projector.trainable or cfg.freeze.policy != "frozen"):
        raise ConfigError(
            "nothing is trainable: vision=frozen, projector.trainable=false and freeze=frozen_llm. "
            "Train at least one part, e.g. projector.trainable=true or freeze=lora_llm."
        )
    if cfg.vision.policy == "last_n" and cfg.vision.last_n < 1:
        raise ConfigError("vision=last_n needs vision.last_n >= 1 (the number of final encoder blocks to train)")
    if cfg.vision.policy != "last_n" and cfg.vision.last_n:
        raise ConfigError(f"vision.last_n={cfg.vision.last_n} is set but vision={cfg.vision.policy}; use vision=last_n")
    if cfg.quant.mode != "none" and cfg.freeze.policy == "full":
        raise ConfigError(
            f"quant={cfg.quant.mode} with freeze=full_llm: a quantized language model cannot be fully "
            "fine-tuned. Use freeze=lora_llm (QLoRA) or quant=none."
        )
    for key, policy in _override_keys(overrides):
        if key.startswith("freeze.lora") and cfg.freeze.policy != "lora":
            raise ConfigError(f"{key} is set but freeze={cfg.freeze.name} has no LoRA; use freeze=lora_llm or drop it")
        if key.startswith("vision.lora") and cfg.vision.policy != "lora":
            raise ConfigError(f"{key} is set but vision={cfg.vision.policy} has no LoRA; use vision=lora or drop it")
    for name, lora, used in (("freeze.lora", cfg.freeze.lora, cfg.freeze.policy == "lora"),
                             ("vision.lora", cfg.vision.lora, cfg.vision.policy == "lora")):
        if used and (lora.r < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1):
            raise ConfigError(f"{name}: r must be >= 1, alpha > 0 and 0 <= dropout < 1 (got {lora})")
    if cfg.train.bf16 and cfg.train.fp16:
        raise ConfigError("train.bf16 and train.fp16 are both true; pick one")
    _validate_sharding(cfg)
    if cfg.model.source == "compose" and not (cfg.model.vision_checkpoint and cfg.model.llm_checkpoint):
        raise ConfigError("model.source=compose needs model.vision_checkpoint and model.llm_checkpoint")
    if cfg.model.source == "pretrained" and not cfg.model.checkpoint:
        raise ConfigError("model.source=pretrained needs model.checkpoint (a hub id or a local folder)")
    if cfg.model.source not in COMPOSED_SOURCES and cfg.projector.type == "linear":
        raise ConfigError(
            f"projector=linear needs a composed model (model.source=compose or tiny_world); {cfg.model.name} "
            "ships its own mlp2x_gelu projector"
        )
    _validate_projector_lineage(cfg)
    unknown_tasks = sorted(set(cfg.eval.tasks) - {"mmbench", "textvqa"})
    if unknown_tasks:
        raise ConfigError(f"eval.tasks has unknown task(s) {unknown_tasks}; use mmbench and/or textvqa")
    if "mmbench" in cfg.eval.tasks and cfg.eval.tsv is None and cfg.model.source not in ("tiny_world", "tiny_random"):
        raise ConfigError(f"eval={cfg.eval.name} on {cfg.model.name} needs eval.tsv=FILE (an MMBench TSV, e.g. "
                          "MMBench_DEV_EN.tsv), or eval=none")
    if "textvqa" in cfg.eval.tasks and cfg.eval.vqa_json is None and cfg.model.source not in ("tiny_world",
                                                                                              "tiny_random"):
        raise ConfigError(f"eval={cfg.eval.name} on {cfg.model.name} needs eval.vqa_json=FILE and "
                          "eval.vqa_image_root=DIR, or eval=none")
    _validate_retention(cfg)
    _validate_data(cfg.data)
    _validate_question_weights(cfg.world.question_weights)
    _validate_report(cfg.report)
    if cfg.cell.name != "none" and (cfg.vision.policy, cfg.freeze.name) != (cfg.cell.vision, cfg.cell.freeze):
        raise ConfigError(f"cell={cfg.cell.name} is vision={cfg.cell.vision} freeze={cfg.cell.freeze}, but the run has "
                          f"vision={cfg.vision.policy} freeze={cfg.freeze.name}; drop the vision/freeze overrides "
                          "or the cell")


def _validate_sharding(cfg: RunConfig) -> None:
    """DeepSpeed or FSDP, and what QLoRA under FSDP needs (bitsandbytes' FSDP-QLoRA guide)."""
    quant, fsdp = cfg.quant, bool(cfg.train.fsdp)
    if cfg.train.deepspeed and fsdp:
        raise ConfigError(f"train.deepspeed={cfg.train.deepspeed} and train.fsdp={cfg.train.fsdp!r} are both set; "
                          "pick one")
    if quant.storage is not None and quant.mode != "nf4":
        raise ConfigError(f"quant.storage={quant.storage} is the storage dtype of 4-bit weights; quant={quant.mode} "
                          "has none. Use quant=nf4 or drop quant.storage")
    if fsdp and quant.mode == "int8":
        raise ConfigError("quant=int8 under FSDP: FSDP shards only floating-point tensors and 8-bit weights are int8; "
                          "use quant=nf4 quant.storage=bfloat16 (FSDP-QLoRA)")
    if fsdp and quant.mode == "nf4":
        if quant.storage in (None, "uint8"):
            raise ConfigError("QLoRA under FSDP: FSDP shards only floating-point tensors, so the 4-bit weights need "
                              "a float storage dtype; set quant.storage=bfloat16 model.torch_dtype=bfloat16")
        if cfg.model.torch_dtype != quant.storage:
            raise ConfigError(f"QLoRA under FSDP: model.torch_dtype={cfg.model.torch_dtype} but quant.storage="
                              f"{quant.storage}; FSDP wraps a layer's weights together only when they share one "
                              f"dtype, so set model.torch_dtype={quant.storage}")


def _validate_report(report: ReportConfig) -> None:
    """A typo in a budget fails before the sweep runs, not when its report is written."""
    from vlmablate.report.decision import parse_budgets, parse_max_retention_loss

    try:
        parse_budgets(report.budgets)
        parse_max_retention_loss(report.max_retention_loss)
    except ValueError as err:
        raise ConfigError(f"report: {err}") from None


def _validate_question_weights(weights) -> None:
    from vlmablate.world.language import CATEGORIES

    unknown = sorted(set(weights) - set(CATEGORIES))
    bad = {k: v for k, v in weights.items() if not v > 0}
    if unknown or bad:
        raise ConfigError(f"world.question_weights: {'unknown categories ' + str(unknown) if unknown else ''}"
                          f"{'; ' if unknown and bad else ''}{'weights must be > 0, got ' + str(bad) if bad else ''} "
                          f"(categories: {', '.join(CATEGORIES)})")


SOURCE_KINDS = ("llava_json", "hf", "tiny_world_caption", "tiny_world_instruct", "synthetic_caption",
                "synthetic_instruct")


def split_subset(name: str) -> Optional[tuple[str, int]]:
    """`llava_pretrain#3000` -> ("llava_pretrain", 3000); a name without `#N` -> (name, None)."""
    base, sep, count = name.rpartition("#")
    if not sep:
        return name, None
    if not count.isdigit() or int(count) < 1 or not base:
        raise ConfigError(f"data source name {name!r}: the subset suffix must be #N with N >= 1 records")
    return base, int(count)


def _validate_data(data: DataConfig) -> None:
    if not data.sources:
        raise ConfigError(f"data={data.name} lists no sources")
    if not 0 <= data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={data.max_bad_fraction} must lie in [0, 1]")
    if data.max_bad_in_a_row < 0:
        raise ConfigError(f"data.max_bad_in_a_row={data.max_bad_in_a_row} must be >= 0")
    for k, source in enumerate(data.sources):
        where = f"data.sources.{k} ({source.name})"
        if source.kind not in SOURCE_KINDS:
            raise ConfigError(f"{where}: kind={source.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        _, suffix = split_subset(source.name)
        given = [x for x in (suffix, source.count, source.weight) if x is not None]
        if len(given) > 1:
            raise ConfigError(f"{where}: give one of the #N suffix, count and weight, not several")
        if source.count is not None and source.count < 1:
            raise ConfigError(f"{where}: count={source.count} must be >= 1")
        if source.weight is not None and source.weight <= 0:
            raise ConfigError(f"{where}: weight={source.weight} must be > 0")
        if source.kind == "llava_json" and not (source.path or data.path):
            raise ConfigError(f"{where}: a llava_json source needs a file: data.path=FILE (and data.image_root=DIR) "
                              f"or data.sources.{k}.path")
        if source.kind == "hf" and not source.data_files and "/" not in source.builder:
            raise ConfigError(f"{where}: an hf source needs data_files (or builder set to a local dataset folder)")


def _validate_projector_lineage(cfg: RunConfig) -> None:
    path = cfg.model.pretrained_projector
    if cfg.stage.name == "align" and path and path != AUTO:
        raise ConfigError("stage=align trains a projector from scratch; drop model.pretrained_projector")
    if path == AUTO:
        if not cfg.model.stage1_data:
            raise ConfigError(
                "model.pretrained_projector=auto needs model.stage1_data (the data option stage 1 trains on, "
                "e.g. llava_pretrain_558k)"
            )
        return
    if path is None:
        if cfg.stage.requires_pretrained_projector and cfg.model.source in COMPOSED_SOURCES:
            raise ConfigError(
                f"stage={cfg.stage.name} on a composed model needs stage-1 projector weights: set "
                "model.pretrained_projector=RUN_DIR/projector (from a stage=align run), or use stage=single "
                "to train a fresh projector without alignment"
            )
        return
    # Imported here: projector_io brings torch, which no other rule needs.
    from vlmablate.model.projector_io import read_projector_meta

    meta_path = Path(path)
    if not meta_path.exists():
        raise ConfigError(
            f"model.pretrained_projector={path} does not exist; point it at the `projector` folder of a "
            "stage=align run"
        )
    meta = read_projector_meta(meta_path)
    if meta["projector_type"] != cfg.projector.type:
        raise ConfigError(
            f"model.pretrained_projector={path} holds a {meta['projector_type']} projector but "
            f"projector={cfg.projector.type}; set projector={meta['projector_type']}"
        )


def _validate_retention(cfg: RunConfig) -> None:
    ret = cfg.eval.retention
    if ret.n_world < 1 or ret.batch_size < 1 or (ret.max_items is not None and ret.max_items < 1):
        raise ConfigError(f"eval.retention: n_world ({ret.n_world}), batch_size ({ret.batch_size}) and max_items "
                          f"({ret.max_items}) must be >= 1")
    if ret.reading_per_kind < 0:
        raise ConfigError(f"eval.retention.reading_per_kind={ret.reading_per_kind}: questions per kind, >= 0 (0: off)")
    if ret.enabled and ret.data is not None:
        path = Path(ret.data)
        if not path.is_file():
            raise ConfigError(f"eval.retention.data={ret.data} is not a file")
        if path.suffix not in (".json", ".jsonl"):
            raise ConfigError(f"eval.retention.data={ret.data}: a LLaVA-format .json of text-only conversations "
                              "or a .jsonl of {\"text\": ...} lines, not a *" + path.suffix + " file")
    if ret.enabled and ret.lm_eval_tasks:
        _validate_lm_eval(ret)


def _validate_lm_eval(ret: RetentionConfig) -> None:
    """lm-eval installed and sane settings; whether lm-eval knows the tasks is checked before training
    (train/runner.validate_cell: indexing lm-eval's tasks takes seconds)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"eval.retention.lm_eval_tasks={list(ret.lm_eval_tasks)} needs lm-evaluation-harness, "
                          'which is not installed; install it with: pip install "vlmablate[lmeval]"')
    if ret.lm_eval_batch_size < 1 or (ret.lm_eval_limit is not None and ret.lm_eval_limit < 1) or (
            ret.lm_eval_num_fewshot is not None and ret.lm_eval_num_fewshot < 0):
        raise ConfigError(f"eval.retention: lm_eval_batch_size ({ret.lm_eval_batch_size}) and lm_eval_limit "
                          f"({ret.lm_eval_limit}) must be >= 1, lm_eval_num_fewshot ({ret.lm_eval_num_fewshot}) >= 0")
    if ret.lm_eval_include_path is not None and not Path(ret.lm_eval_include_path).is_dir():
        raise ConfigError(f"eval.retention.lm_eval_include_path={ret.lm_eval_include_path} is not a folder (of "
                          "lm-eval task YAMLs)")


def cache_root(configured: Optional[str] = None) -> Path:
    """Where built checkpoints, generated data and stage-1 runs are kept: the configured folder,
    else $VLMABLATE_CACHE, else ~/.cache/vlmablate."""
    import os

    return Path(configured or os.environ.get("VLMABLATE_CACHE") or Path.home() / ".cache" / "vlmablate").expanduser()


def config_hash(cfg: RunConfig | dict) -> str:
    """A short stable hash of a resolved config (used to name and find artifacts)."""
    import hashlib

    data = cfg if isinstance(cfg, dict) else OmegaConf.to_container(OmegaConf.structured(cfg))
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
