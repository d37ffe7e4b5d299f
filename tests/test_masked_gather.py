"""distil.ops.masked_gather / distil::masked_scatter_rows against x[mask] (distil.reference.masked_gather)
and its autograd; ``sample_inputs()`` feeds the value, gradient and opcheck tests.

Gather and scatter copy raw bits, so every comparison is exact (torch.equal), which is
stricter than the float64-reference tolerances used for the arithmetic kernels.
"""
import pytest
import torch

from distil import reference
from distil.ops import GATHER_DTYPES, check_capacity, masked_gather

CUDA = torch.cuda.is_available()
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _random(shape, dtype, device="cpu"):
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    return torch.randint(-1000, 1000, shape, device=device).to(dtype)


def _make_x(layout, dtype, device="cpu"):
    """x of shape [2, 7, 12] (or [14, 12] for "2d") in several memory layouts."""
    if layout == "2d":
        return _random((14, 12), dtype, device)
    if layout == "contiguous":
        return _random((2, 7, 12), dtype, device)
    if layout == "transposed_rows":  # leading dims that cannot be merged
        return _random((7, 2, 12), dtype, device).transpose(0, 1)
    if layout == "strided_cols":  # last-dim stride 2
        return _random((2, 7, 24), dtype, device)[..., ::2]
    if layout == "transposed_cols":  # last-dim stride = rows
        return _random((12, 2, 7), dtype, device).permute(1, 2, 0)
    if layout == "offset":  # storage offset, rows not 16-byte aligned
        return _random((2, 7, 13), dtype, device)[:, :, 1:]
    raise AssertionError(layout)


LAYOUTS = ("2d", "contiguous", "transposed_rows", "strided_cols", "transposed_cols", "offset")


def _mask(shape, p=0.4, device="cpu"):
    mask = torch.rand(shape, device=device) < p
    mask.view(-1)[0] = True  # never empty by chance
    return mask


def _reference(x, mask):
    rows, index, count = reference.masked_gather(x, mask)
    return rows, index, int(count)


def _capacity(name, count):
    return {None: None, "over": count + 3, "under": max(count - 2, 0)}[name]


def sample_inputs(device="cpu", dtype=torch.float32):
    """(name, x, mask, capacity): every memory layout in exact mode and with a capacity above and
    below the count; float x requires grad."""
    out = []
    for layout in LAYOUTS:
        for capacity in (None, "over", "under"):
            x = _make_x(layout, dtype, device)
            mask = _mask(x.shape[:-1], device=device)
            x.requires_grad_(dtype.is_floating_point)
            out.append((f"{layout}-{capacity}", x, mask, _capacity(capacity, int(mask.sum()))))
    return out


SAMPLE_NAMES = [name for name, *_ in sample_inputs()]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.int64))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_mode_matches_indexing(dtype, layout):
    x = _make_x(layout, dtype)
    mask = _mask(x.shape[:-1])
    rows, index, count = masked_gather(x, mask)
    ref_rows, ref_index, ref_count = _reference(x, mask)
    assert rows.is_contiguous() and rows.dtype == dtype
    assert torch.equal(rows, ref_rows)
    assert torch.equal(index, ref_index)
    assert count.dim() == 0 and count.dtype == torch.int64 and int(count) == ref_count
    # distiller.py's idiom selects the same rows.
    selected = torch.masked_select(x, mask.unsqueeze(-1).expand_as(x)).view(-1, x.shape[-1])
    assert torch.equal(rows, selected)


@pytest.mark.parametrize("dtype", [d for d in GATHER_DTYPES if d not in (torch.float32, torch.int64)])
def test_every_dtype_is_bit_exact(dtype):
    x = _random((3, 5, 6), dtype)
    mask = _mask(x.shape[:-1])
    assert torch.equal(masked_gather(x, mask).rows, x[mask])


