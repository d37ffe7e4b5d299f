"""The DistilBERT recipe's training loop: :class:`Trainer` (run by ``distil-train``, see :mod:`distil.cli`).

Equivalent of the paper's ``train.py`` + ``Distiller`` (Hugging Face
``examples/research_projects/distillation``) with the MLM objective, or with ``--mlm`` off for causal-LM
teachers (picked from the teacher's config: next-token labels :func:`distil.step.causal_labels`, no
masking, documents padded per batch or packed into ``--block-size`` blocks), on our fused path:

- teacher frozen, ``eval()``, half precision on GPU; student from :func:`distil.student.build_student`
  (every other teacher layer) unless ``--student`` names a directory;
- dynamic masking (:class:`distil.masking.MLMMasker`) of length-grouped batches
  (:class:`distil.data.LengthGroupedBatches`);
- loss :class:`distil.fused_loss.DistillationLoss` on gathered rows only (:class:`distil.step.DistillationStep`),
  the output projections fused into the KL+CE loss (:func:`distil.fused_loss.linear_kl_ce_loss`: no
  ``[rows, V]`` logits; ``--no-fused-head`` builds the logits);
- AdamW (betas 0.9/0.98, eps 1e-6), linear warmup (5%) then linear decay, gradient accumulation,
  clipping at 5.0, bf16/fp16 autocast on GPU;
- DDP under ``torchrun`` (NCCL on GPU, gloo on CPU), or with ``--fsdp`` the student sharded by FSDP2
  (:func:`shard_student`).

Around it, what a run needs: ``checkpoint-<step>/`` folders (:mod:`distil.checkpoint`: a student model
directory plus ``training_state.pt``), written atomically; ``--resume`` continues bit-exactly from the
newest readable one; SIGINT/SIGTERM finish the current step,
write a checkpoint and stop; a non-finite loss, gradient norm or parameter stops the run before it
writes anything non-finite; ``metrics.jsonl`` holds the training metrics averaged over ``--log-every``
steps and the validation metrics (strict JSON); a held-out split is evaluated with uniform 15% masking
(fixed seed) every ``--eval-every`` steps and at the end.

One optimizer step reads one *global* batch of ``batch_size * grad_accum * world_size`` sequences, masks
it as a whole, cuts it into ``grad_accum * world_size`` near-equal slices and hands micro-batch ``a``
of rank ``r`` slice ``a * world_size + r``. So K ranks with accumulation A compute exactly what one process
with accumulation A·K computes (the mean over micro-batches of each micro-batch's mean loss, as
``distiller.py`` does).
"""
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from distil.checkpoint import (
    METRICS,
    RUN_FILES,
    STUDENT,
    TENSORBOARD,
    checkpoints,
    full_student_state,
    load_checkpoint,
    save_checkpoint,
)
from distil.checks import TOKENIZER_FILES
from distil.data import LengthGroupedBatches, load_corpus, pack_blocks, text_files
from distil.fused_loss import DistillationLoss
from distil.masking import MLMMasker, token_counts
from distil.step import DistillationStep, StudentRows, causal_labels, fused_heads
from distil.student import auto_model_class, build_student, layer_list, save_student
from distil.teacher_cache import TeacherCache

EVAL_SEED = 0  # the held-out split and its masking: the same for every run on the same data
EVAL_MASK_PROP = 0.15


