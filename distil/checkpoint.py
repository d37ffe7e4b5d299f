"""A training run's directory: its file names, and ``checkpoint-<step>/`` folders, written atomically by
:func:`save_checkpoint` (a student model directory plus ``training_state.pt``: optimizer, scheduler, GradScaler,
RNG states, masking generator, reader position, the flags) and read back by :func:`load_checkpoint`, which
continues a :class:`distil.train.Trainer` bit-exactly from the newest readable one (``--resume``). Under
``--fsdp`` both the student and the optimizer state are gathered whole (as one process holds them, keyed by
parameter name) and sharded again on resume."""
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from distil.student import auto_model_class, save_student

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE = "training_state.pt"
METRICS = "metrics.jsonl"
STUDENT = "student"
TENSORBOARD = "runs"
RUN_FILES = (METRICS, STUDENT, TENSORBOARD)  # with the checkpoint folders: what --overwrite-output-dir removes
# Flags that may differ on --resume: they change how a run is watched and saved, not what it computes.
RESUMABLE_CHANGES = ("output_dir", "resume", "overwrite_output_dir", "progress", "save_every", "save_total_limit",
                     "log_every", "eval_every", "report_to")


def _save_durably(obj, path):
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _run_flags(config):
    """The flags a checkpoint records, with paths made absolute so that a resume from another folder matches."""
    flags = dataclasses.asdict(config)
    flags["teacher"] = str(Path(config.teacher).resolve())
    flags["data"] = [str(Path(p).resolve()) for p in config.data]
    if config.student is not None:
        flags["student"] = str(Path(config.student).resolve())
    return flags


def checkpoints(output_dir):
    """The ``checkpoint-<step>`` folders of ``output_dir``, newest first, as (step, path)."""
    found = []
    for path in Path(output_dir).glob(CHECKPOINT_PREFIX + "*"):
        match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _rng_state(trainer):
    state = {"torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(trainer.device)
    if trainer.world_size == 1:
        return [state]
    gathered = [None] * trainer.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def full_student_state(trainer):
    """Under ``--fsdp``, the whole student's state dict on the CPU, gathered from every rank's shards
    (collective: every rank calls it; rank 0 gets the tensors, the others an empty dict); otherwise None,
    and the student module is saved as it is."""
    if not trainer.config.fsdp:
        return None
    state = get_model_state_dict(trainer.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:  # a tied parameter comes back as one copy per name: share one, which save_pretrained writes once
        first_name = {}
        for name, param in trainer.student.named_parameters(remove_duplicate=False):
            state[name] = state[first_name.setdefault(id(param), name)]
    return state


def _optimizer_state(trainer):
    """The optimizer's state dict; under ``--fsdp`` gathered whole on rank 0 (collective), keyed by name."""
    if not trainer.config.fsdp:
        return trainer.optimizer.state_dict()
    return get_optimizer_state_dict(trainer.student, trainer.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(trainer):
    """Write ``checkpoint-<step>/`` (rank 0): the student as a model directory that
    ``from_pretrained`` loads, plus ``training_state.pt``; built under a temporary name, then renamed.
    Then removes the oldest checkpoints beyond ``save_total_limit``."""
    rng = _rng_state(trainer)  # collective: every rank takes part, as in the next two
    student_state, optimizer_state = full_student_state(trainer), _optimizer_state(trainer)
    if trainer.rank == 0:
        final = trainer.output_dir / f"{CHECKPOINT_PREFIX}{trainer.step}"
        tmp = trainer.output_dir / f".{final.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_student(trainer.student, tmp, trainer.tokenizer, student_state)
        _save_durably(
            {
                "step": trainer.step,
                "total_steps": trainer.total_steps,
                "flags": _run_flags(trainer.config),
                "optimizer": optimizer_state,
                "scheduler": trainer.scheduler.state_dict(),
                "scaler": trainer.scaler.state_dict(),
                "rng": rng,
                "mask_generator": trainer.mask_generator.get_state(),
                "data": trainer.batches.state_dict(),
                "world_size": trainer.world_size,
            },
            tmp / TRAINING_STATE,
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        limit = trainer.config.save_total_limit
        if limit is not None:
            for _, old in checkpoints(trainer.output_dir)[limit:]:
                shutil.rmtree(old)
    if trainer.world_size > 1:
        dist.barrier()


def _check_flags(trainer, path, state):
    saved, now = state["flags"], _run_flags(trainer.config)
    # A flag added since the checkpoint was written had its default there (e.g. --divergence).
    defaults = {f.name: f.default for f in dataclasses.fields(trainer.config)}
    for name, value in now.items():
        before = saved.get(name, defaults[name])
        if name not in RESUMABLE_CHANGES and before != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"resume: {flag} is {value!r} but {path} was written with {before!r}; resume with the "
                f"same value, or start a new run in another --output-dir from this student (--student {path})")
    if state["world_size"] != trainer.world_size:
        raise ValueError(
            f"resume: {path} was written by {state['world_size']} processes, this run has "
            f"{trainer.world_size}; a bit-exact resume needs the same world size")


def load_checkpoint(trainer):
    """Continue from the newest checkpoint that reads back (a damaged one is skipped with a warning);
    metrics logged after it are dropped. Returns its path."""
    found = checkpoints(trainer.output_dir)
    if not found:
        raise ValueError(f"resume: no checkpoint in {trainer.output_dir} (no {CHECKPOINT_PREFIX}<step> folder); "
                         "drop --resume to start a new run")
    for step, path in found:
        try:
            state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
            saved = auto_model_class(trainer.causal).from_pretrained(path, use_safetensors=True,
                                                                     trust_remote_code=False)
        except Exception as err:  # any damage: a truncated file, a missing one, a bad header
            if trainer.rank == 0:
                tqdm.write(f"distil-train: warning: skipping unreadable checkpoint {path}: "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
            continue
        _check_flags(trainer, path, state)
        if trainer.config.fsdp:  # every rank holds the whole state and keeps its own shards of it
            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(trainer.student, saved.state_dict(), options=whole)
            set_optimizer_state_dict(trainer.student, trainer.optimizer, state["optimizer"], options=whole)
        else:
            trainer.student.load_state_dict(saved.state_dict())
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][trainer.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], trainer.device)
        trainer.mask_generator.set_state(state["mask_generator"])
        trainer.batches.load_state_dict(state["data"])
        trainer.step = step
        if trainer.rank == 0:
            _truncate_metrics(trainer)
        return path
    raise ValueError(f"resume: none of the {len(found)} checkpoints in {trainer.output_dir} could be read")


def _truncate_metrics(trainer):
    """Drop the metrics rows after the resumed step (and a torn last line), so a resumed run's
    ``metrics.jsonl`` has every step once."""
    path = trainer.output_dir / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", math.inf) <= trainer.step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
