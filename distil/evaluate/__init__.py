"""Compare a teacher and its students: ``distil-eval`` / ``python -m distil.evaluate``.

With a labelled set (``--train``, ``--eval``), every model directory (the first is the reference,
normally the teacher) is fine-tuned identically with ``AutoModelForSequenceClassification`` and the
Hugging Face ``Trainer``, once per seed, and scored on a held-out split; decoders too (a tokenizer
without a pad token pads with its EOS, and the classifier reads the last real token). With a held-out
text file (``--lm-text``; the labelled set is then optional) each language model is scored on it:
masked LMs by masked-token accuracy and loss (uniform masking of ``--mlm-prop`` of the tokens, all
replaced by the mask token, a fixed seed), causal LMs by next-token perplexity and accuracy. The
report, one row per model:

- accuracy (and macro-F1 when there are more than two classes), mean ± sample std over the seeds, and
  retention: the model's mean accuracy over the first model's;
- parameter counts (all, and without the embedding tables);
- the LM scores on ``--lm-text``;
- throughput, measured side by side (the same inputs and batches, models timed in alternation, the
  median of several rounds) with its ratio to the first model's: the classifiers' sequences/s on the
  evaluation texts; with ``--lm-text`` the LM forward's tokens/s and, for causal LMs, greedy
  generation's tokens/s (``--generate-tokens`` after each prompt, KV cache on).

It prints a Markdown table and writes the full results as JSON (``--output``). The paper's
equivalent is its GLUE/IMDb fine-tuning with ``run_glue.py``-style scripts (also the ``Trainer``);
for decoders, ``run_clm.py``'s evaluation (perplexity).

Modules: :mod:`~distil.evaluate.labelled` (the labelled-data readers), :mod:`~distil.evaluate.models`
(loading tokenizers, classifiers and LMs; parameter counts), :mod:`~distil.evaluate.finetune`
(fine-tuning and its metrics), :mod:`~distil.evaluate.lm_metrics` (masked and causal LM scores),
:mod:`~distil.evaluate.throughput`, :mod:`~distil.evaluate.report` (the run, its table, the CLI).
"""
from distil.evaluate.finetune import classification_metrics, fine_tune
from distil.evaluate.labelled import label_names, load_labelled
from distil.evaluate.lm_metrics import causal_lm_metrics, masked_lm_metrics
from distil.evaluate.models import count_parameters
from distil.evaluate.report import EvalConfig, evaluate, main, markdown_table, parse_args
from distil.evaluate.throughput import classifier_throughput, forward_throughput, generation_throughput

__all__ = ["EvalConfig", "causal_lm_metrics", "classification_metrics", "classifier_throughput", "count_parameters",
           "evaluate", "fine_tune", "forward_throughput", "generation_throughput", "label_names", "load_labelled",
           "main", "markdown_table", "masked_lm_metrics", "parse_args"]
