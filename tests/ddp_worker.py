"""Run by tests/test_ssl_loop.py under torchrun: a tiny DDP training on CPU (gloo), then a digest of the
weights per rank so the test can check that the ranks stayed in sync."""

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from helpers.params import SSLParams
from helpers.ssl import train_ssl

torch.set_num_threads(1)
dist.init_process_group("gloo")
out = Path(sys.argv[1])
pixels = torch.randint(0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
p = dataclasses.replace(
    SSLParams(), arch="resnet10", width=8, epochs=2, batch_size=8, queue_size=64, proj_dim=8, proj_hidden=16
)
model, history = train_ssl(pixels, p, out / "ckpt", progress=False)
digest = sum(float(p.detach().double().sum()) for p in model.parameters())  # BN buffers are per rank
(out / f"rank{dist.get_rank()}.txt").write_text(f"{digest!r} {len(history)} {dist.get_world_size()}\n")
dist.destroy_process_group()
