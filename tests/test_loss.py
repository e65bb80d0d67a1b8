"""The chunked linear cross-entropy equals the plain reference, in value and gradients."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.model import loss as loss_module
from tinyrecipe.model.loss import linear_cross_entropy

pytestmark = pytest.mark.fast  # make test-fast

SMALL = ModelConfig.from_name(
    "tiny", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, vocab_size=101, block_size=32
)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-logits", "mm-into-buffer"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_matches_reference_value_and_grads(chunk, onednn, monkeypatch):
    if not onednn:  # the path GPUs (and CPU builds without oneDNN) take in fp32
        monkeypatch.setattr(loss_module, "_onednn_logits", lambda h: False)
    elif not loss_module._onednn_logits(torch.zeros(1)):
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(0)
    h = torch.randn(3, 20, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 20))
    targets[0, :4] = -100
    targets[2, -1] = -100
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_gh, ref_gw = torch.autograd.grad(ref * 2.5, (h, w))
    loss = linear_cross_entropy(h, w, targets, chunk)
    gh, gw = torch.autograd.grad(loss * 2.5, (h, w))  # the upstream gradient is applied
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_without_grad_and_in_bf16():
    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(30, 16)
    targets = torch.randint(0, 30, (40,))
    ref = F.cross_entropy(h @ w.T, targets)
    with torch.no_grad():
        assert linear_cross_entropy(h, w, targets, 8).item() == pytest.approx(ref.item(), rel=1e-6)
    hb = h.bfloat16().requires_grad_()
    wb = w.clone().requires_grad_()  # fp32 master weight, bf16 activations (FSDP2 mixed style)
    loss = linear_cross_entropy(hb, wb, targets, 8)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        ModelConfig.from_name("tiny", loss_chunk_size=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2).long(), 0)


@pytest.mark.parametrize("tie", [False, True])
def test_model_with_chunked_loss_trains_like_the_reference(tie):
    """Same loss and same parameter gradients as the plain model, tied embeddings included."""
    torch.manual_seed(0)
    plain = Llama(dataclasses.replace(SMALL, tie_embeddings=tie))
    chunked = Llama(dataclasses.replace(SMALL, tie_embeddings=tie, loss_chunk_size=13))
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(0, SMALL.vocab_size, (2, 25))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -100
    logits, ref, _ = plain(idx, targets)
    none, loss, _ = chunked(idx, targets)
    assert none is None and logits.shape == (2, 25, SMALL.vocab_size)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    ref.backward()
    loss.backward()
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(
        chunked(idx).logits, plain(idx).logits
    )  # without targets: the logits, as before


def test_linear_cross_entropy_under_autocast_runs_the_head_in_bf16():
    torch.manual_seed(0)
    h = torch.randn(24, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), targets)
        loss = linear_cross_entropy(h, w, targets, 5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_stay_close_to_the_fp32_reference(dtype):
    """bf16/fp16 gradients (the GPU path) match fp32 ones: the tiny 1/(row sum x #targets)
    scale must not underflow in 16 bits, even with many targets and a wide vocab."""
    torch.manual_seed(0)
    h = torch.randn(600, 16, requires_grad=True)
    w = (torch.randn(3000, 16) * 0.3).requires_grad_()
    targets = torch.randint(0, 3000, (600,))
    targets[:50] = -100
    ref = F.cross_entropy(h @ w.T, targets)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    hl = h.detach().to(dtype).requires_grad_()
    wl = w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(hl, wl, targets, 256)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
    for got, want in ((hl.grad.float(), ref_gh), (wl.grad, ref_gw)):
        assert (got - want).norm() / want.norm() < 1e-2


@pytest.mark.parametrize("chunk", [4, 0])  # 0: the reference path on full logits
def test_all_targets_ignored_gives_zero_loss_and_zero_gradients(chunk):
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    targets = torch.full((10,), -100)
    if chunk:
        loss = linear_cross_entropy(h, w, targets, chunk)
    else:
        loss = loss_module.cross_entropy_z(h @ w.T, targets, z_loss=1e-4)[0]
    loss.backward()
    assert loss.item() == 0.0
    assert not h.grad.any() and not w.grad.any()


def test_chunked_loss_inside_a_whole_model_compile():
    """torch.compile of the whole model traces the chunked loss too (the CPU oneDNN logits
    kernel is for eager only: inductor cannot lower it outside its own graphs)."""
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(SMALL, n_layer=1, loss_chunk_size=16))
    idx = torch.randint(0, SMALL.vocab_size, (2, 25))
    with torch.no_grad():  # the forward graph is where the logits kernel sits (faster to build)
        loss = torch.compile(model)(idx, idx.roll(-1, 1)).loss
        assert loss.item() == pytest.approx(model(idx, idx.roll(-1, 1)).loss.item(), rel=1e-5)


@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_z_loss_chunked_equals_the_reference_in_value_and_grads(chunk, dtype):
    """z_loss x mean(logsumexp(logits))² over the targets, added to the cross-entropy: the
    chunked kernel's value, z part and gradients equal the plain formula's."""
    from tinyrecipe.model.loss import cross_entropy_z, linear_cross_entropy_z

    torch.manual_seed(0)
    h = (torch.randn(3, 20, 16) * 2).requires_grad_()  # logits far from 0: log Z matters
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 20))
    targets[0, :4] = -100
    ref, ref_z = cross_entropy_z(h @ w.T, targets, 1e-2)
    plain = F.cross_entropy((h @ w.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    lse = (h @ w.T).logsumexp(-1)[targets != -100]
    assert ref_z.item() == pytest.approx(1e-2 * lse.square().mean().item(), rel=1e-6)
    assert ref.item() == pytest.approx(plain.item() + ref_z.item(), rel=1e-6) and ref_z > 0.01
    ref_gh, ref_gw = torch.autograd.grad(ref * 1.5, (h, w))
    hc = h.detach().to(dtype).requires_grad_()
    loss, z = linear_cross_entropy_z(hc, w, targets, chunk, 1e-2)
    gh, gw = torch.autograd.grad(loss * 1.5, (hc, w))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert loss.item() == pytest.approx(ref.item(), rel=tol["rtol"])
    assert z.item() == pytest.approx(ref_z.item(), rel=tol["rtol"]) and not z.requires_grad
    torch.testing.assert_close(gh.float(), ref_gh, **tol)
    torch.testing.assert_close(gw, ref_gw, **tol)


def test_the_model_reports_its_z_loss_on_both_loss_paths():
    torch.manual_seed(0)
    idx = torch.randint(0, 101, (2, 16))
    plain = Llama(dataclasses.replace(SMALL, z_loss=1e-3))
    chunked = Llama(dataclasses.replace(SMALL, z_loss=1e-3, loss_chunk_size=5))
    chunked.load_state_dict(plain.state_dict())
    (_, a, za), (_, b, zb) = plain(idx, idx), chunked(idx, idx)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert za.item() == pytest.approx(zb.item(), rel=1e-5) and za.item() > 0
    with pytest.raises(ValueError, match="z_loss"):
        ModelConfig.from_name("tiny", z_loss=-1.0)


def test_compiled_chunk_kernel_equals_the_eager_one_in_bf16():
    """`compiled=True` (the recipe's `model.speed.compile`) runs each chunk's bf16 softmax work as
    inductor's fused kernels: the same loss, z part and gradients as the eager kernel (to bf16
    rounding), ignored targets and z-loss included; fp32 keeps the eager in-place path."""
    from tinyrecipe.model.loss import linear_cross_entropy_z

    torch.manual_seed(0)
    h = (torch.randn(96, 16) * 2).bfloat16()
    w = torch.randn(300, 16)
    targets = torch.randint(0, 300, (96,))
    targets[:7] = -100
    results = []
    for compiled in (False, True):
        hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, z = linear_cross_entropy_z(hc, wc, targets, 32, 1e-3, compiled=compiled)
        (loss * 3).backward()
        results.append((loss, z, hc.grad.float(), wc.grad))
    (loss, z, gh, gw), (ref, ref_z, ref_gh, ref_gw) = results[1], results[0]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert z.item() == pytest.approx(ref_z.item(), rel=1e-6) and z > 0
    torch.testing.assert_close(gh, ref_gh, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-2, atol=1e-4)
    assert not gh[:7].any()  # ignored targets: no gradient
    assert loss_module._COMPILED_CHUNK is not None
