"""The options of ``distil-train`` (:class:`TrainConfig`) and the flag machinery its CLI and
``distil-eval``'s share: one flag per dataclass field, derived from its type, default and ``help``
metadata (:func:`_add_flag`). Torch-free: :mod:`distil.cli` parses and validates with it before anything
heavy is imported, and :mod:`distil.train` takes a :class:`TrainConfig` without importing the CLI."""
import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path

from distil.checks import (
    DIVERGENCES,
    JSD_BETA,
    SKEW_ALPHA,
    check_choice,
    check_divergence,
    check_fraction,
    check_int,
    check_masking,
    check_model_dir,
    check_non_negative_finite,
    check_positive_finite,
    check_temperature,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard")


def _option(default=dataclasses.MISSING, help="", **extra):
    """A config field with its flag's help text (a list default is copied per instance)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class TrainConfig:
    """Every option of the trainer (the CLI flags are these names with dashes). Defaults are the
    paper's recipe, except ``batch_size``/``grad_accum`` which are per run."""

    teacher: str = _option(help="local Hugging Face model directory (safetensors + tokenizer): a masked LM, or a "
                                "causal LM (GPT-2, LLaMA, Qwen2/3, Mistral, Gemma2/3), which its config.json names")
    data: list[str] = _option(help="text files, or folders of *.txt, one document per line")
    output_dir: str = _option(help="where checkpoint-<step>/, metrics.jsonl and student/ go; must be empty "
                                   "unless --resume or --overwrite-output-dir")
    overwrite_output_dir: bool = _option(False, "remove the previous run's checkpoints, metrics and student "
                                                "from --output-dir and start afresh")
    student: str | None = _option(None, "start from this student model directory, a smaller model of the teacher's "
                                        "tokenizer (default: build one from the teacher)")
    teacher_cache: str | None = _option(None, "train from this teacher cache (distil-cache-teacher) instead of running "
                                              "the teacher: its masked passes replace --mask-* / --word-* / "
                                              "--smoothing (a causal teacher's cache: --block-size must be the "
                                              "cache's), --teacher only gives the tokenizer and (without "
                                              "--student) the student's first weights, --temperature must be the "
                                              "cache's, --alpha-cos must be 0 unless the cache was built with "
                                              "--hidden, and there is no validation split")
    student_layers: int | None = _option(None, "student depth (default: half the teacher's layers)")
    as_distilbert: bool = _option(False, "build a DistilBertForMaskedLM student (BERT teachers only)")
    max_length: int = _option(512, "longest sequence in tokens; longer lines are split")
    batch_size: int = _option(5, "sequences per micro-batch and process")
    grad_accum: int = _option(50, "micro-batches accumulated per optimizer step")
    epochs: int = _option(3, "passes over the data (unless --max-steps)")
    max_steps: int | None = _option(None, "optimizer steps in total; 0 saves the initial student "
                                          "(default: --epochs passes over the data)")
    lr: float = _option(5e-4, "peak learning rate of AdamW")
    weight_decay: float = _option(0.0, "AdamW weight decay")
    warmup: float = _option(0.05, "fraction of the steps with a linear learning-rate warm-up")
    adam_eps: float = _option(1e-6, "AdamW epsilon")
    max_grad_norm: float = _option(5.0, "gradient clipping norm")
    alpha_kl: float = _option(5.0, "weight of the KL loss between teacher and student")
    alpha_mlm: float | None = _option(None, "weight of the student's masked-LM loss (masked-LM teachers; default 2.0)")
    alpha_clm: float | None = _option(None, "weight of the student's next-token loss (causal-LM teachers; default 2.0)")
    alpha_cos: float = _option(1.0, "weight of the cosine loss between last hidden states")
    temperature: float = _option(2.0, "softmax temperature of the KL loss")
    divergence: str = _option("forward_kl", "the KL loss's divergence: the paper's forward KL, the reverse KL, the "
                                            "generalised JSD (TRL's GKD), DistiLLM's skew KLs or the total variation "
                                            "distance (distil.fused_loss.kl_ce_loss)", choices=DIVERGENCES)
    jsd_beta: float | None = _option(None, f"beta of --divergence jsd, in [0, 1] (default {JSD_BETA})")
    skew_alpha: float | None = _option(None, f"alpha of --divergence skew_kl / skew_reverse_kl, in [0, 1) "
                                             f"(default {SKEW_ALPHA})")
    restrict_kl_to_mask: bool = _option(False, "KL on masked tokens only (default: every non-pad token)")
    fused_head: bool = _option(True, "the LM heads' projections fused into the KL+CE loss (linear_kl_ce_loss), the "
                                     "student's with a --teacher-cache: the [rows, V] logits are never built")
    block_size: int | None = _option(None, "causal LMs: pack the documents into blocks of this many tokens "
                                           "(default: one document per row, padded per batch)")
    mask_prop: float = _option(0.15, "fraction of tokens masked")
    word_mask: float = _option(0.8, "share of masked tokens replaced by the mask token")
    word_keep: float = _option(0.1, "share of masked tokens kept unchanged")
    word_rand: float = _option(0.1, "share of masked tokens replaced by a random token")
    smoothing: float = _option(0.7, "masking probability proportional to count^-smoothing")
    fsdp: bool = _option(False, "shard the student with FSDP2 (fully_shard: each transformer layer, then the rest) "
                                "across the torchrun processes instead of replicating it (DDP); the frozen "
                                "teacher is not sharded; checkpoints hold the whole student")
    seed: int = _option(56, "random seed (data order, masking, dropout)")
    precision: str = _option("auto", "autocast on GPU (auto = bf16); CPU runs fp32", choices=PRECISIONS)
    save_every: int = _option(500, "write a checkpoint-<step>/ folder every this many steps")
    save_total_limit: int | None = _option(None, "keep only the newest this many checkpoints (default: keep all)")
    resume: bool = _option(False, "continue from the newest readable checkpoint in --output-dir (same flags)")
    log_every: int = _option(10, "log training metrics averaged over this many steps")
    report_to: str = _option("none", "also log to TensorBoard (output-dir/runs; needs tensorboard)",
                             choices=REPORT_TO)
    eval_fraction: float = _option(0.01, "fraction of the sequences held out for validation (0: none)")
    eval_max_sequences: int = _option(1000, "at most this many held-out sequences")
    eval_every: int = _option(500, "validate every this many steps (and at the end)")
    progress: bool = _option(True, "no progress bar: metrics are printed as lines instead")

    def validate(self):
        """Every value checked before anything heavy loads; raises ValueError/TypeError naming the flag."""
        # The library's own checks and ranges (distil.checks): the same message as the loss, the masker
        # and the data reader would give after the models loaded.
        lows = {"max_steps": 0, "seed": 0, "block_size": 2, "max_length": 3}  # max_length: load_corpus's frame
        for name in ("batch_size", "grad_accum", "epochs", "save_every", "log_every", "max_length", "eval_every",
                     "eval_max_sequences", "seed", "max_steps", "save_total_limit", "block_size", "student_layers"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), lows.get(name, 1))
        for name in ("lr", "max_grad_norm", "adam_eps"):
            check_positive_finite(name, getattr(self, name))
        check_temperature("temperature", self.temperature)
        check_divergence(**self.divergence_args())
        for name, owners in (("jsd_beta", ("jsd",)), ("skew_alpha", ("skew_kl", "skew_reverse_kl"))):
            if getattr(self, name) is not None and self.divergence not in owners:
                raise ValueError(f"{name} is a parameter of divergence {' / '.join(owners)}, not of "
                                 f"{self.divergence}")
        for name in ("weight_decay", "alpha_kl", "alpha_mlm", "alpha_clm", "alpha_cos"):
            if getattr(self, name) is not None:
                check_non_negative_finite(name, getattr(self, name))
        if self.alpha_kl == self.alpha_lm == self.alpha_cos == 0:
            raise ValueError(f"alpha_kl, {self.lm_alpha_name} and alpha_cos are all 0: nothing to train")
        for name in ("warmup", "eval_fraction"):
            check_fraction(name, getattr(self, name))
        check_masking(self.mask_prop, self.word_mask, self.word_keep, self.word_rand, self.smoothing)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("report_to", self.report_to, REPORT_TO)
        if self.fsdp:
            world_size = os.environ.get("WORLD_SIZE", "1")
            if not world_size.isdigit() or int(world_size) < 2:
                raise ValueError(f"fsdp shards the student across processes, but WORLD_SIZE is {world_size}: run "
                                 "under torchrun with 2 or more processes (torchrun --nproc-per-node N distil-train "
                                 "--fsdp ...)")
            if self.precision == "fp16":
                raise ValueError("fsdp does not take precision fp16 (the GradScaler would skip an overflowing step "
                                 "on one rank only): use bf16 (or auto)")
        if not Path(self.teacher).is_dir():
            raise ValueError(f"teacher must be a local model directory, got {self.teacher!r}")
        check_model_dir("teacher", self.teacher, tokenizer=True)
        if self.student is not None:
            if not Path(self.student).is_dir():
                raise ValueError(f"student must be a local model directory, got {self.student!r}")
            check_model_dir("student", self.student)
        if not self.data:
            raise ValueError("data must name at least one text file or folder")
        from distil.data import text_files

        text_files(self.data)
        causal = self._validate_model_kind()
        if self.teacher_cache is not None:
            self._validate_cache(causal)
        if self.resume and self.overwrite_output_dir:
            raise ValueError("resume and overwrite_output_dir exclude each other: continue the run or replace it")

    def divergence_args(self):
        """``divergence``, ``jsd_beta``, ``skew_alpha`` as DistillationLoss takes them (defaults filled in)."""
        return dict(divergence=self.divergence, jsd_beta=JSD_BETA if self.jsd_beta is None else self.jsd_beta,
                    skew_alpha=SKEW_ALPHA if self.skew_alpha is None else self.skew_alpha)

    @property
    def alpha_lm(self):
        """The language-modelling loss weight: ``alpha_mlm`` or ``alpha_clm``, whichever is given (2.0 by default)."""
        return next((a for a in (self.alpha_mlm, self.alpha_clm) if a is not None), 2.0)

    @property
    def lm_alpha_name(self):
        return "alpha_clm" if self.alpha_clm is not None else "alpha_mlm"

    def causal_teacher(self):
        """Whether the teacher is a causal LM (:func:`distil.student.causal_lm_directory`: its config.json alone)."""
        from distil.student import causal_lm_directory

        return causal_lm_directory("teacher", self.teacher)

    def _validate_model_kind(self):
        """The flags that belong to the other kind of teacher and a cosine between hidden states of
        different sizes, from the models' config.json files alone. Returns whether the
        teacher is a causal LM."""
        from transformers import AutoConfig

        causal = self.causal_teacher()
        kind = "a causal LM" if causal else "a masked LM"
        wrong = (("alpha_mlm", self.alpha_mlm is not None, "use --alpha-clm"),
                 ("restrict_kl_to_mask", self.restrict_kl_to_mask, "a causal step masks nothing"),
                 ("as_distilbert", self.as_distilbert, "DistilBERT students come from BERT teachers"),
                 ) if causal else (("alpha_clm", self.alpha_clm is not None, "use --alpha-mlm"),
                                   ("block_size", self.block_size is not None, "masked LMs take one document per row"))
        for name, given, hint in wrong:
            if given:
                raise ValueError(f"{name} is not for {kind} teacher ({self.teacher}): {hint}")
        configs = {"teacher": AutoConfig.from_pretrained(self.teacher, trust_remote_code=False)}
        teacher_layers = getattr(configs["teacher"], "num_hidden_layers", None)
        if self.student is None and self.student_layers is not None and teacher_layers is not None:
            check_int("student_layers", self.student_layers, 1, teacher_layers)  # build_student's range
        if not causal:
            return False
        if self.student is not None and (Path(self.student) / "config.json").is_file():
            configs["student"] = AutoConfig.from_pretrained(self.student, trust_remote_code=False)
        # A row longer than the position table would fail inside the first step.
        length, flag = ((self.block_size, "block_size") if self.block_size is not None
                        else (self.max_length, "max_length"))
        for name, config in configs.items():
            limit = getattr(config, "max_position_embeddings", None)
            if limit is not None and length > limit:
                raise ValueError(f"{flag} is {length} but the {name} ({getattr(self, name)}) has {limit} positions")
        sizes = {name: config.hidden_size for name, config in configs.items()}
        if self.alpha_cos > 0 and len(set(sizes.values())) > 1:
            raise ValueError(f"alpha_cos is {self.alpha_cos} but the student's hidden size {sizes['student']} differs "
                             f"from the teacher's {sizes['teacher']}: the cosine needs equal sizes; pass --alpha-cos 0")
        return True

    def _validate_cache(self, causal):
        """What training from ``teacher_cache`` needs, from the cache's files alone (its index checked,
        every shard's header and size: distil.teacher_cache.TeacherCache), before any model loads:
        a cache of the teacher's kind (causal or masked) and, for a causal one, of this --block-size."""
        from distil.teacher_cache import read_index

        index = read_index(self.teacher_cache)
        if index.get("causal", False) != causal:
            kinds = ("a causal LM", "a masked LM")
            raise ValueError(f"teacher_cache {self.teacher_cache} was built from {kinds[not index.get('causal')]} but "
                             f"the teacher ({self.teacher}) is {kinds[not causal]}")
        if causal and index.get("block_size") != self.block_size:
            raise ValueError(f"block_size is {self.block_size} but the teacher cache {self.teacher_cache} was built "
                             f"with --block-size {index.get('block_size')}: the teacher saw those rows; pass the same")
        if index.get("temperature") != self.temperature:
            raise ValueError(f"temperature is {self.temperature} but the teacher cache stores the teacher's logsumexp "
                             f"at T = {index.get('temperature')}: pass --temperature {index.get('temperature')}")
        if self.alpha_cos > 0 and "hidden" not in index.get("dtypes", {}):
            raise ValueError(f"alpha_cos is {self.alpha_cos} but the teacher cache has no hidden states: pass "
                             "--alpha-cos 0, or rebuild the cache with distil-cache-teacher --hidden")

