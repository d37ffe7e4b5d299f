"""distil-train: distil a Hugging Face masked-LM or causal-LM teacher into a student with the DistilBERT recipe.

:class:`TrainConfig` holds every option; :func:`parse_args` derives one flag per field (dashes for
underscores) from the field's type, default and ``help`` metadata; :func:`main` runs
:class:`distil.train.Trainer`. Also ``python -m distil.train`` and ``python -m distil.cli``.
Nothing heavy is imported before the flags are parsed, so ``--help`` and flag errors are immediate.

The output layout and the exit codes are in :data:`EPILOG` (the end of ``--help``).
"""
import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_DIVERGED, EXIT_ABORTED = 0, 1, 2, 3, 4, 130
EPILOG = """output directory:
  checkpoint-<step>/   a student model directory (from_pretrained loads it) + training_state.pt
  metrics.jsonl        one JSON object per line: training metrics averaged over --log-every steps,
                       validation metrics (eval_*); non-finite values are null, listed in non_finite
  student/             the final student (from_pretrained loads it)
  runs/                TensorBoard events (--report-to tensorboard)

exit codes:
  0    finished
  1    error: a bad value, a missing, unreadable or mismatched file (one line on stderr), checked
       before any model loads; an error during training writes a checkpoint first
  2    bad command line
  3    interrupted by SIGINT (Ctrl-C) or SIGTERM: the current step finished and a checkpoint was
       written; continue with --resume
  4    diverged: a loss, the gradient norm or a parameter became NaN/inf; nothing non-finite was saved
  130  stopped by Ctrl-C while loading, or by a second Ctrl-C before the checkpoint was written
"""
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
                                              "--smoothing, --teacher only gives the tokenizer and (without "
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
        from distil._ops.common import check_non_negative_finite, check_positive_finite

        for name in ("batch_size", "grad_accum", "epochs", "save_every", "log_every", "max_length", "eval_every",
                     "eval_max_sequences", "max_steps", "save_total_limit", "block_size"):
            value, low = getattr(self, name), {"max_steps": 0, "block_size": 2}.get(name, 1)
            if name in ("max_steps", "save_total_limit", "block_size") and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("lr", "max_grad_norm", "temperature", "adam_eps"):
            check_positive_finite(name, getattr(self, name))
        for name in ("weight_decay", "alpha_kl", "alpha_mlm", "alpha_clm", "alpha_cos"):
            if getattr(self, name) is not None:
                check_non_negative_finite(name, getattr(self, name))
        if self.alpha_kl == self.alpha_lm == self.alpha_cos == 0:
            raise ValueError(f"alpha_kl, {self.lm_alpha_name} and alpha_cos are all 0: nothing to train")
        for name in ("warmup", "eval_fraction"):
            if check_non_negative_finite(name, getattr(self, name)) >= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1), got {getattr(self, name)}")
        for name, choices in (("precision", PRECISIONS), ("report_to", REPORT_TO)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not Path(self.teacher).is_dir():
            raise ValueError(f"teacher must be a local model directory, got {self.teacher!r}")
        if self.student is not None and not Path(self.student).is_dir():
            raise ValueError(f"student must be a local model directory, got {self.student!r}")
        if not self.data:
            raise ValueError("data must name at least one text file or folder")
        self._validate_model_kind()
        if self.teacher_cache is not None:
            self._validate_cache()
        if self.resume and self.overwrite_output_dir:
            raise ValueError("resume and overwrite_output_dir exclude each other: continue the run or replace it")


    @property
    def alpha_lm(self):
        """The language-modelling loss weight: ``alpha_mlm`` or ``alpha_clm``, whichever is given (2.0 by default)."""
        return next((a for a in (self.alpha_mlm, self.alpha_clm) if a is not None), 2.0)

    @property
    def lm_alpha_name(self):
        return "alpha_clm" if self.alpha_clm is not None else "alpha_mlm"

    def causal_teacher(self):
        """Whether the teacher is a causal LM: its config.json's architecture is an ``AutoModelForCausalLM``
        class (e.g. GPT2LMHeadModel; BertForMaskedLM is not). Reads the config only, no weights."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if not (Path(self.teacher) / "config.json").is_file():
            raise ValueError(f"teacher: {Path(self.teacher) / 'config.json'} not found; teacher must be a Hugging Face "
                             "model directory")
        architectures = AutoConfig.from_pretrained(self.teacher, trust_remote_code=False).architectures or []
        return bool(architectures) and architectures[0] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def _validate_model_kind(self):
        """The flags that belong to the other kind of teacher and a cosine between hidden states of
        different sizes, from the models' config.json files alone."""
        from transformers import AutoConfig

        causal = self.causal_teacher()
        kind = "a causal LM" if causal else "a masked LM"
        wrong = (("alpha_mlm", self.alpha_mlm is not None, "use --alpha-clm"),
                 ("restrict_kl_to_mask", self.restrict_kl_to_mask, "a causal step masks nothing"),
                 ("as_distilbert", self.as_distilbert, "DistilBERT students come from BERT teachers"),
                 ("teacher_cache", self.teacher_cache is not None, "the cache holds masked-LM passes"),
                 ) if causal else (("alpha_clm", self.alpha_clm is not None, "use --alpha-mlm"),
                                   ("block_size", self.block_size is not None, "masked LMs take one document per row"))
        for name, given, hint in wrong:
            if given:
                raise ValueError(f"{name} is not for {kind} teacher ({self.teacher}): {hint}")
        if not causal:
            return
        configs = {"teacher": AutoConfig.from_pretrained(self.teacher, trust_remote_code=False)}
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

    def _validate_cache(self):
        """What training from ``teacher_cache`` needs, from the cache's files alone (its index checked,
        every shard's header and size: distil.teacher_cache.TeacherCache), before any model loads."""
        from distil.teacher_cache import read_index

        index = read_index(self.teacher_cache)
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


def build_parser():
    parser = argparse.ArgumentParser(prog="distil-train", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        _add_flag(parser, field)
    return parser


def parse_args(argv=None) -> TrainConfig:
    """CLI flags → :class:`TrainConfig` (one flag per field, dashes for underscores)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def _error(message, code=EXIT_ERROR):
    print(f"distil-train: error: {message}", file=sys.stderr)
    return code


def main(argv=None):
    """Console entry point ``distil-train`` (also ``python -m distil.train``); returns the exit code."""
    config = parse_args(argv)
    try:
        config.validate()
    except (ValueError, TypeError) as err:
        return _error(err)
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from distil.train import NonFiniteError, StepError, Trainer

    hf_logging.disable_progress_bar()  # per-file load/save bars would break ours and the log lines

    try:
        try:
            trainer = Trainer(config)
        except (ValueError, TypeError, OSError) as err:
            return _error(err)
        status = trainer.fit()
    except NonFiniteError as err:
        return _error(err, EXIT_DIVERGED)
    except StepError as err:  # Trainer.fit wrote a checkpoint first and says where
        return _error(err)
    except KeyboardInterrupt:  # Ctrl-C while setting up, or a second one while training
        return _error(f"stopped by Ctrl-C; the newest checkpoint in {config.output_dir}, if any, is the one to "
                      "--resume from", EXIT_ABORTED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.rank == 0:
        where = (f"student in {trainer.output_dir / 'student'}" if status == "done"
                 else f"checkpoint in {trainer.output_dir}; continue with --resume")
        print(f"distil-train: {status} at step {trainer.step}; {where}", file=sys.stderr)
    return EXIT_OK if status == "done" else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
