"""One SFT-like optimizer step with very unequal target counts, as WORLD FSDP2 ranks (gloo, CPU)
with ACCUMULATE micro-batches each, and as one process with the whole batch in one micro-batch.

    python tests/helpers/per_token_step.py OUT WORLD ACCUMULATE

Writes OUT: {"sharded": ..., "whole": ...}, each the step's loss, grad norm and gradients."""

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tinyrecipe.model import Llama, ModelConfig  # noqa: E402
from tinyrecipe.model.loss import IGNORE_INDEX  # noqa: E402
from tinyrecipe.model.parallelize import parallelize  # noqa: E402
from tinyrecipe.train.step import finish_step, micro_batch_loss, step_loss  # noqa: E402

ROWS, T = 8, 24
MAX_NORM = 20.0  # above the step's norm: the gradients compare unclipped
CONFIG = ModelConfig.from_name("tiny", n_layer=2, vocab_size=128, block_size=T)


def whole_batch() -> dict[str, torch.Tensor]:
    """8 rows whose numbers of target tokens run from 1 to 24 (SFT: prompts take no loss)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (ROWS, T), generator=g)
    labels = ids.roll(-1, 1)
    for row, targets in enumerate((1, 24, 2, 20, 3, 1, 17, 5)):
        labels[row, : T - targets] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def step(model, batch, rank: int, world: int, accumulate: int) -> dict:
    params = list(model.parameters())
    if world * accumulate == 1:  # the reference: the whole batch's mean over its target tokens
        loss = micro_batch_loss(model, batch)
        loss.backward()
        stats = finish_step(params, loss.detach(), 1, max_norm=MAX_NORM)
    else:  # each micro-batch's loss summed over its targets; the step divides by all of them
        rows = ROWS // (world * accumulate)
        loss_sum = tokens = None
        for micro in range(accumulate):
            start = (micro * world + rank) * rows
            part = {k: v[start : start + rows] for k, v in batch.items()}
            model.set_requires_gradient_sync(micro == accumulate - 1)
            loss, _, n = step_loss(model, part, per_token=True)
            (loss / accumulate).backward()  # as the loops do: averaged over micro-batches
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            tokens = n if tokens is None else tokens + n
        stats = finish_step(params, loss_sum, accumulate, max_norm=MAX_NORM, tokens=tokens)
    grads = {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).tolist()
        for n, p in model.named_parameters()
    }
    return {"loss": stats.loss.item(), "grad_norm": stats.grad_norm.item(), "grads": grads}


def run(rank: int, world: int, accumulate: int, out: str, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = parallelize(Llama(CONFIG), mesh=init_device_mesh("cpu", (world,)))
    sharded = step(model, whole_batch(), rank, world, accumulate)
    dist.destroy_process_group()
    if rank == 0:
        torch.manual_seed(0)
        whole = step(Llama(CONFIG), whole_batch(), 0, 1, 1)
        with open(out, "w") as f:
            json.dump({"sharded": sharded, "whole": whole}, f)


if __name__ == "__main__":
    out, world, accumulate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(run, args=(world, accumulate, out, f"file://{out}.store"), nprocs=world)