def test_many_chunks_and_rows():
    # More rows than one compaction chunk (16384), so the parallel scan's chunk offsets matter.
    x = torch.randn(5, 9000, 3)
    mask = torch.rand(5, 9000) < 0.5
    rows, index, count = masked_gather(x, mask)
    ref_rows, ref_index, ref_count = _reference(x, mask)
    assert torch.equal(rows, ref_rows) and torch.equal(index, ref_index) and int(count) == ref_count
    rows_k, index_k, _ = masked_gather(x, mask, capacity=ref_count - 100)
    assert torch.equal(rows_k, ref_rows[:-100]) and torch.equal(index_k, ref_index[:-100])


@pytest.mark.parametrize("layout", ("contiguous", "transposed_rows", "strided_cols"))
def test_capacity_larger_than_count_pads(layout):
    x = _make_x(layout, torch.float32)
    mask = _mask(x.shape[:-1])
    ref_rows, ref_index, m = _reference(x, mask)
    k = m + 5
    rows, index, count = masked_gather(x, mask, capacity=k)
    assert rows.shape == (k, x.shape[-1]) and index.shape == (k,)
    assert torch.equal(rows[:m], ref_rows) and torch.equal(rows[m:], torch.zeros(5, x.shape[-1]))
    assert torch.equal(index[:m], ref_index) and torch.equal(index[m:], torch.full((5,), -1))
    assert int(count) == m
    check_capacity(count, k)
    check_capacity(count, m)


def test_capacity_smaller_than_count_keeps_first_rows_and_check_raises():
    x = torch.randn(3, 8, 4)
    mask = _mask(x.shape[:-1], p=0.7)
    ref_rows, ref_index, m = _reference(x, mask)
    k = m - 3
    rows, index, count = masked_gather(x, mask, capacity=k)
    assert torch.equal(rows, ref_rows[:k]) and torch.equal(index, ref_index[:k])
    assert int(count) == m  # the count tells the truth
    with pytest.raises(ValueError, match=f"selected {m} rows but capacity is {k}"):
        check_capacity(count, k)
    rows0, index0, count0 = masked_gather(x, mask, capacity=0)
    assert rows0.shape == (0, 4) and index0.shape == (0,) and int(count0) == m


def test_empty_mask_and_no_rows():
    x = torch.randn(2, 5, 3, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    rows, index, count = masked_gather(x, mask)
    assert rows.shape == (0, 3) and index.shape == (0,) and int(count) == 0
    rows.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))

    rows, index, count = masked_gather(x.detach(), mask, capacity=2)
    assert torch.equal(rows, torch.zeros(2, 3)) and torch.equal(index, torch.full((2,), -1)) and int(count) == 0

    empty = torch.randn(0, 3)
    rows, index, count = masked_gather(empty, torch.zeros(0, dtype=torch.bool), capacity=2)
    assert torch.equal(rows, torch.zeros(2, 3)) and torch.equal(index, torch.full((2,), -1)) and int(count) == 0
    assert masked_gather(empty, torch.zeros(0, dtype=torch.bool)).rows.shape == (0, 3)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("index", range(len(SAMPLE_NAMES)), ids=SAMPLE_NAMES)
def test_gradient_matches_autograd_of_indexing(dtype, index):
    _, base, mask, k = sample_inputs(dtype=dtype)[index]
    m = int(mask.sum())
    x = base.detach().requires_grad_(True)
    rows, _, _ = masked_gather(x, mask, capacity=k)
    grad_rows = torch.randn(rows.shape).to(dtype)
    rows.backward(grad_rows)

    x_ref = base.detach().requires_grad_(True)
    kept = min(m, k) if k is not None else m
    x_ref[mask][:kept].backward(grad_rows[:kept])  # padding rows' gradients go nowhere
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert torch.equal(x.grad, x_ref.grad)


def test_integer_x_gets_no_gradient():
    labels = torch.randint(0, 100, (2, 6))
    x = torch.randn(2, 6, 4, requires_grad=True)
    mask = _mask((2, 6))
    rows, _, _ = masked_gather(labels.unsqueeze(-1), mask)
    assert not rows.requires_grad and torch.equal(rows.squeeze(1), labels[mask])
    hidden, _, _ = masked_gather(x, mask)
    assert hidden.requires_grad


