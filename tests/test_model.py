import importlib.util
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.model import attention as attention_module

pytestmark = pytest.mark.fast  # make test-fast

SMALL = ModelConfig.from_name(
    "tiny", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, vocab_size=101, block_size=32
)


def test_forward_returns_logits_and_loss_with_ignore_index():
    torch.manual_seed(0)
    model = Llama(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (3, 20))
    logits = model(idx).logits
    assert logits.shape == (3, 20, SMALL.vocab_size)
    targets = torch.randint(0, SMALL.vocab_size, (3, 20))
    targets[:, :5] = -100
    logits2, loss, _ = model(idx, targets)
    assert torch.equal(logits, logits2)
    expected = F.cross_entropy(
        logits[:, 5:].reshape(-1, SMALL.vocab_size), targets[:, 5:].reshape(-1)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_model_is_causal():
    torch.manual_seed(0)
    model = Llama(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % SMALL.vocab_size
    a, b = model(idx).logits, model(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_too_long_sequence_is_refused():
    model = Llama(SMALL)
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tinyllama_init_stds():
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", n_layer=8)
    model = Llama(config)
    std = math.sqrt(2 / (5 * config.d_model))
    out_std = 1 / math.sqrt(config.d_model) / config.n_layer
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.blocks[0].mlp.gate_up.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.blocks[3].attn.proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(config.d_model))


def test_meta_init_then_materialise_equals_eager_init():
    torch.manual_seed(0)
    eager = Llama(SMALL)
    with torch.device("meta"):
        lazy = Llama(SMALL)
    lazy.to_empty(device="cpu")
    torch.manual_seed(0)
    lazy.init_weights()
    for (name, a), (_, b) in zip(
        eager.state_dict().items(), lazy.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    idx = torch.randint(0, SMALL.vocab_size, (2, 8))
    assert torch.equal(eager(idx).logits, lazy(idx).logits)


def test_tied_embeddings_survive_meta_init():
    config = ModelConfig.from_name("tiny", n_layer=1, tie_embeddings=True)
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.embed.weight


def _reference_attention(q, k, v):
    """Plain causal softmax attention with KV heads repeated: the definition SDPA must match."""
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    mask = torch.ones(q.size(2), q.size(2), dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("n_kv_head", [8, 2, 1])
def test_sdpa_gqa_matches_reference(n_kv_head):
    torch.manual_seed(0)
    q = torch.randn(2, 12, 8, 16)
    k, v = torch.randn(2, 12, n_kv_head, 16), torch.randn(2, 12, n_kv_head, 16)
    out = attention_module.causal_attention(q, k, v)
    assert out.shape == q.shape
    assert torch.allclose(out, _reference_attention(q, k, v), atol=1e-5)


def test_cpu_bf16_training_attention_runs_in_fp32_at_short_small_heads():
    """On the CPU, bf16 attention with gradients at T < 768 and head size <= 32 runs SDPA in
    fp32 (its bf16 backward is the slower there): the output is fp32 SDPA's, rounded to bf16,
    under autocast as well; without gradients, or at larger heads, the bf16 kernel runs."""
    torch.manual_seed(0)
    q = torch.randn(2, 12, 4, 32).bfloat16().requires_grad_()
    k, v = torch.randn(2, 12, 2, 32).bfloat16(), torch.randn(2, 12, 2, 32).bfloat16()
    pick = attention_module.cpu_fp32_sdpa
    assert pick(q)
    assert not pick(q.detach())  # no gradients: bf16
    assert not pick(torch.randn(2, 12, 4, 64, dtype=torch.bfloat16, requires_grad=True))
    assert not pick(torch.randn(1, 768, 4, 32, dtype=torch.bfloat16, requires_grad=True))
    assert not pick(torch.randn(2, 12, 4, 32, requires_grad=True))  # fp32 already
    with torch.no_grad():
        assert not pick(q)
    fp32 = [t.detach().float().transpose(1, 2) for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*fp32, is_causal=True, enable_gqa=True)
    want = want.transpose(1, 2).bfloat16()
    reference = _reference_attention(q.detach().float(), k.float(), v.float())
    torch.testing.assert_close(want.float(), reference, atol=1e-2, rtol=0)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = attention_module.causal_attention(q, k, v)
        assert out.dtype == torch.bfloat16 and torch.equal(out, want)
        out.float().sum().backward()
        assert q.grad.dtype == torch.bfloat16 and q.grad.isfinite().all()
        q.grad = None


def test_the_run_line_says_when_cpu_attention_trains_in_fp32():
    from tinyrecipe.train.build import describe
    from tinyrecipe.train.settings import ModelSettings

    cpu = torch.device("cpu")
    assert "attention=sdpa(fp32 in training)," in describe(ModelSettings(), "bf16-mixed", cpu)
    assert "attention=sdpa," in describe(ModelSettings(), "32-true", cpu)
    wide = ModelSettings(preset="llama-20m")  # heads of 64
    assert "attention=sdpa," in describe(wide, "bf16-mixed", cpu)


def test_backend_falls_back_to_sdpa_on_cpu_and_refuses_forced_kernels():
    q = torch.randn(1, 4, 2, 8)
    assert attention_module.select_backend(q, "auto") == "sdpa"
    assert attention_module.select_backend(q.bfloat16(), "auto") == "sdpa"
    for forced, needs in (("flash", "flash-attn"), ("fa3", "flash_attn_interface"), ("cudnn", "")):
        with pytest.raises(RuntimeError, match=f"attention='{forced}' needs .*{needs}.* got cpu"):
            attention_module.select_backend(q, forced)


@pytest.mark.parametrize(
    ("capability", "fa3", "fa2", "chosen"),
    [
        ((9, 0), True, True, "fa3"),  # Hopper: FlashAttention-3 when it imports
        ((9, 0), False, True, "cudnn"),  # else SDPA's cuDNN kernel, faster there than FA2
        ((10, 0), True, True, "cudnn"),  # Blackwell: FlashAttention-3 is Hopper's
        ((8, 0), True, True, "flash"),  # Ampere: FlashAttention-2 when it imports
        ((8, 9), False, False, "sdpa"),
        ((7, 5), True, True, "sdpa"),
    ],
)
def test_auto_picks_the_fastest_kernel_of_the_gpu(monkeypatch, capability, fa3, fa2, chosen):
    """The selection table without a GPU: the device's capability and the importable packages
    pretended."""
    monkeypatch.setattr(attention_module, "_gpu_half", lambda q: True)
    monkeypatch.setattr(attention_module, "gpu_capability", lambda device: capability)
    monkeypatch.setattr(attention_module, "load_fa3", lambda: (print, print) if fa3 else None)
    monkeypatch.setattr(attention_module, "load_flash_attn", lambda: print if fa2 else None)
    q = torch.randn(1, 4, 2, 8)
    assert attention_module.select_backend(q, "auto") == chosen
    assert attention_module.select_backend(q, "sdpa") == "sdpa"


def test_the_cudnn_choice_runs_sdpa_with_cudnn_first(monkeypatch):
    """`cudnn` is SDPA with its cuDNN kernel tried first (its others where cuDNN cannot take the
    call): on CPU the same values as SDPA's own choice, under a whole-graph compile too."""
    monkeypatch.setattr(attention_module, "select_backend", lambda q, requested="auto": "cudnn")
    torch.manual_seed(0)
    q, k = torch.randn(2, 12, 8, 16), torch.randn(2, 12, 2, 16)
    want = _reference_attention(q, k, k)
    torch.testing.assert_close(attention_module.causal_attention(q, k, k), want, atol=1e-5, rtol=0)
    compiled = torch.compile(attention_module.causal_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, k), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["flash", "fa3"])
def test_flash_kernels_take_grouped_heads_as_they_are(monkeypatch, kernel):
    """FlashAttention-2 and -3 get (B, T, H, D) q and the KV heads unrepeated (FA3's
    (output, lse) pair unpacked), pretending the package imported and the tensor is CUDA."""
    calls = []

    def fake(q, k, v, causal):
        calls.append((q.shape, k.shape, causal))
        return (q, None) if kernel == "fa3" else q

    monkeypatch.setattr(attention_module, "load_flash_attn", lambda: fake)
    monkeypatch.setattr(attention_module, "load_fa3", lambda: (fake, None))
    monkeypatch.setattr(attention_module, "_gpu_half", lambda q: True)
    q, k = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 2, 8)
    assert attention_module.select_backend(q, kernel) == kernel
    assert torch.equal(attention_module.causal_attention(q, k, k, backend=kernel), q)
    assert calls == [((1, 4, 4, 8), (1, 4, 2, 8), True)]  # (B, T, H, D), KV heads not repeated


def test_importing_the_model_pulls_in_neither_lightning_nor_flash_attn():
    code = (
        "import sys, tinyrecipe.model, tinyrecipe.model.hf, tinyrecipe.model.parallelize, "
        "tinyrecipe.planning.flops;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'flash_attn', 'transformers', "
        "'torchao') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = Llama(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, SMALL.vocab_size, (4, 17))
    losses = []
    for _ in range(30):
        loss = model(idx[:, :-1], idx[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("positions", ["continue", "restart"])
def test_a_packed_blocks_logits_equal_each_document_alone(positions):
    """Three documents packed in one block (and a second row cut differently), under the
    document mask: every token's logits equal those of its document run alone, to 1e-5 (fp32).
    RoPE makes attention depend on relative positions only, so this holds with positions
    continuing through the block as well as restarted per document."""
    import dataclasses

    from tinyrecipe.model.attention import document_positions

    torch.manual_seed(0)
    model = Llama(dataclasses.replace(SMALL, document_positions=positions)).eval()
    lengths = [[7, 12, 13], [20, 12]]
    idx = torch.randint(0, SMALL.vocab_size, (2, 32))
    documents = torch.stack(
        [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    )
    with torch.no_grad():
        packed = model(idx, documents=documents).logits
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(idx[r : r + 1, start : start + n]).logits
                torch.testing.assert_close(
                    packed[r, start : start + n], alone[0], atol=1e-5, rtol=0
                )
                start += n
        plain = model(idx).logits  # without the mask the later documents see the earlier ones
    assert (plain[0, 7:] - packed[0, 7:]).abs().max() > 1e-2
    assert torch.equal(packed[:, :7], plain[:, :7])  # the first document is unchanged
    assert document_positions(documents)[0].tolist() == [*range(7), *range(12), *range(13)]
    # the loss path takes the mask too (chunked and plain agree)
    targets = torch.roll(idx, -1, 1)
    loss = model(idx, targets, documents=documents).loss
    chunked = Llama(dataclasses.replace(SMALL, document_positions=positions, loss_chunk_size=8))
    chunked.load_state_dict(model.state_dict())
    assert chunked(idx, targets, documents=documents)[1].item() == pytest.approx(
        loss.item(), rel=1e-5
    )


def test_document_mask_for_either_kernel():
    """cu_seqlens for a varlen kernel: each document's start in the flattened batch; a mask made
    for a varlen kernel but run on SDPA (autocast changed the dtype) still masks."""
    from tinyrecipe.model.attention import DocumentMask, causal_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 4, 8), torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    documents = (torch.arange(16) * 3 // 16).expand(2, 16)
    as_sequences = DocumentMask.from_documents(documents, varlen=True)
    assert as_sequences.cu_seqlens.tolist() == [0, 6, 11, 16, 22, 27, 32]
    dense = causal_attention(q, k, v, "sdpa", DocumentMask.from_documents(documents))
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa", as_sequences), dense)


def _each_sequence_alone(q, k, v, cu, causal):
    """What a varlen kernel computes: (tokens, H, D) attended sequence by sequence of `cu`."""
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        out[a:b] = y.transpose(0, 1)
    return out


def _varlen_equals_the_dense_mask() -> torch.Tensor:
    """A packed batch (three documents a row) through `auto` with the documents as sequences
    equals SDPA's block mask; returns the documents."""
    from tinyrecipe.model import attention
    from tinyrecipe.model.attention import DocumentMask, causal_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 4, 8), torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    documents = (torch.arange(16) * 3 // 16).expand(2, 16)
    got = causal_attention(q, k, v, "auto", DocumentMask.from_documents(documents, varlen=True))
    want = attention._document_attention(q, k, v, "sdpa", DocumentMask.from_documents(documents))
    torch.testing.assert_close(got, want)
    return documents


def test_the_varlen_path_hands_flash_attn_the_documents_as_sequences(monkeypatch):
    """flash-attn cannot be installed here: a stand-in `flash_attn_varlen_func` (each sequence
    of cu_seqlens attended on its own with SDPA) checks what our glue passes it (flattened
    tokens, int32 cu_seqlens, causal) against the SDPA block mask."""
    import sys
    import types

    from tinyrecipe.model import attention

    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        calls.append((q.shape, cu_q.dtype, max_q, causal))
        return _each_sequence_alone(q, k, v, cu_q, causal)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen)
    )
    monkeypatch.setattr(attention, "select_backend", lambda q, requested="auto": "flash")
    _varlen_equals_the_dense_mask()
    assert calls == [(torch.Size([32, 4, 8]), torch.int32, 16, True)]


def _torch_varlen_stand_in(api: str, calls: list):
    """torch's varlen_attn (CUDA only) as each torch release has shipped its signature."""

    def run(q, k, v, cu_q, max_q, causal):
        calls.append((q.shape, k.shape, cu_q.dtype, max_q, causal))
        return _each_sequence_alone(q, k, v, cu_q, causal)

    def first(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        return run(q, k, v, cu_q, max_q, is_causal)

    def windowed(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        return run(q, k, v, cu_q, max_q, tuple(window_size) == (-1, 0))

    def grouped(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        if not enable_gqa and k.size(1) != q.size(1):
            raise ValueError(f"grouped KV heads without enable_gqa: {q.shape} {k.shape}")
        return run(q, k, v, cu_q, max_q, tuple(window_size) == (-1, 0))

    return {"is_causal": first, "window_size": windowed, "window_size+enable_gqa": grouped}[api]


@pytest.mark.parametrize("api", ["is_causal", "window_size", "window_size+enable_gqa"])
def test_documents_run_on_torchs_varlen_kernel_on_a_gpu_without_flash_attn(monkeypatch, api):
    """On CUDA in fp16/bf16 without flash-attn, `auto` runs a document mask on torch's own varlen
    kernel (no work across documents) instead of SDPA with a dense mask. The kernel cannot run
    here: a stand-in with each signature torch has shipped checks what the adapter passes
    (flattened tokens, causal, grouped KV heads) and that a packed batch's loss through the
    model equals the SDPA mask's; on CPU, or when sdpa is asked for, SDPA stays."""
    import sys
    import types

    from tinyrecipe.model import attention

    calls = []
    fake = types.SimpleNamespace(varlen_attn=_torch_varlen_stand_in(api, calls))
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", fake)
    monkeypatch.setattr(attention, "_VARLEN", [])
    q = torch.randn(2, 16, 4, 8)
    assert attention.document_backend(q) == "sdpa"  # a CPU tensor
    monkeypatch.setattr(attention, "_gpu_half", lambda q: True)  # as if CUDA bf16
    for capability in ((8, 0), (9, 0)):  # SDPA's own dispatch, or its cuDNN kernel first
        monkeypatch.setattr(attention, "gpu_capability", lambda device, c=capability: c)
        assert attention.document_backend(q) == "varlen"
    assert attention.document_backend(q, "sdpa") == "sdpa"

    documents = _varlen_equals_the_dense_mask()
    assert calls == [(torch.Size([32, 4, 8]), torch.Size([32, 2, 8]), torch.int32, 16, True)]

    model = Llama(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    loss = model(idx, idx, documents=documents).loss
    assert len(calls) == 1 + SMALL.n_layer  # every block ran the varlen kernel
    monkeypatch.setattr(attention, "_gpu_half", lambda q: False)
    reference = model(idx, idx, documents=documents).loss
    assert len(calls) == 1 + SMALL.n_layer
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_masked_sdpa_undoes_kv_groups_where_cuda_has_no_grouped_masked_kernel():
    """On CUDA, SDPA with a mask and grouped KV heads falls to its math kernel (the whole score
    matrix kept, K and V copied out to every head); masked_sdpa undoes the groups first so the
    memory-efficient kernel takes the mask: a per-row mask (packed documents) repeats the KV
    heads, a (T, S) one (a KV cache's) folds each group's query heads into the query length.
    Both forms (forced here on CPU) equal the grouped one, values and gradients."""
    from tinyrecipe.model.attention import block_causal, masked_sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, requires_grad=True) for h in (4, 2, 2))
    per_row = block_causal((torch.arange(16) * 3 // 16).expand(2, 16))  # (2, 1, 16, 16)
    cache = torch.ones(3, 16, dtype=torch.bool).tril(diagonal=10)  # 3 new of 11 filled
    for mask in (per_row, cache):
        outs, grads = [], []
        for ungroup in (True, False):
            out = masked_sdpa(q[:, :, : mask.size(-2)], k, v, mask, ungroup=ungroup)
            grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b)


def test_float8_swaps_the_block_linears_and_trains_close_to_the_plain_model(monkeypatch):
    """model.speed.float8: torchao's Float8Linear in every block (not the embedding or head), built on
    meta and materialised like any model, parameter names unchanged; a few AdamW steps on CPU
    (float8 matmuls run there) stay within 2% of the plain model's losses. Where it cannot run,
    one line: torchao missing, or a GPU without float8 matmuls."""
    from torchao.float8.float8_linear import Float8Linear

    from tinyrecipe.model.parallelize import check_float8, parallelize

    idx = torch.randint(0, SMALL.vocab_size, (8, 33), generator=torch.Generator().manual_seed(1))
    losses, names = {}, {}
    for float8 in (False, True):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Llama(SMALL)
        parallelize(model, float8=float8)
        names[float8] = list(model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[float8] = []
        for _ in range(4):
            loss = model(idx[:, :-1], idx[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[float8].append(loss.item())
    swapped = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == {
        f"blocks.{i}.{name}"
        for i in range(SMALL.n_layer)
        for name in ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.proj")
    }
    assert names[True] == names[False]
    assert losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    assert losses[True] != losses[False]  # float8 did run

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="NVIDIA A100 has 8.0: set model.speed.float8: false"):
        check_float8("cuda")
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as a torchao made for another torch
    with pytest.raises(ImportError, match="does not import with torch .*the torchao release made"):
        parallelize(Llama(SMALL), float8=True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else find_spec(n, *a)
    )
    with pytest.raises(ImportError, match="model.speed.float8 needs torchao: pip install"):
        parallelize(Llama(SMALL), float8=True)


def test_checkpointed_blocks_compile_whole_and_keep_their_names(monkeypatch):
    """Activation checkpointing + per-block compile: dynamo captures each block's checkpointed
    forward as one graph (a block that ran eager would capture none), parameter names stay, and
    loss and gradients equal the plain model's."""
    from torch._dynamo.testing import CompileCounter

    from tinyrecipe.model.parallelize import parallelize

    cfg = ModelConfig.from_name("tiny", n_layer=2, vocab_size=256, block_size=32)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    torch._dynamo.reset()
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = parallelize(Llama(cfg), activation_checkpointing=checkpointing, compile=True)
        frames = counter.frame_count
        loss = model(idx, idx.roll(-1, 1)).loss
        loss.backward()
        runs.append((list(model.state_dict()), loss, model.blocks[1].mlp.proj.weight.grad))
        assert counter.frame_count == frames + 1  # one graph, shared by both blocks
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[1][1], runs[0][1])
    torch.testing.assert_close(runs[1][2], runs[0][2])
