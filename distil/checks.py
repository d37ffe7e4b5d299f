"""The scalar argument checks, one range per quantity, shared by the library (the ops' public functions,
:class:`~distil.fused_loss.DistillationLoss`, the masker, the data reader), the command-line configs
(``distil-train``, ``distil-eval``, ``distil-cache-teacher``) and the teacher cache, so that a flag is
refused before any model loads with the message the library would give.

Each check returns the value as a Python ``float`` / ``int`` and raises a ``TypeError`` (wrong kind) or a
``ValueError`` (out of range) naming the argument. Torch-free (the CLI imports it before torch), and only
comparisons on numbers: a value torch.compile traces symbolically passes through (``math.isfinite``
would break the graph). NaN fails every range.
"""
import numbers
from pathlib import Path

# The kernels compute in float32: a temperature T must have a normal float32 1/T and a finite T².
TEMPERATURE_RANGE = (2.0**-126, 2.0**63)
FLOAT32_MAX = 3.4028234663852886e38


def check_real(name, value):
    """A real number (Python or NumPy int/float, not bool, not a tensor) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def check_int(name, value, low=None, high=None):
    """An int (Python or NumPy, not bool) in ``[low, high]`` (either bound optional) as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"in [{low}, {high}]" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{name} must be an int {bounds}, got {value}")
    return value


def check_temperature(name, value):
    """A softmax temperature in [2**-126, 2**63): 1/T and T² finite in float32, the kernels' precision."""
    lo, hi = TEMPERATURE_RANGE
    number = check_real(name, value)
    if not lo <= number < hi:  # also rejects NaN
        raise ValueError(f"{name} must be in [2**-126, 2**63) (1/T and T² finite in float32, the kernels' "
                         f"precision), got {value}")
    return number


def check_positive_finite(name, value):
    number = check_real(name, value)
    if not 0 < number <= FLOAT32_MAX:  # also rejects NaN
        raise ValueError(f"{name} must be finite in float32 and > 0, got {value}")
    return number


def check_non_negative_finite(name, value):
    number = check_real(name, value)
    if not 0 <= number <= FLOAT32_MAX:  # also rejects NaN
        raise ValueError(f"{name} must be finite in float32 and >= 0, got {value}")
    return number


def check_probability(name, value):
    """A probability in [0, 1] (e.g. a mixing weight between two distributions)."""
    number = check_real(name, value)
    if not 0 <= number <= 1:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return number


def check_fraction(name, value):
    """A fraction in [0, 1) of something that must keep a part (steps, sequences)."""
    number = check_real(name, value)
    if not 0 <= number < 1:  # also rejects NaN
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value}")
    return number


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_mask_prop(name, value):
    """The share of tokens masked, in (0, 1]."""
    number = check_real(name, value)
    if not 0 < number <= 1:  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return number


def check_masking(mask_prop, word_mask, word_keep, word_rand, smoothing):
    """BERT's masking parameters (:class:`distil.masking.MLMMasker`): ``mask_prop`` in (0, 1], the
    three shares of a masked token's fate summing to 1, ``smoothing`` >= 0. Returns them as floats."""
    mask_prop = check_mask_prop("mask_prop", mask_prop)
    named = (("word_mask", word_mask), ("word_keep", word_keep), ("word_rand", word_rand))
    shares = [check_non_negative_finite(name, value) for name, value in named]
    if abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"word_mask + word_keep + word_rand must be 1, got {sum(shares)}")
    return (mask_prop, *shares, check_non_negative_finite("smoothing", smoothing))


# The divergences the KL+CE losses take in place of the forward KL (defined in distil/_ops/divergence.py),
# and the defaults of their parameters.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
JSD_BETA = 0.5
SKEW_ALPHA = 0.1
_SKEWED = {"skew_kl": "forward_kl", "skew_reverse_kl": "reverse_kl"}


def check_divergence(divergence, jsd_beta=JSD_BETA, skew_alpha=SKEW_ALPHA):
    """``(divergence, divergence_param)`` as the ops take them, from the public arguments: ``divergence``
    one of :data:`DIVERGENCES`, ``jsd_beta`` in [0, 1], ``skew_alpha`` in [0, 1); a parameter set (away
    from its default) for another divergence is refused, and the end points that are plain KLs (β = 0
    or 1, α = 0) become those."""
    check_choice("divergence", divergence, DIVERGENCES)
    jsd_beta = check_probability("jsd_beta", jsd_beta)
    skew_alpha = check_real("skew_alpha", skew_alpha)
    if jsd_beta != JSD_BETA and divergence != "jsd":
        raise ValueError(f"jsd_beta is a parameter of divergence='jsd', not of {divergence!r}")
    if skew_alpha != SKEW_ALPHA and divergence not in _SKEWED:
        raise ValueError(f"skew_alpha is a parameter of divergence='skew_kl' / 'skew_reverse_kl', not of "
                         f"{divergence!r}")
    if not 0 <= skew_alpha < 1:  # also rejects NaN
        raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")
    if divergence == "jsd":
        if jsd_beta in (0, 1):
            return ("forward_kl" if jsd_beta == 0 else "reverse_kl"), 0.0
        return divergence, jsd_beta
    if divergence in _SKEWED:
        return (_SKEWED[divergence], 0.0) if skew_alpha == 0 else (divergence, skew_alpha)
    return divergence, 0.0


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def check_model_dir(name, path, *, tokenizer=False):
    """A local model directory distil can load: ``config.json``, safetensors weights and (with
    ``tokenizer``) tokenizer files; raises ValueError naming the missing file. Without tokenizer files
    transformers would build an empty tokenizer that maps every word to [UNK]."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{name}: {path / 'config.json'} not found; {name} must be a Hugging Face model directory")
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        other = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (path / f).is_file()]
        hint = (f" (it has {other[0]}: distil loads safetensors only; convert with "
                "AutoModelForMaskedLM.from_pretrained(dir).save_pretrained(dir))") if other else ""
        raise ValueError(f"{name}: {path / 'model.safetensors'} not found{hint}")
    if tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{name}: no tokenizer files in {path} (looked for {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer there (tokenizer.save_pretrained)")