def test_double_backward():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = _mask((2, 5))
    torch.autograd.gradgradcheck(lambda t: masked_gather(t, mask, capacity=8).rows, (x,))


def test_scatter_rows_semantics():
    rows = torch.randn(4, 3)
    index = torch.tensor([5, -1, 0, 5])  # a repeated index: the last row wins
    out = torch.ops.distil.masked_scatter_rows(rows, index, [2, 3, 3])
    expected = torch.zeros(6, 3)
    expected[0], expected[5] = rows[2], rows[3]
    assert torch.equal(out, expected.view(2, 3, 3))
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.distil.masked_scatter_rows(rows, torch.tensor([0, 1, 2, 6]), [2, 3, 3])


@pytest.mark.parametrize("index", range(len(SAMPLE_NAMES)), ids=SAMPLE_NAMES)
def test_opcheck_masked_gather(index):
    _, x, mask, capacity = sample_inputs()[index]
    torch.library.opcheck(torch.ops.distil.masked_gather.default, (x, mask, capacity))


def test_opcheck_masked_scatter_rows():
    rows = torch.randn(5, 6, requires_grad=True)
    index = torch.tensor([3, 0, 9, -1, 11])
    torch.library.opcheck(torch.ops.distil.masked_scatter_rows.default, (rows, index, [2, 6, 6]))


def test_compile_fullgraph_capacity_mode():
    def step(hidden, mask, weight):
        rows, index, count = masked_gather(hidden, mask, capacity=16)
        return (rows @ weight).square().sum(), index, count

    compiled = torch.compile(step, fullgraph=True)
    hidden = torch.randn(2, 9, 8)
    weight = torch.randn(8, 5)
    mask = _mask((2, 9))
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    loss, index, count = compiled(h1, mask, weight)
    loss_ref, index_ref, count_ref = step(h2, mask, weight)
    loss.backward()
    loss_ref.backward()
    assert torch.equal(index, index_ref) and torch.equal(count, count_ref)
    assert torch.allclose(loss, loss_ref, rtol=1e-6)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-6, atol=1e-6) and h1.grad.abs().sum() > 0