class StepError(RuntimeError):
    """A training step failed (an unreadable file, a full disk...); a checkpoint of the last finished step
    was written first when possible, and the message says where."""


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or the parameters became NaN or infinite; nothing non-finite was
    written, and the checkpoints on disk are untouched."""


def _load_teacher(path, device, dtype, causal):
    # safetensors only, and never remote code: a teacher directory is data, not a program.
    teacher, info = auto_model_class(causal).from_pretrained(path, use_safetensors=True, trust_remote_code=False,
                                                        output_loading_info=True)
    missing = info["missing_keys"]
    if missing:
        shown = ", ".join(sorted(missing)[:4]) + (", ..." if len(missing) > 4 else "")
        head, cls = ("causal-LM", "...ForCausalLM") if causal else ("masked-LM", "...ForMaskedLM")
        raise ValueError(
            f"teacher: {Path(path) / 'model.safetensors'} lacks {len(missing)} weights of "
            f"{type(teacher).__name__} ({shown}); a teacher needs its {head} head (save the "
            f"{cls} model, not the bare {'decoder' if causal else 'encoder'})")
    teacher.requires_grad_(False).eval()
    return teacher.to(device=device, dtype=dtype)


def _autocast_dtype(precision, device):
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision {precision} needs a CUDA device; use fp32 (or auto) on {device}")
        return None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def shard_student(student_rows):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on the student of a :class:`distil.step.StudentRows`:
    one unit per transformer layer, then the root (embeddings, final norm, LM head), as torchtitan and
    HF Accelerate's FSDP2 wrap decoders. The heads' loss (:class:`distil.fused_loss.LinearKLCELoss`) is
    no unit of its own: a tied head (GPT-2, BERT) is the embedding's parameter, which one unit must hold,
    and the root keeps its parameters gathered from its forward to the end of the backward, when the
    heads' loss runs. Gradients are reduce-scattered (averaged over the ranks) after every micro-batch,
    and the parameters stay fp32 (autocast casts them, as without FSDP)."""
    from torch.distributed.fsdp import fully_shard

    for layer in layer_list(student_rows.student):
        fully_shard(layer)
    fully_shard(student_rows)


def _full_norm(norm):
    """A norm over sharded (DTensor) tensors, as the plain tensor every rank holds."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def json_record(record):
    """A metrics row as strict JSON: non-finite numbers become null and are listed under ``non_finite``."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    clean = {k: (None if k in bad else v) for k, v in record.items()}
    if bad:
        clean["non_finite"] = bad
    return json.dumps(clean, allow_nan=False)


def _console(message):
    tqdm.write(message, file=sys.stderr)


