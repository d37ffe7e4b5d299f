"""distil::topk_kl_ce_rows where fp32 cancels: large logits (1e4, 1e6 offsets) and huge temperatures (1e4,
1e6). With k = V both teacher modes are the dense KL to the dense op's accuracy, on both backends (the C++
kernel and the Triton kernel: the interpreter here, CUDA on a GPU run); the KL is never negative."""
import pytest
import torch

from distil import reference

from opinfo import TOPK_KL_CE, forward, impl_device, teacher_topk, topk_sample


def topk_kl(impl, triton_device, s, t, k, exact, temperature, labels=None):
    device = impl_device(impl, triton_device)
    s, t = s.to(device), t.to(device)
    values, index, lse = teacher_topk(t, k, temperature, exact)
    sample = topk_sample("precision", s, values, index, lse, None if labels is None else labels.to(device), None,
                         temperature)
    kl, ce, _ = forward(TOPK_KL_CE, impl, sample, torch.tensor([1.0, 1.0], device=device))
    return kl.cpu(), ce.cpu()


@pytest.mark.parametrize("impl", TOPK_KL_CE.impls)
@pytest.mark.parametrize("exact", [False, True], ids=["renorm", "exact"])
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_logits_at_k_equal_v_are_the_dense_kl(triton_device, impl, exact, offset):
    """Logit differences before the 1/T scaling: as exact as the dense kernel (2e-6 of the float64 KL)."""
    s = torch.randn(8, 100) + offset
    t = torch.randn(8, 100) + offset
    labels = torch.randint(0, 100, (8,))
    kl, ce = topk_kl(impl, triton_device, s, t, 100, exact, 2.0, labels)
    ref_kl, ref_ce = reference.kl_ce_rows(s.double(), t.double(), labels, None, 2.0)
    assert (kl.double() - ref_kl).abs().max() <= 2e-6 * max(ref_kl.abs().max().item(), 1.0), (kl, ref_kl)
    assert (ce.double() - ref_ce).abs().max() <= 2e-6 * max(ref_ce.abs().max().item(), 1.0)


@pytest.mark.parametrize("impl", TOPK_KL_CE.impls)
@pytest.mark.parametrize("exact", [False, True], ids=["renorm", "exact"])
@pytest.mark.parametrize("temperature", [1e4, 1e6])
def test_huge_temperatures_at_k_equal_v_are_the_dense_kl(triton_device, impl, exact, temperature):
    """log(zs / zt) as log1p of a sum without cancellation: the dense KL (9.0 per row for logits of scale 3,
    O(1/T^2) of two logs ~log V) to 1e-2, never negative."""
    s, t = torch.randn(4, 4096) * 3, torch.randn(4, 4096) * 3
    kl, _ = topk_kl(impl, triton_device, s, t, 4096, exact, temperature)
    ref, _ = reference.kl_ce_rows(s.double(), t.double(), None, None, temperature)
    assert (kl >= 0).all() and ((kl.double() - ref).abs() <= 1e-2 * ref).all(), (kl, ref)


@pytest.mark.parametrize("impl", TOPK_KL_CE.impls)
@pytest.mark.parametrize("exact", [False, True], ids=["renorm", "exact"])
@pytest.mark.parametrize("temperature", [1e4, 1e6])
def test_huge_temperatures_never_give_a_negative_kl(triton_device, impl, exact, temperature):
    s, t = torch.randn(4, 4096) * 3, torch.randn(4, 4096) * 3
    kl, _ = topk_kl(impl, triton_device, s, t, 64, exact, temperature)
    assert (kl >= 0).all() and torch.isfinite(kl).all(), kl