def test_bad_inputs():
    x = torch.randn(2, 5, 3)
    mask = _mask((2, 5))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        masked_gather(x.tolist(), mask)
    with pytest.raises(TypeError, match="x must have dtype"):
        masked_gather(x.to(torch.complex64), mask)
    with pytest.raises(ValueError, match="at least 2 dims"):
        masked_gather(torch.randn(5), torch.ones((), dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\)"):
        masked_gather(x, _mask((2, 4)))
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_gather(x, _mask((2, 5, 3)))
    with pytest.raises(TypeError, match="mask must be a bool or integer"):
        masked_gather(x, mask.float())
    with pytest.raises(ValueError, match="mask is on meta but the rows it selects are on cpu"):
        masked_gather(x, mask.to("meta"))
    with pytest.raises(ValueError, match="capacity must be >= 0, got -1"):
        masked_gather(x, mask, capacity=-1)
    for bad in (2.0, True, torch.tensor(3)):
        with pytest.raises(TypeError, match="capacity must be None or an int"):
            masked_gather(x, mask, capacity=bad)
    with pytest.raises(TypeError, match="count must have dtype"):
        check_capacity(torch.tensor(2.0), 3)
    with pytest.raises(TypeError, match="capacity must be an int"):
        check_capacity(torch.tensor(2), None)
    # The C++ ops check too when called directly.
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        torch.ops.distil.masked_gather(x, mask.to(torch.uint8), None)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        torch.ops.distil.masked_gather(x, mask, -3)
    with pytest.raises(ValueError, match="must be \\[..., 3\\]"):
        torch.ops.distil.masked_scatter_rows(torch.randn(2, 3), torch.tensor([0, 1]), [4, 4])


def test_cuda_kernels_are_registered():
    for op in ("distil::masked_gather", "distil::masked_scatter_rows"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


# ---------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _poison_cuda_cache(nbytes):
    # The caching allocator hands these NaN-patterned bytes to the op's next allocations.
    junk = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
    del junk


@gpu
@pytest.mark.parametrize("dtype", GATHER_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("capacity", (None, "over", "under"))
def test_cuda_matches_cpu_bit_for_bit(dtype, layout, capacity):
    x = _make_x(layout, dtype)
    mask = _mask(x.shape[:-1], p=0.5)
    m = int(mask.sum())
    k = {None: None, "over": m + 4, "under": max(m - 2, 0)}[capacity]
    expected = masked_gather(x, mask, capacity=k)
    _poison_cuda_cache(1 << 20)
    got = masked_gather(_make_x_like(x), mask.cuda(), capacity=k)
    for e, g in zip(expected, got):
        assert g.is_cuda and torch.equal(g.cpu(), e)
    if dtype.is_floating_point:
        grad_rows = _random(expected.rows.shape, dtype)
        out_cpu = torch.ops.distil.masked_scatter_rows(grad_rows, expected.index, list(x.shape))
        _poison_cuda_cache(1 << 20)
        out_gpu = torch.ops.distil.masked_scatter_rows(grad_rows.cuda(), got.index, list(x.shape))
        assert torch.equal(out_gpu.cpu(), out_cpu)


def _make_x_like(x):
    """x's values on CUDA with x's exact strides and storage offset."""
    storage = torch.empty(x.untyped_storage().nbytes() // x.element_size(), dtype=x.dtype, device="cuda")
    view = storage.as_strided(x.shape, x.stride(), x.storage_offset())
    view.copy_(x)
    return view


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_large_rows_and_odd_vocab(dtype):
    # V = 30522 rows are only 8-byte (fp32) / 4-byte (bf16) aligned: the narrower vector paths.
    x = torch.randn(3, 50, 30522, device="cuda").to(dtype)
    mask = _mask((3, 50), p=0.15, device="cuda")
    rows, index, count = masked_gather(x, mask)
    assert torch.equal(rows, x[mask]) and int(count) == int(mask.sum())
    x.requires_grad_(True)
    rows, _, _ = masked_gather(x, mask, capacity=40)
    grad = torch.randn_like(rows)
    (gx,) = torch.autograd.grad(rows, x, grad)
    x_ref = x.detach().requires_grad_(True)
    kept = min(40, int(mask.sum()))
    (gref,) = torch.autograd.grad(x_ref[mask][:kept], x_ref, grad[:kept])
    assert torch.equal(gx, gref)


@gpu
def test_cuda_capacity_mode_never_syncs():
    x = torch.randn(4, 128, 768, device="cuda", requires_grad=True)
    mask = _mask((4, 128), p=0.15, device="cuda")
    masked_gather(x, mask, capacity=96).rows.sum().backward()  # warm up lazy init outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows, index, count = masked_gather(x, mask, capacity=96)
        (rows * 2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(rows[: int(count)], x.detach()[mask][:96])


@gpu
def test_cuda_graph_capture_capacity_mode():
    x = torch.randn(2, 64, 32, device="cuda")
    mask = _mask((2, 64), device="cuda")
    static_mask = mask.clone()
    masked_gather(x, static_mask, capacity=80)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows, index, count = masked_gather(x, static_mask, capacity=80)
    new_mask = _mask((2, 64), p=0.3, device="cuda")
    static_mask.copy_(new_mask)
    graph.replay()
    torch.cuda.synchronize()
    m = int(new_mask.sum())
    assert int(count) == m and torch.equal(rows[:m], x[new_mask])
    assert torch.equal(index[m:], torch.full((80 - m,), -1, device="cuda"))


@gpu
@pytest.mark.parametrize("index", range(len(SAMPLE_NAMES)), ids=SAMPLE_NAMES)
def test_cuda_opcheck(index):
    _, x, mask, capacity = sample_inputs("cuda")[index]
    torch.library.opcheck(torch.ops.distil.masked_gather.default, (x, mask, capacity))
    rows = torch.randn(5, 6, device="cuda", requires_grad=True)
    index = torch.tensor([3, 0, 9, -1, 11], device="cuda")
    torch.library.opcheck(torch.ops.distil.masked_scatter_rows.default, (rows, index, [2, 6, 6]))