class _Extend(argparse.Action):
    """``nargs="+"`` that accumulates over repeats (``--seeds 0 1 --seeds 2`` is 0 1 2, where argparse's
    default would keep the last) and replaces the default rather than extending it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (list(current) if current is not self.default else []) + list(values))


def _add_flag(parser, field):
    """One flag for one field (of TrainConfig, or distil-eval's EvalConfig), from its type, default and
    metadata alone: ``X | None`` takes an X, ``list[X]`` one or more (repeats accumulate), a bool is a
    switch (``--no-...`` when on by default)."""
    flag = "--" + field.name.replace("_", "-")
    meta = dict(field.metadata)
    help_text = meta.pop("help")
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    required = default is dataclasses.MISSING
    if field.type is bool:
        if default:  # on by default: the flag turns it off
            parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_false", help=help_text)
        else:
            parser.add_argument(flag, action="store_true", help=help_text)
        return
    kind = field.type
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    kwargs = {}
    if typing.get_origin(kind) is list:
        kwargs.update(nargs="+", action=_Extend)
        kind = typing.get_args(kind)[0]
    # A None default means "derived": its help text says from what.
    suffix = " (required)" if required else "" if default is None else " (default: %(default)s)"
    parser.add_argument(flag, type=kind, required=required, help=help_text + suffix,
                        **({} if required else {"default": default}), **kwargs, **meta)


