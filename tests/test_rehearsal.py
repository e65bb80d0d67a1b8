"""The flagship recipe's structure at 8 ranks, rehearsed on CPU with a micro model: 8 gloo
processes under FSDP2 with accumulation and clipping write a sharded checkpoint; the run resumes
on 4 ranks (elastic: the same global batch), writes another, and comes back on 8 as HSDP
(2 replicas x 4 shards). Every step's loss and gradient norm equal one process's with the same
global batch (1e-5), and each sharded module reduce-scatters once per step.

8 processes on 2 cores take a few minutes: marked `rehearsal`, run by `make rehearsal` (and
`pytest -m rehearsal`), not by the default suite."""

import pytest

from tests.test_distributed import COMMON, FSDP2_RECIPE, FSDP_MODULES, counted_fit, counts
from tests.test_training import scalars, write_recipe

pytestmark = pytest.mark.rehearsal

GLOBAL = 16  # sequences per optimizer step, in every layout below
FSDP2 = FSDP2_RECIPE[2:]  # the recipe's strategy flags, without the 2 devices
KEEP = ["--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1"]


def layout(devices: int, micro: int) -> list[str]:
    return [
        "--trainer.devices",
        str(devices),
        "--data.batch_size",
        str(micro),
        "--trainer.accumulate_grad_batches",
        str(GLOBAL // (devices * micro)),
    ]


def test_eight_ranks_fsdp2_then_four_then_hsdp_train_like_one_process(corpus, tmp_path):
    one = write_recipe(tmp_path / "one", corpus, max_steps=4, every=1000).parent
    done = counted_fit(one, *COMMON[2:], *layout(1, 4))
    assert done.returncode == 0, done.stderr[-3000:]

    run = write_recipe(tmp_path / "run", corpus, max_steps=2, every=1000).parent
    ckpts = run / "checkpoints"
    eight = counted_fit(run, *COMMON[2:], *FSDP2, *KEEP, *layout(8, 1))
    assert eight.returncode == 0, eight.stderr[-3000:]
    for rank in counts(run, 8):
        for step in rank[1:]:
            scatters = sum(v for k, v in step.items() if k.startswith("reduce_scatter"))
            assert scatters == FSDP_MODULES, step  # once per sharded module and step
    four = counted_fit(
        run,
        *COMMON[2:],
        *FSDP2,
        *KEEP,
        *layout(4, 2),
        "--trainer.max_steps",
        "3",
        "--ckpt_path",
        str(ckpts / "step=2.ckpt"),
    )
    assert four.returncode == 0, four.stderr[-3000:]
    hsdp = counted_fit(
        run,
        *COMMON[2:],
        *FSDP2,
        "--trainer.strategy.shard_group_size",
        "4",
        *KEEP,
        *layout(8, 1),
        "--trainer.max_steps",
        "4",
        "--ckpt_path",
        str(ckpts / "step=3.ckpt"),
    )
    assert hsdp.returncode == 0, hsdp.stderr[-3000:]
    for rank in counts(run, 8):
        scatters = sum(v for k, v in rank[-1].items() if k.startswith("reduce_scatter"))
        assert scatters == FSDP_MODULES, rank[-1]  # within each group of 4

    want, got = scalars(one / "tensorboard"), scalars(run / "tensorboard")
    for tag in ("train/loss", "train/grad_norm", "train/z_loss"):
        mine = dict(got[tag])  # a resumed run logs on from its checkpoint's step
        assert sorted(mine) == [s for s, _ in want[tag]] and len(mine) == 4, tag
        for step, value in want[tag]:
            assert mine[step] == pytest.approx(value, rel=1e-5, abs=1e-6), (tag, step)
