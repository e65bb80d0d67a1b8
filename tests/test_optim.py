import math

import pytest
import torch

from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.train.optim import adamw_param_groups, build_adamw, warmup_cosine_lr

pytestmark = pytest.mark.fast  # make test-fast

TINYLLAMA = dict(max_lr=4e-4, min_lr=4e-5, warmup_steps=2000, max_steps=1_430_512)


def test_schedule_at_warmup_end_mid_decay_and_last_step():
    assert warmup_cosine_lr(0, **TINYLLAMA) == pytest.approx(4e-4 / 2000)
    assert warmup_cosine_lr(999, **TINYLLAMA) == pytest.approx(2e-4)
    assert warmup_cosine_lr(1999, **TINYLLAMA) == pytest.approx(4e-4)  # warmup ends at the peak
    assert warmup_cosine_lr(2000, **TINYLLAMA) == pytest.approx(4e-4)
    mid = 2000 + (1_430_512 - 2000) // 2
    assert warmup_cosine_lr(mid, **TINYLLAMA) == pytest.approx((4e-4 + 4e-5) / 2, rel=1e-6)
    assert warmup_cosine_lr(1_430_512, **TINYLLAMA) == pytest.approx(4e-5)
    assert warmup_cosine_lr(1_430_511, **TINYLLAMA) == pytest.approx(4e-5, rel=1e-6)
    assert warmup_cosine_lr(2_000_000, **TINYLLAMA) == 4e-5


def test_schedule_is_monotone_after_warmup_and_handles_no_warmup():
    lrs = [warmup_cosine_lr(s, 1.0, 0.1, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert warmup_cosine_lr(0, 1.0, 0.1, 0, 100) == 1.0
    q = warmup_cosine_lr(25, 1.0, 0.0, 0, 100)
    assert q == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_param_groups():
    model = Llama(ModelConfig.from_name("tiny", n_layer=1))
    (everything,) = adamw_param_groups(model, 0.1, True)
    assert len(everything["params"]) == len(list(model.parameters()))
    decay, no_decay = adamw_param_groups(model, 0.1, False)
    assert no_decay["weight_decay"] == 0.0
    assert any(p is model.embed.weight for p in no_decay["params"])
    assert (
        all(p.ndim == 2 for p in decay["params"])
        and model.blocks[0].attn.qkv.weight in decay["params"]
    )
    opt = build_adamw(model, lr=1e-3)
    assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.95)  # "auto": fused
    assert isinstance(opt, torch.optim.AdamW)
    assert build_adamw(model, lr=1e-3, kernel="foreach").defaults["foreach"]
    assert build_adamw(model, lr=1e-3, kernel="for-loop").defaults["foreach"] is False
    with pytest.raises(ValueError, match="model.optimizer_kernel"):
        build_adamw(model, lr=1e-3, kernel="apex")