class Trainer:
    """Builds everything from a :class:`distil.config.TrainConfig` and runs :meth:`fit`. Under ``torchrun``
    (the ``WORLD_SIZE`` environment variable > 1) it joins the process group itself. With
    ``config.resume`` it continues from the newest readable checkpoint of ``output_dir``."""

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
        self._prepare_output_dir()
        if config.report_to == "tensorboard":
            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)")
        torch.manual_seed(config.seed + self.rank)  # dropout differs per rank, as in distiller.py

        self.causal = config.causal_teacher()
        self.lm = "clm" if self.causal else "mlm"  # the name of the CE part in the metrics
        self.parts = ("loss", "kl", self.lm, "cos")
        self.tokenizer = AutoTokenizer.from_pretrained(config.teacher, trust_remote_code=False)
        if not self.causal and self.tokenizer.mask_token_id is None:
            raise ValueError(f"teacher: the tokenizer in {config.teacher} has no mask token; "
                             "a masked-LM teacher needs one")
        # Causal tokenizers often have no pad token (GPT-2): the attention mask hides the filler anyway.
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError(f"teacher: the tokenizer in {config.teacher} has neither a pad nor an eos token "
                             "to pad with")
        self._check_student_tokenizer()
        # With a teacher cache the teacher never runs: it is read (on the CPU) only to build the student.
        # The cache is checked whole (every shard) and against this corpus, tokenizer and teacher first.
        self.cache = None if config.teacher_cache is None else TeacherCache(config.teacher_cache)
        if self.cache is not None:
            self.cache.check_sources(text_files(config.data), self.tokenizer, config.teacher)
        if self.cache is None or config.student is None:
            teacher_dtype = None if self.device.type == "cpu" or self.cache else (self.autocast_dtype or torch.float16)
            teacher = _load_teacher(config.teacher, "cpu" if self.cache else self.device, teacher_dtype, self.causal)
            if len(self.tokenizer) > teacher.config.vocab_size:
                raise ValueError(f"teacher: the tokenizer in {config.teacher} has {len(self.tokenizer)} tokens but the "
                                 f"model's vocab_size is {teacher.config.vocab_size}")
        if config.student is not None:
            student = auto_model_class(self.causal).from_pretrained(config.student, use_safetensors=True,
                                                               trust_remote_code=False)
        else:
            student = build_student(teacher, num_layers=config.student_layers, as_distilbert=config.as_distilbert)
        self.teacher = None if self.cache else teacher
        vocab_size = self._vocab_size(student)
        self.student = student.to(device=self.device, dtype=torch.float32).train()
        rows = StudentRows(self.student, vocab_size)
        loss_fn = DistillationLoss(kl_weight=config.alpha_kl, ce_weight=config.alpha_lm, cos_weight=config.alpha_cos,
                                   temperature=config.temperature, **config.divergence_args())
        # Validation runs on rank 0 alone, outside DDP (whose forward would wait for the other ranks); under
        # FSDP every rank runs it (each forward gathers the shards).
        self.eval_step = DistillationStep(rows, self.teacher, loss_fn, restrict_kl_to_mask=config.restrict_kl_to_mask,
                                          autocast_dtype=self.autocast_dtype, vocab_size=vocab_size)
        heads = {}
        # The output projections fused into the KL+CE loss, with the models' logit transforms: no [rows, V]
        # logits. A cached teacher has no head to fuse: the student's head meets its top-k logits.
        # (Their first vocab_size rows when the two pad the vocabulary differently: the adapters' projections.)
        if config.fused_head:
            heads = fused_heads(self.eval_step.student_rows.adapter, self.eval_step.teacher_adapter)
        train_loss_fn = DistillationLoss(kl_weight=config.alpha_kl, ce_weight=config.alpha_lm,
                                         cos_weight=config.alpha_cos, temperature=config.temperature,
                                         **config.divergence_args(), **heads)
        if config.fsdp:  # after the heads' loss is built: it checks that the heads are whole tensors
            shard_student(rows)
        elif self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            rows = nn.parallel.DistributedDataParallel(rows, device_ids=ids)
        self.rows = rows
        self.step_fn = DistillationStep(rows, self.teacher, train_loss_fn,
                                        restrict_kl_to_mask=config.restrict_kl_to_mask,
                                        autocast_dtype=self.autocast_dtype,
                                        cache_temperature=None if self.cache is None else self.cache.temperature,
                                        vocab_size=vocab_size)

        sequences = (self.cache.sequences() if self.cache is not None
                     else load_corpus(text_files(config.data), self.tokenizer, max_length=config.max_length))
        if not sequences:
            raise ValueError("data: no sequence survived tokenisation and filtering (lines of at least 12 tokens "
                             "with under 50% unknown tokens are kept)")
        if config.block_size is not None and self.cache is None:  # a causal cache holds its blocks
            sequences = pack_blocks(sequences, config.block_size)
            if not sequences:
                raise ValueError(f"data: the corpus has fewer tokens than one block (--block-size {config.block_size})")
        # The cache's masked passes cover every sequence: no held-out split (the reader's indices are the cache's).
        train_sequences, eval_sequences = (sequences, []) if self.cache is not None else self._split(sequences)
        vocab = len(self.tokenizer)
        self.masker = None if self.cache is not None or self.causal else MLMMasker(
            vocab,
            special_ids=self.tokenizer.all_special_ids,
            mask_id=self.tokenizer.mask_token_id,
            counts=token_counts(train_sequences, vocab),
            mask_prop=config.mask_prop,
            word_mask=config.word_mask,
            word_keep=config.word_keep,
            word_rand=config.word_rand,
            smoothing=config.smoothing,
        )
        self.eval_batches = self._eval_batches(eval_sequences)
        self.mask_generator = torch.Generator().manual_seed(config.seed)
        self.micro_batches = config.grad_accum * self.world_size
        self.batches = LengthGroupedBatches(
            train_sequences, config.batch_size * self.micro_batches, config.seed, self.pad_id
        )
        self.total_steps = config.max_steps if config.max_steps is not None else config.epochs * len(self.batches)

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
        self.resumed_from = load_checkpoint(self) if config.resume else None

    def _check_student_tokenizer(self):
        """A ``--student`` with tokenizer files must have the teacher's tokenizer (the same token → id map):
        the KL compares the two models' distributions token by token."""
        from transformers import AutoTokenizer

        cfg = self.config
        if cfg.student is None or not any((Path(cfg.student) / f).is_file() for f in TOKENIZER_FILES):
            return
        theirs = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=False)
        if theirs.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"student: the tokenizer in {cfg.student} ({type(theirs).__name__}, {len(theirs)} tokens) "
                             f"is not the teacher's in {cfg.teacher} ({type(self.tokenizer).__name__}, "
                             f"{len(self.tokenizer)} tokens); distillation needs one tokenizer for both")

    def _vocab_size(self, student):
        """The vocabulary both heads are cut to: None (whole heads) when they have the same rows, else the
        tokenizer's real vocabulary (a model may pad it, e.g. Qwen2.5's 152064 vs 151936 rows)."""
        rows = {"student": student.get_output_embeddings().weight.shape[0]}
        if self.teacher is not None:
            rows["teacher"] = self.teacher.get_output_embeddings().weight.shape[0]
        for name, n in rows.items():
            if n < len(self.tokenizer):
                raise ValueError(f"{name}: the model's head has {n} rows but the tokenizer in "
                                 f"{self.config.teacher} has {len(self.tokenizer)} tokens")
        return None if len(set(rows.values())) == 1 else len(self.tokenizer)

    # -- output directory and data -----------------------------------------------------------------
    def _prepare_output_dir(self):
        """Refuse to mix two runs in one folder: a non-empty ``output_dir`` needs ``--resume`` (continue
        it) or ``--overwrite-output-dir`` (remove the previous run's checkpoints, metrics and student)."""
        cfg = self.config
        existing = sorted(p.name for p in self.output_dir.iterdir()) if self.output_dir.is_dir() else []
        if existing and not cfg.resume and not cfg.overwrite_output_dir:
            shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
            raise ValueError(f"output_dir {str(self.output_dir)!r} is not empty ({shown}); pass --resume to continue "
                             "that run or --overwrite-output-dir to replace it")
        if self.world_size > 1:
            dist.barrier()  # every rank has looked before rank 0 removes anything
        if self.rank == 0:
            if existing and cfg.overwrite_output_dir and not cfg.resume:
                for _, path in checkpoints(self.output_dir):
                    shutil.rmtree(path)
                for name in RUN_FILES:
                    path = self.output_dir / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.world_size > 1:
            dist.barrier()

    def _split(self, sequences):
        """(training, held-out) sequences: ``eval_fraction`` of them (at most ``eval_max_sequences``, at
        least 1 when the fraction is > 0), drawn with a fixed seed so every run on this data holds out
        the same ones."""
        cfg = self.config
        n_eval = min(cfg.eval_max_sequences, math.ceil(cfg.eval_fraction * len(sequences)))
        if n_eval and n_eval >= len(sequences):
            raise ValueError(f"eval_fraction: {len(sequences)} sequences leave none for training after holding out "
                             f"{n_eval}; lower --eval-fraction or add data")
        held_out = set(torch.randperm(len(sequences),
                                      generator=torch.Generator().manual_seed(EVAL_SEED))[:n_eval].tolist())
        train = [s for i, s in enumerate(sequences) if i not in held_out]
        return train, [sequences[i] for i in sorted(held_out)]

    def _eval_batches(self, sequences):
        """The held-out sequences as masked batches, masked once: uniform 15% of the tokens, 80/10/10, a
        fixed seed (BERT's standard masked-LM evaluation, comparable across runs and with the teacher).
        Causal LMs: the sequences as they are, with next-token labels."""
        if not sequences:
            return []
        if self.causal:
            return [(b["input_ids"], b["attention_mask"], causal_labels(b["input_ids"], b["attention_mask"]))
                    for b in LengthGroupedBatches(sequences, self.config.batch_size, EVAL_SEED, self.pad_id)]
        masker = MLMMasker(len(self.tokenizer), special_ids=self.tokenizer.all_special_ids,
                           mask_id=self.tokenizer.mask_token_id, mask_prop=EVAL_MASK_PROP, smoothing=0.0)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        batches = []
        for batch in LengthGroupedBatches(sequences, self.config.batch_size, EVAL_SEED, self.pad_id):
            ids, labels = masker(batch["input_ids"], batch["attention_mask"], generator)
            batches.append((ids, batch["attention_mask"], labels))
        return batches

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
        cached teacher tensors or None, weight): the batch is cut into ``grad_accum * world_size``
        near-equal slices (sizes as ``torch.tensor_split``) and micro-batch ``a`` of rank ``r`` is slice
        ``a * world_size + r``.
        A slice left empty by a short last batch reuses slice 0 with weight 0, so that every rank
        still runs the same forward/backward collectives. With a teacher cache the slices are read from it
        one by one, so a rank reads only its own rows of the cache."""
        batch = self._next_global_batch()
        ids, attn = batch["input_ids"], batch["attention_mask"]
        if self.cache is None:
            masked, labels = (ids, causal_labels(ids, attn)) if self.causal else self.masker(ids, attn,
                                                                                              self.mask_generator)
        n, k = ids.shape[0], self.micro_batches
        starts = [i * (n // k) + min(i, n % k) for i in range(k + 1)]
        for a in range(self.config.grad_accum):
            c = a * self.world_size + self.rank
            weight = 1.0 if starts[c + 1] > starts[c] else 0.0
            sl = slice(starts[c], starts[c + 1]) if weight else slice(0, starts[1])
            width = int(attn[sl].sum(1).max())  # trim the global batch's padding to this slice's longest
            cached = None
            if self.cache is None:
                rows = masked[sl, :width], attn[sl, :width], labels[sl, :width]
            else:  # this rank reads its own slices only; epoch e replays the cache's pass e mod passes
                cached = self.cache.batch(batch["epoch"], batch["sequence_index"][sl], width, self.pad_id)
                slice_ids, slice_attn = cached.pop("input_ids"), cached.pop("attention_mask")
                slice_labels = cached.pop("labels") if not self.causal else causal_labels(slice_ids, slice_attn)
                rows = slice_ids, slice_attn, slice_labels
                cached = {name: t.to(self.device, non_blocking=True) for name, t in cached.items()}
            yield (*(t.to(self.device, non_blocking=True) for t in rows), cached, weight)

    # -- one optimizer step ---------------------------------------------------------------------
    def _diverged(self, what, values):
        """A :class:`NonFiniteError` that names what became non-finite and the checkpoint to go back to."""
        self.optimizer.zero_grad(set_to_none=True)
        found = checkpoints(self.output_dir)
        where = (f"The last good checkpoint is {found[0][1]} (continue with --resume, e.g. with a lower --lr)."
                 if found else "No checkpoint was written yet.")
        shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        return NonFiniteError(f"{what} at step {self.step + 1} ({shown}); stopped. {where}")

    def train_step(self):
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (a dict). Raises
        :class:`NonFiniteError` (with the step's metrics as ``.metrics``) before the optimizer moves when
        a loss part or the gradient norm is not finite, and after it when a parameter is not."""
        cfg = self.config
        parts = torch.zeros(4, device=self.device)  # total, kl, mlm, cos: summed over micro-batches
        tokens = torch.zeros((), dtype=torch.long, device=self.device)
        micro = list(self._micro_batches())
        ddp = self.world_size > 1 and not cfg.fsdp  # FSDP reduce-scatters every micro-batch's gradients
        for i, (ids, attn, labels, cached, weight) in enumerate(micro):
            last = i == len(micro) - 1
            sync = self.rows.no_sync() if (ddp and not last) else contextlib.nullcontext()
            with sync:
                # The exact factor of the backward (GradScaler's scale / grad_accum, a device tensor: no
                # sync), announced to the loss so that its gradient is written for it: a free backward,
                # and fp16 gradient rows written at their final scale, not rescaled from tiny values.
                loss_scale = self.scaler.scale(torch.full((), weight / cfg.grad_accum, device=self.device))
                out = self.step_fn(ids, attn, labels, cached, grad_scale=loss_scale)
                (out.total * loss_scale).backward()
            parts += weight * torch.stack([out.total, out.kl, out.ce, out.cos]).detach().float()
            tokens += int(weight) * attn.sum()
        parts /= cfg.grad_accum
        if self.world_size > 1:
            dist.all_reduce(parts)
            dist.all_reduce(tokens)
            parts /= self.world_size
        self.scaler.unscale_(self.optimizer)
        grad_norm = _full_norm(torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm))
        values = torch.cat([parts, grad_norm.reshape(1).float()]).tolist()  # one host sync per step
        metrics = dict(zip(self.parts + ("grad_norm",), values), tokens=int(tokens))
        # fp16: an overflowing gradient is the GradScaler's business (it skips the step and lowers the scale).
        checked = self.parts if self.scaler.is_enabled() else self.parts + ("grad_norm",)
        bad = {k: metrics[k] for k in checked if not math.isfinite(metrics[k])}
        if bad:
            err = self._diverged("not finite: " + ", ".join(bad), bad)
            err.metrics = {"step": self.step + 1, **metrics}
            raise err
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        param_norm = float(_full_norm(torch.nn.utils.get_total_norm(self.student.parameters())))
        if not math.isfinite(param_norm):
            err = self._diverged("the norm of the parameters is not finite after the optimizer step",
                                 {"param_norm": param_norm})
            err.metrics = {"step": self.step + 1, **metrics, "param_norm": param_norm}
            raise err
        self.step += 1
        return {"step": self.step, **metrics, "lr": self.scheduler.get_last_lr()[0]}

    # -- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self):
        """Metrics of the held-out split (rank 0, or every rank under FSDP; None without one), dropout off:
        the distillation losses and the student's masked-LM loss and accuracy (with the teacher's for
        comparison when the KL is on), each averaged over its own rows: logit rows for the KL, masked tokens
        for the masked-LM loss and accuracy, non-pad tokens for the cosine. Causal LMs: the next-token loss
        (log perplexity) and accuracy over every token that has a next one, named ``clm``."""
        if not self.eval_batches:
            return None
        self.student.eval()
        lm = self.lm
        sums = dict.fromkeys(("kl", "cos", lm, f"{lm}_accuracy", f"teacher_{lm}", f"teacher_{lm}_accuracy"), 0.0)
        counts = dict.fromkeys(("kl", "cos", lm), 0)
        loss_fn = self.eval_step.loss_fn
        for ids, attn, labels in self.eval_batches:
            rows = self.eval_step.rows(*(t.to(self.device) for t in (ids, attn, labels)))
            out = loss_fn(*rows, None)
            target = rows.labels != -100
            n_masked = int(target.sum())
            sums["kl"] += float(out.kl) * rows.student_logits.shape[0]
            counts["kl"] += rows.student_logits.shape[0]
            if rows.student_hidden is not None:
                sums["cos"] += float(out.cos) * rows.student_hidden.shape[0]
                counts["cos"] += rows.student_hidden.shape[0]
            counts[lm] += n_masked
            for name, logits in ((lm, rows.student_logits), (f"teacher_{lm}", rows.teacher_logits)):
                if logits is not None and n_masked:
                    masked_logits = logits[target].float()
                    sums[name] += float(F.cross_entropy(masked_logits, rows.labels[target], reduction="sum"))
                    sums[name + "_accuracy"] += float((masked_logits.argmax(-1) == rows.labels[target]).sum())
        self.student.train()
        result = {"step": self.step}
        for name, total in sums.items():
            count = counts[name.removeprefix("teacher_").removesuffix("_accuracy")]
            if name.startswith("teacher") and self.eval_step.loss_fn.kl_weight == 0:
                continue  # the teacher's logits were not computed
            result["eval_" + name] = total / max(count, 1)
        result["eval_loss"] = (loss_fn.kl_weight * result["eval_kl"] + loss_fn.ce_weight * result[f"eval_{lm}"]
                               + loss_fn.cos_weight * result["eval_cos"])
        return result

    # -- the run --------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint on disk stays valid)
        self._stop_requested = True
        if self.rank == 0:
            _console(f"distil-train: {signal.Signals(signum).name} received: finishing step {self.step + 1}, "
                     "then writing a checkpoint (Ctrl-C again to stop at once)")

    def _should_stop(self):
        flag = torch.tensor([float(self._stop_requested)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag)  # every rank stops at the same step, or the next collective hangs
        return bool(flag.item())

    def _log(self, record, bar, writer, metrics_file):
        """One metrics row: ``metrics.jsonl``, TensorBoard, and the console (the bar's postfix, or a line)."""
        if metrics_file:
            metrics_file.write(json_record(record) + "\n")
            metrics_file.flush()
        if writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    group, name = ("eval", key[5:]) if key.startswith("eval_") else ("train", key)
                    writer.add_scalar(f"{group}/{name}", value, record["step"])
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in record.items() if k not in ("step", "steps", "tokens"))
        if bar.disable or "eval_loss" in record:
            _console(f"distil-train: step {record['step']}/{self.total_steps} | {shown}")
        else:
            bar.set_postfix({k: f"{record[k]:.4g}" for k in (*self.parts, "tokens_per_s")}, refresh=False)

    def fit(self, max_steps=None):
        """Train until ``max_steps`` (default: the configured total) or SIGINT/SIGTERM. Returns ``"done"``
        (the student is saved under ``output_dir/student``) or ``"interrupted"`` (a checkpoint of the
        last finished step was written). Raises :class:`NonFiniteError` when training diverges."""
        cfg = self.config
        end = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        main_rank = self.rank == 0
        bar = tqdm(total=end, initial=self.step, disable=not (cfg.progress and main_rank), desc="distil",
                   file=sys.stderr)
        metrics_file = open(self.output_dir / METRICS, "a") if main_rank else None
        writer = None
        if main_rank and cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(self.output_dir / TENSORBOARD, purge_step=self.step + 1 if self.step else None)
        # Python delivers signals to the main thread only (fit() in another thread keeps the defaults).
        handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        window, window_start = [], time.perf_counter()
        evaluated_at = None
        try:
            while self.step < end:
                try:
                    window.append(self.train_step())
                except NonFiniteError as err:
                    if metrics_file:
                        self._log(err.metrics, bar, writer, metrics_file)
                    raise
                except Exception as err:  # an unreadable file, a full disk...: keep the steps done so far
                    raise self._checkpoint_before_error(err) from err
                bar.update(1)
                stop = self._should_stop()
                if stop or self.step % cfg.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    record = {"step": self.step, "steps": len(window)}
                    for key in (*self.parts, "grad_norm"):
                        record[key] = sum(m[key] for m in window) / len(window)
                    record["lr"] = window[-1]["lr"]
                    record["tokens"] = sum(m["tokens"] for m in window)
                    record["tokens_per_s"] = record["tokens"] / max(now - window_start, 1e-9)
                    if main_rank:
                        self._log(record, bar, writer, metrics_file)
                    window = []
                if stop or self.step % cfg.save_every == 0 or self.step == end:
                    save_checkpoint(self)
                if stop:
                    return "interrupted"
                if self.step % cfg.eval_every == 0 or self.step == end:
                    self._log_eval(bar, writer, metrics_file)
                    evaluated_at = self.step
                if not window:  # tokens/s counts training time only, not checkpoints and validation
                    window_start = time.perf_counter()
            if evaluated_at != self.step:  # no step ran (--max-steps 0, or a finished run resumed)
                self._log_eval(bar, writer, metrics_file)
            state_dict = full_student_state(self)  # collective under FSDP
            if main_rank:
                save_student(self.student, self.output_dir / STUDENT, self.tokenizer, state_dict)
            return "done"
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
            if writer:
                writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _checkpoint_before_error(self, err):
        """Write a checkpoint of the last finished step (the failed one left the parameters and the
        optimizer untouched) and return a :class:`StepError` saying where it is and what went wrong."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            save_checkpoint(self)
            where = f"checkpoint-{self.step} written in {self.output_dir}; fix the cause, then --resume"
        except Exception as save_err:  # noqa: BLE001 (the first error is the one to report)
            where = f"and no checkpoint could be written ({type(save_err).__name__}: {save_err})"
        first_line = str(err).splitlines()[0] if str(err) else ""
        return StepError(f"step {self.step + 1} failed ({type(err).__name__}: {first_line}); {where}")

    def _log_eval(self, bar, writer, metrics_file):
        """Validation, logged by rank 0: run by rank 0 alone, or by every rank under FSDP."""
        if self.rank != 0 and not self.config.fsdp:
            return
        record = self.evaluate()
        if record is not None and self.rank == 0:
            self._log(record, bar, writer, metrics_file)


if __name__ == "__main__":  # the CLI lives in distil.cli, which imports this module
    sys.exit("distil.train is the training loop, not a command: run distil-train, or python -m distil.cli "
             "(e.g. torchrun --nproc_per_node=8 -m distil.cli ...)")
