"""distil-train: distil a Hugging Face masked-LM teacher into a student with the DistilBERT recipe.

:class:`TrainConfig` holds every option; :func:`parse_args` derives one flag per field (dashes for
underscores) from the field's type, default and ``help`` metadata; :func:`main` runs
:class:`distil.train.Trainer`. Also ``python -m distil.train`` and ``python -m distil.cli``.
"""
import argparse
import dataclasses
import sys
import typing
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _option(default=dataclasses.MISSING, help="", **extra):
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class TrainConfig:
    """Every option of the trainer (the CLI flags are these names with dashes). Defaults are the
    paper's recipe, except ``batch_size``/``grad_accum`` which are per run."""

    teacher: str = _option(help="local Hugging Face masked-LM model directory (safetensors + tokenizer)")
    data: list[str] = _option(help="text files, or folders of *.txt, one document per line")
    output_dir: str = _option(help="where checkpoints, metrics.jsonl and the student go")
    student: str | None = _option(None, "start from this student model directory instead of building one")
    student_layers: int | None = _option(None, "student depth (default: half the teacher's layers)")
    as_distilbert: bool = _option(False, "build a DistilBertForMaskedLM student (BERT teachers only)")
    max_length: int = _option(512, "longest sequence in tokens; longer lines are split")
    batch_size: int = _option(5, "sequences per micro-batch and process")
    grad_accum: int = _option(50, "micro-batches accumulated per optimizer step")
    epochs: int = _option(3, "passes over the data (unless --max-steps)")
    max_steps: int | None = _option(None, "optimizer steps in total (overrides --epochs)")
    lr: float = _option(5e-4, "peak learning rate of AdamW")
    weight_decay: float = _option(0.0, "AdamW weight decay")
    warmup: float = _option(0.05, "fraction of the steps with a linear learning-rate warm-up")
    adam_eps: float = _option(1e-6, "AdamW epsilon")
    max_grad_norm: float = _option(5.0, "gradient clipping norm")
    alpha_kl: float = _option(5.0, "weight of the KL loss between teacher and student")
    alpha_mlm: float = _option(2.0, "weight of the student's masked-LM loss")
    alpha_cos: float = _option(1.0, "weight of the cosine loss between last hidden states")
    temperature: float = _option(2.0, "softmax temperature of the KL loss")
    restrict_kl_to_mask: bool = _option(False, "KL on masked tokens only (default: every non-pad token)")
    mask_prop: float = _option(0.15, "fraction of tokens masked")
    word_mask: float = _option(0.8, "share of masked tokens replaced by the mask token")
    word_keep: float = _option(0.1, "share of masked tokens kept unchanged")
    word_rand: float = _option(0.1, "share of masked tokens replaced by a random token")
    smoothing: float = _option(0.7, "masking probability proportional to count^-smoothing")
    seed: int = _option(56, "random seed (data order, masking, dropout)")
    precision: str = _option("auto", "autocast on GPU (auto = bf16); CPU runs fp32", choices=PRECISIONS)
    save_every: int = _option(500, "write a checkpoint every this many steps")
    log_every: int = _option(10, "write metrics every this many steps")
    resume: bool = _option(False, "continue from the checkpoint in --output-dir")
    progress: bool = _option(True, "show a progress bar")

    def validate(self):
        from distil._ops import common as _validate

        for name in ("batch_size", "grad_accum", "epochs", "save_every", "log_every", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None, got {self.max_steps!r}")
        _validate.check_positive_finite("lr", self.lr)
        _validate.check_positive_finite("max_grad_norm", self.max_grad_norm)
        _validate.check_positive_finite("temperature", self.temperature)
        _validate.check_non_negative_finite("weight_decay", self.weight_decay)
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not Path(self.teacher).is_dir():
            raise ValueError(f"teacher must be a local model directory, got {self.teacher!r}")
        if not self.data:
            raise ValueError("data must name at least one text file or folder")


def _add_flag(parser, field):
    """One flag for one field, from its type, default and metadata alone."""
    flag = "--" + field.name.replace("_", "-")
    meta = dict(field.metadata)
    help_text = meta.pop("help")
    required = field.default is dataclasses.MISSING
    if field.type is bool:
        if field.default:  # on by default: the flag turns it off
            parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_false", help=help_text + " (on by default)")
        else:
            parser.add_argument(flag, action="store_true", help=help_text)
        return
    kind = field.type
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    kwargs = {}
    if typing.get_origin(kind) is list:
        kwargs["nargs"] = "+"
    if args:
        kind = args[0]
    suffix = " (required)" if required else " (default: %(default)s)"
    parser.add_argument(flag, type=kind, required=required, help=help_text + suffix,
                        **({} if required else {"default": field.default}), **kwargs, **meta)


def build_parser():
    parser = argparse.ArgumentParser(prog="distil-train", description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(TrainConfig):
        _add_flag(parser, field)
    return parser


def parse_args(argv=None) -> TrainConfig:
    """CLI flags → :class:`TrainConfig` (one flag per field, dashes for underscores)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def main(argv=None):
    """Console entry point ``distil-train`` (also ``python -m distil.train``)."""
    import torch.distributed as dist

    from distil.train import NonFiniteLossError, Trainer

    config = parse_args(argv)
    trainer = None
    try:
        trainer = Trainer(config)
        status = trainer.fit()
    except NonFiniteLossError as err:
        print(f"distil-train: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"distil-train: {status} at step {trainer.step}; output in {config.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
