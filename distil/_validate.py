"""Input checks shared by every public function: each raises a clear TypeError or
ValueError that names the offending argument."""
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name, t, *, dtypes=None, ndims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    if ndims is not None and t.dim() not in ndims:
        allowed = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {allowed}, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors):
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_pair(first_name, first, second_name, second, *, dtypes=FLOAT_DTYPES, ndims=(2, 3)):
    """Two float tensors of the same shape ([N, D] or [B, S, D]) on one device."""
    check_tensor(first_name, first, dtypes=dtypes, ndims=ndims)
    check_tensor(second_name, second, dtypes=dtypes, ndims=ndims)
    check_same_device(**{first_name: first, second_name: second})
    if first.shape != second.shape:
        raise ValueError(
            f"{second_name} has shape {tuple(second.shape)} but {first_name} has shape {tuple(first.shape)}"
        )


def check_row_mask(name, mask, rows_shape, device):
    """An optional boolean mask over the leading (row) dims of the logits/hidden states."""
    if mask is None:
        return None
    check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a torch.bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(rows_shape):
        raise ValueError(f"{name} must have shape {tuple(rows_shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the logits are on {device}")
    return mask


def check_positive_finite(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def check_non_negative_finite(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)
