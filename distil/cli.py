"""distil-train: distil a Hugging Face masked-LM or causal-LM teacher into a student with the DistilBERT recipe.

:class:`distil.config.TrainConfig` holds every option; :func:`parse_args` derives one flag per field
(dashes for underscores) from the field's type, default and ``help`` metadata; :func:`main` runs
:class:`distil.train.Trainer`. Also ``python -m distil.cli`` (e.g. under ``torchrun``).
Nothing heavy is imported before the flags are parsed, so ``--help`` and flag errors are immediate.

The output layout and the exit codes are in :data:`EPILOG` (the end of ``--help``).
"""
import argparse
import dataclasses
import logging
import os
import sys

from distil.config import TrainConfig, _add_flag

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
    """Run ``distil-train`` with these flags (``sys.argv`` by default) in this process; returns the exit code."""
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


def exit_without_teardown(code):
    """Flush and end the process now, skipping the interpreter's teardown. After an FSDP2 run, DTensor's
    caches keep the process group alive past ``destroy_process_group``; a collective's worker thread that
    frees the last tensors it held while the interpreter finalizes takes the GIL too late and aborts the
    process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489), turning a
    finished run into a failed torchrun job. Every file is written and closed by then."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run():
    """The ``distil-train`` console script (and ``python -m distil.cli``): :func:`main`'s exit code; a rank
    of a torchrun job leaves through :func:`exit_without_teardown`."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_teardown(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
