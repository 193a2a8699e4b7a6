"""Run under `deepspeed --num_gpus 2`: validation at world size 2 against one process.

Both ranks build the same seeded model; `evaluate` runs on each rank's `validation_shard` of a
set whose block count does not fill whole batches of world x micro_batch_size rows, with the
experts replicated (EP=1) and sharded over the two ranks (EP=2). Rank 0 also evaluates the
unsharded model alone (world size 1) and takes the plain mean loss over all blocks in one
batch. Rank 0 writes every result to argv[1].
"""

import json
import sys

import torch

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.parallel.expert_parallel import apply_expert_parallel
from moe_dist.parallel.process_group import init_distributed, shutdown_distributed
from moe_dist.train.data import validation_shard
from moe_dist.train.evaluation import evaluate

SEQ_LEN = 32
# (blocks, micro_batch_size): 13 leaves rank 1 one real row of 4 in its last batch; 3 leaves it none.
CASES = [(13, 4), (3, 4)]


def world2_losses(model, blocks, micro: int) -> list[float]:
    """This evaluation's loss as every rank reports it."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    shards = validation_shard(len(blocks), rank=rank, world_size=world, micro_batch_size=micro)
    result = evaluate(model, blocks, shards, device=torch.device("cpu"), all_reduce=torch.distributed.all_reduce)
    seen = torch.zeros(world, dtype=torch.float64)
    seen[rank] = result["loss"]
    torch.distributed.all_reduce(seen)
    return seen.tolist()


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor) -> float:
    """The plain mean next-token loss over `blocks`, all in one batch, summed in float64."""
    logits = model.eval()(input_ids=blocks[:, :-1]).logits.double()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()


def main(out_path: str) -> None:
    init_distributed(timeout_s=600)
    config = MoEConfig.from_preset("tiny-moe", vocab_size=512, max_position_embeddings=SEQ_LEN)
    torch.manual_seed(0)
    reference = MoEForCausalLM(config)
    torch.manual_seed(0)
    model = MoEForCausalLM(config)
    data = torch.randint(0, 512, (max(n for n, _ in CASES), SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    results = {}
    for ep_size in (1, 2):
        if ep_size == 2:
            apply_expert_parallel(model, 2)
        for n, micro in CASES:
            results[f"ep{ep_size}-{n}blocks-micro{micro}"] = {"world2": world2_losses(model, data[:n].numpy(), micro)}
    if torch.distributed.get_rank() == 0:
        for n, micro in CASES:
            blocks = data[:n].numpy()
            world1 = evaluate(
                reference,
                blocks,
                validation_shard(n, rank=0, world_size=1, micro_batch_size=micro),
                device=torch.device("cpu"),
            )["loss"]
            whole = mean_loss(reference, data[:n])
            # What dropping the tail that fills no whole world-2 batch would report instead.
            kept = n // (2 * micro) * 2 * micro
            dropped = mean_loss(reference, data[:kept]) if kept else None
            for ep_size in (1, 2):
                results[f"ep{ep_size}-{n}blocks-micro{micro}"] |= {
                    "world1": world1,
                    "whole_set": whole,
                    "tail_dropped": dropped,
                }
        json.dump(results, open(out_path, "w"), indent=1)
    shutdown_distributed()


if __name__ == "__main__":
    main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
