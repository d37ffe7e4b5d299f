"""distil.checks: the one set of scalar checks the library, the CLIs and the teacher cache share."""
import subprocess
import sys

import numpy as np
import pytest

from distil import checks


def test_importable_without_torch():
    # The configs validate every flag before anything heavy loads: checks and config must not pull torch in.
    code = ("import sys\nimport distil.checks, distil.config\n"
            "heavy = sorted({'torch', 'transformers', 'triton', 'numpy'} & set(sys.modules))\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("value", [2.0**-126, 1, 2.0, np.float32(0.5), np.int64(3), 2.0**63 - 2.0**10])
def test_temperature_accepts_float32_safe_values(value):
    assert checks.check_temperature("temperature", value) == float(value)


@pytest.mark.parametrize("value, error", [
    (2.0**63, ValueError), (1e19, ValueError), (2.0**-127, ValueError), (0.0, ValueError), (-1.0, ValueError),
    (float("nan"), ValueError), (float("inf"), ValueError), (True, TypeError), ("2", TypeError), (None, TypeError),
])
def test_temperature_refuses(value, error):
    with pytest.raises(error, match="temperature"):
        checks.check_temperature("temperature", value)


def test_int_accepts_numpy_ints_and_names_its_bounds():
    assert checks.check_int("n", np.int32(4), 1) == 4 and type(checks.check_int("n", np.int64(4))) is int
    for value, bounds, match in ((0, (1, None), "n must be an int >= 1, got 0"),
                                 (5, (None, 4), "n must be an int <= 4, got 5"),
                                 (5, (1, 4), r"n must be an int in \[1, 4\], got 5")):
        with pytest.raises(ValueError, match=match):
            checks.check_int("n", value, *bounds)
    for value in (True, 1.0, np.float64(1.0), "1"):
        with pytest.raises(TypeError, match="n must be an int"):
            checks.check_int("n", value)


@pytest.mark.parametrize("check, good, bad", [
    (checks.check_positive_finite, (1e-30, 3.4e38), (0.0, -1.0, 3.5e38, float("nan"))),
    (checks.check_non_negative_finite, (0.0, 3.4e38), (-1e-30, 3.5e38, float("nan"))),
    (checks.check_probability, (0.0, 0.5, 1.0), (-1e-9, 1.0 + 1e-9, float("nan"))),
    (checks.check_fraction, (0.0, 0.999), (1.0, -0.1, float("nan"))),
    (checks.check_mask_prop, (1e-9, 1.0), (0.0, 1.5, float("nan"))),
])
def test_real_ranges(check, good, bad):
    for value in good:
        assert check("x", value) == value
    for value in bad:
        with pytest.raises(ValueError, match="x must"):
            check("x", value)
    with pytest.raises(TypeError, match="x must be a float"):
        check("x", False)


def test_choice_and_masking():
    assert checks.check_choice("precision", "bf16", ("fp32", "bf16")) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp8'"):
        checks.check_choice("precision", "fp8", ("fp32", "bf16"))
    assert checks.check_masking(0.15, 0.8, 0.1, 0.1, 0.7) == (0.15, 0.8, 0.1, 0.1, 0.7)
    with pytest.raises(ValueError, match="word_mask \\+ word_keep \\+ word_rand must be 1"):
        checks.check_masking(0.15, 0.8, 0.1, 0.2, 0.7)


def test_model_dir_names_the_missing_file(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        checks.check_model_dir("teacher", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors only"):
        checks.check_model_dir("teacher", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    checks.check_model_dir("teacher", tmp_path)
    with pytest.raises(ValueError, match="no tokenizer files"):
        checks.check_model_dir("teacher", tmp_path, tokenizer=True)


def test_divergence_arguments_map_to_the_ops_and_refuse_another_divergences_parameter():
    assert checks.check_divergence("forward_kl") == ("forward_kl", 0.0)
    assert checks.check_divergence("jsd", jsd_beta=np.float32(0.25)) == ("jsd", 0.25)
    assert checks.check_divergence("skew_reverse_kl", skew_alpha=0.3) == ("skew_reverse_kl", 0.3)
    # the end points that are plain KLs run as those (the mixture formulas vanish there)
    assert checks.check_divergence("jsd", jsd_beta=0) == ("forward_kl", 0.0)
    assert checks.check_divergence("jsd", jsd_beta=1) == ("reverse_kl", 0.0)
    assert checks.check_divergence("skew_kl", skew_alpha=0.0) == ("forward_kl", 0.0)
    for kwargs, match in (({"divergence": "kl"}, "divergence must be one of"),
                          ({"divergence": "jsd", "jsd_beta": float("nan")}, r"jsd_beta must be in \[0, 1\]"),
                          ({"divergence": "skew_kl", "skew_alpha": 1.0}, r"skew_alpha must be in \[0, 1\)"),
                          ({"divergence": "tvd", "jsd_beta": 0.3}, "jsd_beta is a parameter of divergence='jsd'"),
                          ({"divergence": "jsd", "skew_alpha": 0.3}, "skew_alpha is a parameter")):
        with pytest.raises(ValueError, match=match):
            checks.check_divergence(**kwargs)
    with pytest.raises(TypeError, match="jsd_beta must be a float"):
        checks.check_divergence("jsd", jsd_beta="0.5")
