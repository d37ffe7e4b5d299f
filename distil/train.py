"""The DistilBERT recipe's training loop: :class:`Trainer` (run by ``distil-train``, see :mod:`distil.cli`;
``python -m distil.train`` runs the same CLI).

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
import contextlib
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

from distil.data import LengthGroupedBatches, load_corpus, text_files
from distil.fused_loss import DistillationLoss
from distil.masking import MLMMasker, token_counts
from distil.step import DistillationStep, StudentRows
from distil.student import build_student, save_student

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


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
    """Builds everything from a :class:`distil.cli.TrainConfig` and runs :meth:`fit`. Under ``torchrun`` (the
    ``WORLD_SIZE`` environment variable > 1) it joins the process group itself."""

    def __init__(self, config):
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
                # The exact factor of the backward (GradScaler's scale / grad_accum, a device tensor: no
                # sync), announced to the loss so that its gradient is written for it: a free backward,
                # and fp16 gradient rows written at their final scale, not rescaled from tiny values.
                loss_scale = self.scaler.scale(torch.full((), weight / cfg.grad_accum, device=self.device))
                out = self.step_fn(ids, attn, labels, grad_scale=loss_scale)
                (out.total * loss_scale).backward()
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


if __name__ == "__main__":
    from distil.cli import main

    sys.exit(main())
