"""
Worker for tests/test_dataloader.py: run under torchrun with 2 CPU processes (gloo). Each rank makes
one pass over the train split of the shard directory argv[1] with the id stand-in tokenizer and
records the batches it got from the loader plus the documents the dataset layer gives it; rank 0
gathers everything and writes it as JSON to argv[2] for the test to check.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/dist_dataloader_worker.py DATA_DIR OUT.json
"""

import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_dataloader import IdTokenizer, full_rows  # noqa: E402  (the stand-in lives with its tests)

from nanochat.common import compute_cleanup, compute_init  # noqa: E402
from nanochat.dataloader import tokenizing_distributed_data_loader  # noqa: E402
from nanochat.dataset import parquets_iter_batched  # noqa: E402


def main():
    data_dir, out_path = sys.argv[1], sys.argv[2]
    _, rank, _, world_size, _ = compute_init("cpu")
    loader = tokenizing_distributed_data_loader(IdTokenizer(), 2, 15, "train", data_dir=data_dir, buffer_docs=5,
                                                single_pass=True)
    batches = [full_rows(inputs, targets) for inputs, targets, _ in loader]
    read_docs = [d for batch in parquets_iter_batched("train", rank, world_size, data_dir) for d in batch]
    mine = {"rank": rank, "world_size": world_size, "batches": batches, "read_docs": read_docs}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    compute_cleanup()


if __name__ == "__main__":
    main()
