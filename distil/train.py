"""The DistilBERT recipe as a thin trainer: ``python -m distil.train`` / ``distil-train``.

Equivalent of the paper's ``train.py`` + ``Distiller`` (Hugging Face
``examples/research_projects/distillation``) with the MLM objective, on our fused path:

- teacher frozen, ``eval()``, half precision on GPU; student from :func:`distil.student.build_student`
  (every other teacher layer) unless ``--student`` names a directory;
- dynamic masking (:class:`distil.masking.MLMMasker`) of length-grouped batches
  (:class:`distil.data.LengthGroupedBatches`);
- loss :class:`distil.fused_loss.DistillationLoss` on gathered rows only: the bodies run on the whole
  batch, :func:`distil.ops.masked_gather` selects the KL rows (non-pad, or masked only with
  ``--restrict-kl-to-mask``), and both LM heads run on those rows alone; the cosine uses the non-pad
  rows' last hidden states;
- AdamW (betas 0.9/0.98, eps 1e-6), linear warmup (5%) then linear decay, gradient accumulation,
  clipping at 5.0, bf16/fp16 autocast on GPU;
- DDP under ``torchrun`` (NCCL on GPU, gloo on CPU); checkpoints (atomic) with model, optimizer,
  scheduler, RNG states and reader position; ``--resume`` continues bit-exactly; SIGTERM saves a
  checkpoint and exits cleanly; a non-finite loss stops the run and keeps the last good checkpoint.

One optimizer step reads one *global* batch of ``batch_size * grad_accum * world_size`` sequences, masks
it as a whole, cuts it into ``grad_accum * world_size`` near-equal slices and hands micro-batch ``a``
of rank ``r`` slice ``a * world_size + r``. So K ranks with accumulation A compute exactly what one process with accumulation A·K computes
(the mean over micro-batches of each micro-batch's mean loss, as ``distiller.py`` does).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from distil._ops import common as _validate
from distil.data import LengthGroupedBatches, load_corpus
from distil.fused_loss import DistillationLoss
from distil.masking import MLMMasker, token_counts
from distil.ops import masked_gather
from distil.student import build_student, lm_adapter, save_student

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


@dataclasses.dataclass
class TrainConfig:
    """Every option of the trainer (the CLI flags are these names with dashes). Defaults are the
    paper's recipe (REFERENCE.md), except ``batch_size``/``grad_accum`` which are per run."""

    teacher: str
    data: list
    output_dir: str
    student: str | None = None
    student_layers: int | None = None
    as_distilbert: bool = False
    max_length: int = 512
    batch_size: int = 5
    grad_accum: int = 50
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    adam_eps: float = 1e-6
    max_grad_norm: float = 5.0
    alpha_kl: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    restrict_kl_to_mask: bool = False
    mask_prop: float = 0.15
    word_mask: float = 0.8
    word_keep: float = 0.1
    word_rand: float = 0.1
    smoothing: float = 0.7
    seed: int = 56
    precision: str = "auto"
    save_every: int = 500
    log_every: int = 10
    resume: bool = False
    progress: bool = True

    def validate(self):
        for name in ("batch_size", "grad_accum", "epochs", "save_every", "log_every", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None, got {self.max_steps!r}")
        _validate.check_positive_finite("lr", self.lr)
        _validate.check_positive_finite("max_grad_norm", self.max_grad_norm)
        _validate.check_non_negative_finite("weight_decay", self.weight_decay)
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not Path(self.teacher).is_dir():
            raise ValueError(f"teacher must be a local model directory, got {self.teacher!r}")
        if not self.data:
            raise ValueError("data must name at least one text file or folder")


def text_files(paths):
    """The text files named by ``paths``: files as given, folders expanded to their ``*.txt`` (sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.txt")))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"data path {str(p)!r} is neither a file nor a folder")
    if not files:
        raise ValueError(f"data: no .txt files under {list(map(str, paths))}")
    return files


def select_rows(adapter, input_ids, attention_mask, kl_mask, cos_mask):
    """Body on the whole batch, LM head on the KL rows only. Returns (logits [M, V] of the ``kl_mask``
    rows, last hidden rows [M', H] of the ``cos_mask`` rows; the KL rows themselves when ``cos_mask``
    is None). The eager equivalent is ``model(...).logits[kl_mask]`` and ``hidden_states[-1][cos_mask]``."""
    hidden = adapter.body(input_ids, attention_mask)
    kl_hidden = masked_gather(hidden, kl_mask)[0]
    cos_hidden = kl_hidden if cos_mask is None else masked_gather(hidden, cos_mask)[0]
    return adapter.head(kl_hidden), cos_hidden


class StudentRows(nn.Module):
    """The student's part of a step as one module, so that DDP wrapping it sees a forward call
    (the adapter calls the model's submodules directly, which would bypass DDP's hooks)."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self._adapter = lm_adapter(student)

    def forward(self, input_ids, attention_mask, kl_mask, cos_mask):
        return select_rows(self._adapter, input_ids, attention_mask, kl_mask, cos_mask)


class DistillationStep:
    """Loss of one micro-batch on the fused path (used by the trainer and by benchmarks/bench_step.py).

    ``__call__(input_ids, attention_mask, labels)`` returns the :class:`DistillationLoss` result for
    masked ``input_ids`` [B, S], ``attention_mask`` [B, S] and ``labels`` [B, S] (-100 where not
    masked). Equals ``Distiller.step`` of ``distiller.py`` in MLM mode (KL on every non-pad token, or
    on masked tokens only with ``restrict_kl_to_mask``; CE on masked tokens; cosine on non-pad
    tokens' last hidden states) without materialising the [B, S, V] logits.
    ``student_rows`` is a :class:`StudentRows` or the DDP module that wraps one.
    """

    def __init__(self, student_rows, teacher, loss_fn, *, restrict_kl_to_mask=False, autocast_dtype=None):
        self.student_rows = student_rows
        self.teacher_adapter = lm_adapter(teacher)
        self.loss_fn = loss_fn
        self.restrict_kl_to_mask = restrict_kl_to_mask
        self.autocast_dtype = autocast_dtype

    def __call__(self, input_ids, attention_mask, labels):
        non_pad = attention_mask.bool()
        # restrict: KL rows = masked rows (MLM rows = KL rows) and the cosine needs its own non-pad gather;
        # default: KL rows = non-pad rows ⊇ MLM rows, and the cosine reuses them.
        kl_mask, cos_mask = (labels != -100, non_pad) if self.restrict_kl_to_mask else (non_pad, None)
        device_type = input_ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            with torch.no_grad():
                t_logits, t_hidden = select_rows(self.teacher_adapter, input_ids, attention_mask, kl_mask, cos_mask)
            s_logits, s_hidden = self.student_rows(input_ids, attention_mask, kl_mask, cos_mask)
        # Pre-gathered rows: with restrict the cosine rows (non-pad) differ from the KL/MLM rows (masked),
        # which DistillationLoss accepts when no attention mask is passed.
        return self.loss_fn(s_logits, t_logits, labels[kl_mask], s_hidden, t_hidden, None)


def _load_teacher(path, device, dtype):
    from transformers import AutoModelForMaskedLM

    # safetensors only, and never remote code: a teacher directory is data, not a program.
    teacher = AutoModelForMaskedLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    teacher.requires_grad_(False).eval()
    return teacher.to(device=device, dtype=dtype)


def _autocast_dtype(precision, device):
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision {precision} needs a CUDA device; use fp32 (or auto) on {device}")
        return None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def _atomic_save(obj, path):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs :meth:`fit`. Under ``torchrun`` (the
    ``WORLD_SIZE`` environment variable > 1) it joins the process group itself."""

    def __init__(self, config: TrainConfig):
        from transformers import AutoTokenizer, get_linear_schedule_with_warmup

        config.validate()
        self.config = config
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.autocast_dtype = _autocast_dtype(config.precision, self.device)
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed + self.rank)  # dropout differs per rank, as in distiller.py

        self.tokenizer = AutoTokenizer.from_pretrained(config.teacher, trust_remote_code=False)
        teacher_dtype = None if self.device.type == "cpu" else (self.autocast_dtype or torch.float16)
        self.teacher = _load_teacher(config.teacher, self.device, teacher_dtype)
        if config.student is not None:
            from transformers import AutoModelForMaskedLM

            student = AutoModelForMaskedLM.from_pretrained(config.student, use_safetensors=True, trust_remote_code=False)
        else:
            student = build_student(self.teacher, num_layers=config.student_layers, as_distilbert=config.as_distilbert)
        self.student = student.to(device=self.device, dtype=torch.float32).train()
        rows = StudentRows(self.student)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            rows = nn.parallel.DistributedDataParallel(rows, device_ids=ids)
        self.rows = rows
        loss_fn = DistillationLoss(
            alpha_kl=config.alpha_kl,
            alpha_mlm=config.alpha_mlm,
            alpha_cos=config.alpha_cos,
            temperature=config.temperature,
            restrict_kl_to_mask=config.restrict_kl_to_mask,
        )
        self.step_fn = DistillationStep(
            rows, self.teacher, loss_fn, restrict_kl_to_mask=config.restrict_kl_to_mask,
            autocast_dtype=self.autocast_dtype,
        )

        sequences = load_corpus(text_files(config.data), self.tokenizer, max_length=config.max_length)
        if not sequences:
            raise ValueError("data: no sequence survived tokenisation and filtering")
        vocab = len(self.tokenizer)
        self.masker = MLMMasker(
            vocab,
            special_ids=self.tokenizer.all_special_ids,
            mask_id=self.tokenizer.mask_token_id,
            counts=token_counts(sequences, vocab),
            mask_prop=config.mask_prop,
            word_mask=config.word_mask,
            word_keep=config.word_keep,
            word_rand=config.word_rand,
            smoothing=config.smoothing,
        )
        self.mask_generator = torch.Generator().manual_seed(config.seed)
        self.micro_batches = config.grad_accum * self.world_size
        self.batches = LengthGroupedBatches(
            sequences, config.batch_size * self.micro_batches, config.seed, self.tokenizer.pad_token_id
        )
        self.total_steps = config.max_steps or config.epochs * len(self.batches)

        self.optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=config.lr, betas=(0.9, 0.98), eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, math.ceil(config.warmup * self.total_steps), self.total_steps
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.step = 0
        self._batch_iter = None
        self._stop_requested = False

    # -- data ---------------------------------------------------------------------------------
    def _next_global_batch(self):
        for _ in range(2):
            if self._batch_iter is None:
                self._batch_iter = iter(self.batches)
            batch = next(self._batch_iter, None)
            if batch is not None:
                return batch
            self._batch_iter = None  # epoch over: the reader starts the next one
        raise RuntimeError("data reader yielded no batch for a whole epoch")

    def _micro_batches(self):
        """This rank's ``grad_accum`` micro-batches of the next global batch, as (ids, attn, labels,
        weight): the batch is cut into ``grad_accum * world_size`` near-equal slices (sizes as
        ``torch.tensor_split``) and micro-batch ``a`` of rank ``r`` is slice ``a * world_size + r``.
        A slice left empty by a short last batch reuses slice 0 with weight 0, so that every rank
        still runs the same forward/backward collectives."""
        batch = self._next_global_batch()
        ids, attn = batch["input_ids"], batch["attention_mask"]
        masked, labels = self.masker(ids, attn, self.mask_generator)
        n, k = ids.shape[0], self.micro_batches
        starts = [i * (n // k) + min(i, n % k) for i in range(k + 1)]
        for a in range(self.config.grad_accum):
            c = a * self.world_size + self.rank
            weight = 1.0 if starts[c + 1] > starts[c] else 0.0
            sl = slice(starts[c], starts[c + 1]) if weight else slice(0, starts[1])
            width = int(attn[sl].sum(1).max())  # trim the global batch's padding to this slice's longest
            yield (*(t[sl, :width].to(self.device, non_blocking=True) for t in (masked, attn, labels)), weight)

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self):
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (a dict)."""
        cfg = self.config
        parts = torch.zeros(4, device=self.device)  # total, kl, mlm, cos: summed over micro-batches
        tokens = torch.zeros((), dtype=torch.long, device=self.device)
        micro = list(self._micro_batches())
        for i, (ids, attn, labels, weight) in enumerate(micro):
            last = i == len(micro) - 1
            sync = self.rows.no_sync() if (self.world_size > 1 and not last) else contextlib.nullcontext()
            with sync:
                out = self.step_fn(ids, attn, labels)
                self.scaler.scale(out.total * (weight / cfg.grad_accum)).backward()
            parts += weight * torch.stack([out.total, out.kl, out.mlm, out.cos]).detach().float()
            tokens += int(weight) * attn.sum()
        parts /= cfg.grad_accum
        if self.world_size > 1:
            dist.all_reduce(parts)
            dist.all_reduce(tokens)
            parts /= self.world_size
        values = parts.tolist()
        if not all(math.isfinite(v) for v in values):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"loss is not finite at step {self.step + 1} (total, kl, mlm, cos = {values}); stopping. "
                f"The last good checkpoint is {self.output_dir / CHECKPOINT} (resume with --resume)."
            )
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "step": self.step,
            "loss": values[0],
            "kl": values[1],
            "mlm": values[2],
            "cos": values[3],
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens": int(tokens),
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def _rng_state(self):
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world_size == 1:
            return [state]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    def save_checkpoint(self):
        """Write ``checkpoint.pt`` atomically (rank 0): a temporary file, then a rename."""
        rng = self._rng_state()  # collective: every rank takes part
        if self.rank == 0:
            _atomic_save(
                {
                    "step": self.step,
                    "model": self.student.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": rng,
                    "mask_generator": self.mask_generator.get_state(),
                    "data": self.batches.state_dict(),
                    "world_size": self.world_size,
                },
                self.output_dir / CHECKPOINT,
            )
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self):
        path = self.output_dir / CHECKPOINT
        if not path.is_file():
            raise ValueError(f"resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["world_size"] != self.world_size:
            raise ValueError(
                f"resume: the checkpoint was written by {ckpt['world_size']} processes, this run has "
                f"{self.world_size}; a bit-exact resume needs the same world size"
            )
        self.student.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"][self.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.mask_generator.set_state(ckpt["mask_generator"])
        self.batches.load_state_dict(ckpt["data"])
        self._batch_iter = None
        self.step = ckpt["step"]

    # -- the run --------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        self._stop_requested = True

    def _should_stop(self):
        flag = torch.tensor([float(self._stop_requested)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag)  # every rank stops at the same step, or the next collective hangs
        return bool(flag.item())

    def fit(self, max_steps=None):
        """Train until ``max_steps`` (default: the configured total) or SIGTERM. Returns
        ``"done"`` or ``"interrupted"``; the final student is saved under ``output_dir/student``
        when done. Raises :class:`NonFiniteLossError` on a NaN/inf loss."""
        cfg = self.config
        if cfg.resume and self.step == 0:
            self.load_checkpoint()
        end = min(max_steps or self.total_steps, self.total_steps)
        main_rank = self.rank == 0
        bar = tqdm(total=end, initial=self.step, disable=not (cfg.progress and main_rank), desc="distil")
        metrics_file = open(self.output_dir / METRICS, "a") if main_rank else None
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            t0 = time.perf_counter()
            while self.step < end:
                m = self.train_step()
                now = time.perf_counter()
                m["tokens_per_s"] = m["tokens"] / max(now - t0, 1e-9)
                t0 = now
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", kl=f"{m['kl']:.4f}", mlm=f"{m['mlm']:.4f}",
                                cos=f"{m['cos']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                if metrics_file and (self.step % cfg.log_every == 0 or self.step == end):
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                stop = self._should_stop()
                if stop or self.step % cfg.save_every == 0 or self.step == end:
                    self.save_checkpoint()
                if stop:
                    return "interrupted"
            if main_rank:
                save_student(self.student, self.output_dir / "student", self.tokenizer)
            return "done"
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
            signal.signal(signal.SIGTERM, previous)


def parse_args(argv=None) -> TrainConfig:
    """CLI flags → :class:`TrainConfig` (one flag per field, dashes for underscores)."""
    parser = argparse.ArgumentParser(prog="distil-train", description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if field.name == "data":
            parser.add_argument(flag, nargs="+", required=True, help="text files or folders of *.txt")
        elif field.name in ("teacher", "output_dir"):
            parser.add_argument(flag, required=True)
        elif field.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        elif field.name == "precision":
            parser.add_argument(flag, default=default, choices=["auto", "fp32", "bf16", "fp16"])
        else:
            kind = {"student": str, "student_layers": int, "max_steps": int}.get(field.name, type(default))
            parser.add_argument(flag, type=kind, default=default)
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv=None):
    """Console entry point ``distil-train`` (also ``python -m distil.train``)."""
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
