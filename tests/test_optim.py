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
    with pytest.raises(ValueError, match="model.optimizer.kernel"):
        build_adamw(model, lr=1e-3, kernel="apex")


# max_lr 1.0, min_lr 0.1, warmup 2, max_steps 10, a decay of 4 steps (from step 6 unless moved),
# worked out by hand: progress p = (step - start) / 4, lr = 0.1 + 0.9 x (what is left)
#   linear 1 - p | cosine (1 + cos(pi p)) / 2 | 1-sqrt 1 - sqrt(p)
HAND = {
    "linear": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1],
    "cosine": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1, 0.1],
    "1-sqrt": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55, 0.363604, 0.220577, 0.1, 0.1],
}


@pytest.mark.parametrize("shape", sorted(HAND))
def test_wsd_schedule_equals_the_hand_computed_table(shape):
    from tinyrecipe.train.optim import build_schedule

    by_steps = build_schedule("wsd", 1.0, 0.1, 2, 10, decay_steps=4, decay_shape=shape)
    by_fraction = build_schedule("wsd", 1.0, 0.1, 2, 10, decay_fraction=0.4, decay_shape=shape)
    for step, want in enumerate(HAND[shape]):
        assert by_steps.lr(step) == pytest.approx(want, abs=1e-6), step
        assert by_fraction.lr(step) == by_steps.lr(step)
    # a cooldown branch from step 3: stable until 3, the same decay shifted, then min_lr
    branch = build_schedule("wsd", 1.0, 0.1, 2, 10, decay_steps=4, decay_shape=shape, decay_from=3)
    shifted = HAND[shape][:3] + HAND[shape][6:] + [0.1] * 3
    assert [round(branch.lr(s), 6) for s in range(12)] == pytest.approx(shifted, abs=1e-6)


def test_cosine_and_constant_schedules_and_their_one_line_errors():
    from tinyrecipe.train.optim import build_schedule

    cosine = build_schedule("cosine", 1.0, 0.1, 2, 10)
    assert [cosine.lr(s) for s in range(12)] == [
        warmup_cosine_lr(s, 1.0, 0.1, 2, 10) for s in range(12)
    ]
    assert cosine.lr(6) == pytest.approx(0.55)  # half way through the 8-step decay
    constant = build_schedule("constant", 1.0, 0.1, 2, None)
    assert [constant.lr(s) for s in (0, 1, 5, 10**7)] == [0.5, 1.0, 1.0, 1.0]
    for kwargs, message in (
        (dict(kind="wsd"), "exactly one of model.schedule.decay_steps"),
        (
            dict(kind="wsd", decay_steps=4, decay_fraction=0.2),
            "exactly one of model.schedule.decay_steps",
        ),
        (dict(kind="wsd", decay_steps=4, decay_from=8), "must end by trainer.max_steps 10"),
        (dict(kind="wsd", decay_steps=4, decay_shape="exp"), "model.schedule.decay_shape 'exp'"),
        (dict(kind="cosine", decay_steps=4), "belong to model.schedule.name: wsd"),
        (dict(kind="step"), "model.schedule.name 'step' is unknown"),
    ):
        kind = kwargs.pop("kind")
        with pytest.raises(ValueError, match=message):
            build_schedule(kind, 1.0, 0.1, 2, 10, **kwargs)


def test_a_loss_spike_is_skipped_on_every_rank_and_the_window_resumes_exactly():
    """30 steps of a tiny model with a spike (the loss x 1000) injected at step 20: that step
    alone is skipped (weights untouched), and a run stopped at step 15 and resumed from its
    saved state (model, optimizer, spike window) ends bitwise equal to the uninterrupted one."""
    from tinyrecipe.train.step import SpikeSkipper, finish_step

    config = ModelConfig.from_name(
        "tiny", n_layer=1, d_model=32, n_head=2, n_kv_head=1, d_ff=64, vocab_size=64
    )
    data = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 17), generator=data) for _ in range(30)]

    def train(model, opt, spikes, steps):
        flags = []
        for step in steps:
            batch = batches[step]
            loss = model(batch[:, :-1], batch[:, 1:]).loss
            loss = loss * 1000 if step == 20 else loss
            loss.backward()
            stats = finish_step(
                list(model.parameters()),
                loss.detach(),
                1,
                max_norm=1.0,
                optimizer=opt,
                spikes=spikes,
            )
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad(set_to_none=True)
            flags.append(int(stats.spike))
            if step == 20:
                assert all(
                    torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
                )
        return flags

    torch.manual_seed(0)
    model = Llama(config)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt, spikes = build_adamw(model, lr=1e-3), SpikeSkipper(sigma=3.0, window=8)
    flags = train(model, opt, spikes, range(30))
    assert flags == [0] * 20 + [1] + [0] * 9

    again = Llama(config)
    again.load_state_dict(start)
    opt2, spikes2 = build_adamw(again, lr=1e-3), SpikeSkipper(sigma=3.0, window=8)
    train(again, opt2, spikes2, range(15))
    saved = (again.state_dict(), opt2.state_dict(), spikes2.state_dict())
    resumed = Llama(config)
    resumed.load_state_dict(saved[0])
    opt3, spikes3 = build_adamw(resumed, lr=1e-3), SpikeSkipper(sigma=3.0, window=8)
    opt3.load_state_dict(saved[1])
    spikes3.load_state_dict(saved[2])
    assert train(resumed, opt3, spikes3, range(15, 30)) == flags[15:]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="model.guard.spike_sigma"):
        SpikeSkipper(sigma=0.0)


def test_a_resume_takes_the_recipes_adamw_settings_and_schedule():
    """The checkpoint gives the step and AdamW's moments; the recipe gives lr, betas, eps and
    weight decay (the non-finite guard's advice "lower model.optimizer.lr, then resume")."""
    from tinyrecipe.train.build import build_optimizer
    from tinyrecipe.train.optim import set_scheduled_lr
    from tinyrecipe.train.settings import ModelSettings

    def build(**optimizer):
        torch.manual_seed(0)
        model = Llama(
            ModelConfig(
                n_layer=1, d_model=16, n_head=2, n_kv_head=1, d_ff=32, vocab_size=64, block_size=8
            )
        )
        schedule = {"name": "cosine", "warmup_steps": 2, "min_lr": 1e-5}
        settings = ModelSettings(optimizer=optimizer, schedule=schedule)
        return (model, *build_optimizer(model, settings, max_steps=20))

    model, opt, sched = build(lr=4e-4)
    for _ in range(5):
        model(torch.randint(0, 64, (1, 8))).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    state = opt.state_dict(), sched.state_dict()
    _, opt2, sched2 = build(lr=1e-4, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    set_scheduled_lr(sched2)
    _, fresh, fresh_sched = build(lr=1e-4, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    for _ in range(5):
        fresh_sched.step()  # the schedule of the new recipe at step 5
    (group,) = opt2.param_groups
    assert group["lr"] == pytest.approx(fresh.param_groups[0]["lr"]) and group["lr"] < 1e-4
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.9), 1e-6, 0.05)
    assert sched2.get_last_lr() == [group["lr"]] and sched2.last_epoch == 5
    exp_avg = next(iter(opt2.state.values()))["exp_avg"]
    assert torch.equal(exp_avg, next(iter(opt.state.values()))["exp_avg"])
    assert sched2.state_dict()["base_lrs"] == [1e-4]  # the next checkpoint holds the recipe's
