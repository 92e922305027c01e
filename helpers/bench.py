"""``make bench``: speed ratios of this project's kernels against the obvious implementation, measured
in one run on this machine (each pair on the same inputs, outputs checked equal).

    python -m helpers.bench [--data-root PATH] [--images N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from . import data, params
from .kernels import paste_patches


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def paste_loop(images: torch.Tensor, patches: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """One slice assignment per image (with clipping): how a per-candidate loop pastes."""
    out = images.clone()
    _, _, height, width = images.shape
    ph, pw = patches.shape[-2:]
    for b, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
        r0, r1, c0, c1 = max(y, 0), min(y + ph, height), max(x, 0), min(x + pw, width)
        if r0 < r1 and c0 < c1:
            out[b, :, r0:r1, c0:c1] = patches[b, :, r0 - y : r1 - y, c0 - x : c1 - x]
    return out


def bench_paste(n: int = 4096, side: int = 32, patch: int = 8) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    patches = torch.randint(0, 256, (n, 3, patch, patch), generator=g, dtype=torch.uint8)
    xs, ys = torch.randint(-2, side - 2, (n,), generator=g), torch.randint(-2, side - 2, (n,), generator=g)
    assert torch.equal(paste_patches(images, patches, xs, ys), paste_loop(images, patches, xs, ys))
    t_batched = best_of(lambda: paste_patches(images, patches, xs, ys))
    t_loop = best_of(lambda: paste_loop(images, patches, xs, ys))
    print(
        f"paste {n} patches {patch}x{patch} on {side}x{side}: batched kernel {n / t_batched:,.0f} img/s, "
        f"per-image loop {n / t_loop:,.0f} img/s, ratio {t_loop / t_batched:.1f}x (outputs equal)"
    )


def bench_decode_cache(root: Path, n: int) -> None:
    images = data.scan_image_folder(root / "train")
    paths = images.paths[:: max(1, len(images) // n)][:n]
    start = time.perf_counter()
    pixels = data.decode_images(paths, progress=False)
    t_decode = time.perf_counter() - start
    cache = Path("artifacts") / "bench_cache.npy"
    np.save(cache, pixels)
    t_load = best_of(lambda: np.array(np.load(cache, mmap_mode="r")))
    cache.unlink()
    print(
        f"read {len(paths)} images: decode JPEG files {len(paths) / t_decode:,.0f} img/s, decoded uint8 cache "
        f"{len(paths) / t_load:,.0f} img/s, ratio {t_decode / t_load:.0f}x"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--images", type=int, default=5000, help="images to decode for the cache benchmark")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_paste()
    p = params.from_dict({"profile": "bench", "data": {"root": args.data_root}}, "bench")
    bench_decode_cache(params.resolve_data_root(p), args.images)


if __name__ == "__main__":
    main()
