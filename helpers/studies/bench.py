"""``make bench``: speed ratios of this project's kernels against the obvious implementation, measured
in one run on this machine (each pair on the same inputs, outputs checked equal).

    python -m helpers.studies.bench [--data-root PATH] [--images N]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from .. import augment, data, params
from ..kernels import paste_patches


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


def bench_augment(n: int = 512, side: int = 32) -> None:
    """Vectorised batch augmentation against torchvision applied one image at a time (tensor and PIL)."""
    import torchvision.transforms as T
    import torchvision.transforms.v2 as T2
    from PIL import Image

    from ..augment import CIFAR_MEAN, CIFAR_STD, AugmentConfig, BatchAugment

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    batch_aug = BatchAugment(AugmentConfig(size=side))
    jitter = (0.4, 0.4, 0.4, 0.1)
    per_tensor = T2.Compose(
        [
            T2.RandomResizedCrop(side, scale=(0.2, 1.0)),
            T2.RandomHorizontalFlip(),
            T2.RandomApply([T2.ColorJitter(*jitter)], p=0.8),
            T2.RandomGrayscale(0.2),
            T2.ToDtype(torch.float32, scale=True),
            T2.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    per_pil = T.Compose(
        [
            T.RandomResizedCrop(side, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(*jitter)], p=0.8),
            T.RandomGrayscale(0.2),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    pil_images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
    t_batch = best_of(lambda: batch_aug(images, g))
    t_tensor = best_of(lambda: torch.stack([per_tensor(x) for x in images]), repeat=1)
    t_pil = best_of(lambda: torch.stack([per_pil(x) for x in pil_images]), repeat=1)
    print(
        f"augment {n} images {side}x{side}: vectorised {n / t_batch:,.0f} img/s, per-image torchvision tensor "
        f"{n / t_tensor:,.0f} img/s (ratio {t_tensor / t_batch:.1f}x), per-image torchvision PIL "
        f"{n / t_pil:,.0f} img/s (ratio {t_pil / t_batch:.1f}x)"
    )


TRAINING_CASES = [
    # method, arch, width, stem stride: the standard CIFAR ResNet-18, the CPU profile's, and the others
    ("mocov2", "resnet18", 64, 1),
    ("mocov2", "resnet18", 32, 2),
    ("byol", "resnet18", 32, 2),
    ("simclr", "resnet18", 32, 2),
    ("mocov2", "resnet18", 32, 1),
    ("mocov3", "vit", 0, 0),
]


def ssl_rate(
    p, precision: str = "fp32", compile: bool = False, batch: int = 128, steps: int = 3, skip: int | None = None
) -> float:
    """Images per second of ``train_ssl`` (two views each) over ``steps`` steps after ``skip`` untimed ones (by
    default 1, or 2 where compiled: compilation happens in the first steps), on random pixels."""
    import tempfile

    from ..ssl import train_ssl

    warmup = skip if skip is not None else (2 if compile else 1)
    pixels = torch.randint(0, 256, (batch * (steps + warmup + 1), 3, 32, 32), dtype=torch.uint8)
    p = dataclasses.replace(p, epochs=1, batch_size=batch)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        train_ssl(
            pixels,
            p,
            Path(tmp),
            progress=False,
            on_step=lambda e, s: times.append(time.perf_counter()),
            precision=precision,
            compile=compile,
        )
    return batch * (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def profile_ssl():
    """The SSL setting of the cifar10 profile (MoCo-v2, ResNet-18/2, stride-2 stem, AdamW)."""
    from ..params import SSLParams

    return dataclasses.replace(
        SSLParams(), width=32, stem_stride=2, optimizer="adamw", lr=1e-3, weight_decay=1e-4, crop_min_scale=0.4
    )


def bench_precision() -> None:
    """bf16 autocast against fp32 on this machine: the SSL step, feature extraction and the flip test."""
    from ..compute import resolve_precision
    from ..localize import assign
    from ..models import extract_features
    from ..search import flip_test, paste_locations

    if resolve_precision("auto") != "bf16":
        print("precision: this machine has no native bf16 (auto = fp32); bf16 ratios skipped")
        return
    rates = {prec: ssl_rate(profile_ssl(), prec, batch=256, steps=4) for prec in ("fp32", "bf16")}
    print(
        f"SSL training step (cifar10 profile, batch 256): fp32 {rates['fp32']:,.0f} img/s, bf16 "
        f"{rates['bf16']:,.0f} img/s, bf16/fp32 {rates['bf16'] / rates['fp32']:.2f}x"
    )
    model, norm, pixels = _cluster_model()
    pixels = pixels.repeat(4, 1, 1, 1)  # 2,048 images
    mean, std = norm.mean[:, 0, 0].tolist(), norm.std[:, 0, 0].tolist()
    feats, times = {}, {}
    for prec in ("fp32", "bf16"):

        def extract(p=prec):
            feats[p] = extract_features(model.backbone, pixels, mean, std, precision=p)

        times[prec] = best_of(extract, 2)
    cos = (
        (feats["fp32"] * feats["bf16"]).sum(1)
        / np.linalg.norm(feats["fp32"], axis=1)
        / np.linalg.norm(feats["bf16"], axis=1)
    )
    print(
        f"feature extraction {len(pixels)} images: fp32 {len(pixels) / times['fp32']:,.0f} img/s, bf16 "
        f"{len(pixels) / times['bf16']:,.0f} img/s, bf16/fp32 {times['fp32'] / times['bf16']:.2f}x "
        f"(cosine of the two features: min {cos.min():.4f})"
    )
    n_flip, n_cand, window = 100, 48, 12
    flips = pixels[:n_flip]
    patches = pixels[200 : 200 + n_cand, :, 4 : 4 + window, 4 : 4 + window].contiguous()
    loc = paste_locations(np.arange(n_cand), n_flip, 32, 32, window, seed=0)
    scores, times = {}, {}
    for prec in ("fp32", "bf16"):
        model.precision = prec
        before = assign(model, norm(flips))
        clusters = assign(model, norm(pixels[200 : 200 + n_cand]))

        def run(p=prec, before=before, clusters=clusters):
            scores[p] = flip_test(model, norm, flips, before, patches, clusters, loc, batch_size=256)

        times[prec] = best_of(run, 2)
    model.precision = "fp32"
    same = float((scores["fp32"] == scores["bf16"]).mean())
    print(
        f"flip test {n_cand} candidates x {n_flip} flip images: fp32 {n_cand / times['fp32']:,.1f} candidates/s, "
        f"bf16 {n_cand / times['bf16']:,.1f} candidates/s, bf16/fp32 {times['fp32'] / times['bf16']:.2f}x "
        f"(same score for {same:.0%} of the candidates; mean |difference| "
        f"{np.abs(scores['fp32'] - scores['bf16']).mean():.2f} flips of {n_flip})"
    )


def bench_compile() -> None:
    """torch.compile of the SSL step (its networks) and of feature extraction, against eager mode."""
    from ..compute import resolve_precision
    from ..models import extract_features

    precision = resolve_precision("auto")
    eager = ssl_rate(profile_ssl(), precision, batch=256, steps=4)
    compiled = ssl_rate(profile_ssl(), precision, compile=True, batch=256, steps=4)
    print(
        f"SSL training step ({precision}): eager {eager:,.0f} img/s, torch.compile {compiled:,.0f} img/s, "
        f"compiled/eager {compiled / eager:.2f}x (compile time not counted)"
    )
    model, norm, pixels = _cluster_model()
    pixels = pixels.repeat(4, 1, 1, 1)
    mean, std = norm.mean[:, 0, 0].tolist(), norm.std[:, 0, 0].tolist()
    t_eager = best_of(lambda: extract_features(model.backbone, pixels, mean, std, precision=precision), 2)
    compiled_backbone = torch.compile(model.backbone)
    extract_features(compiled_backbone, pixels[:512], mean, std, precision=precision)  # compiles
    t_compiled = best_of(lambda: extract_features(compiled_backbone, pixels, mean, std, precision=precision), 2)
    print(
        f"feature extraction ({precision}): eager {len(pixels) / t_eager:,.0f} img/s, torch.compile "
        f"{len(pixels) / t_compiled:,.0f} img/s, compiled/eager {t_eager / t_compiled:.2f}x"
    )


def _side_by_side_worker(threads: int, precision: str, queue) -> None:
    torch.set_num_threads(threads)
    queue.put(ssl_rate(profile_ssl(), precision, batch=256, steps=4))


def bench_side_by_side() -> None:
    """Two trainings at once, one thread each, against one training on every thread (the pipeline's choice)."""
    import multiprocessing as mp

    from ..compute import resolve_precision

    cpus = torch.get_num_threads()
    if cpus < 2:
        print("side by side: one thread only, nothing to compare")
        return
    precision = resolve_precision("auto")
    ctx = mp.get_context("spawn")
    results = {}
    for label, procs, threads in (("one training", 1, cpus), (f"{cpus} trainings side by side", cpus, 1)):
        queue = ctx.Queue()
        workers = [ctx.Process(target=_side_by_side_worker, args=(threads, precision, queue)) for _ in range(procs)]
        for w in workers:
            w.start()
        rates = [queue.get() for _ in workers]
        for w in workers:
            w.join()
        results[label] = (sum(rates), procs, threads)
    (one, _, _), (many, procs, _) = results.values()
    print(
        f"SSL training ({precision}) on {cpus} threads: one training with {cpus} threads {one:,.0f} img/s; "
        f"{procs} trainings with 1 thread each {many:,.0f} img/s in all, ratio {many / one:.2f}x"
    )


def bench_training(batch: int = 128, steps: int = 3) -> None:
    """SSL training throughput (images per second, two views each) per method and backbone, in the
    precision ``auto`` resolves to."""
    from ..compute import resolve_precision
    from ..params import SSLParams

    precision = resolve_precision("auto")
    for method, arch, width, stride in TRAINING_CASES:
        p = dataclasses.replace(
            SSLParams(),
            method=method,
            arch=arch,
            width=width or 64,
            stem_stride=stride or 1,
            vit_depth=6,
            queue_size=1024,
        )
        rate = ssl_rate(p, precision, batch=batch, steps=steps)
        name = f"{method} {arch}" + (
            f" width {width} stem stride {stride}" if arch != "vit" else " (patch 4, dim 192, depth 6)"
        )
        print(f"train {name} ({precision}): {rate:,.0f} img/s")


def _cluster_model(width: int = 32, stride: int = 2, k: int = 100, seed: int = 0):
    """A randomly initialised ResNet-18 of the cifar10 profile's shape with k cluster centres taken from
    its own features (no trained model needed: speed does not depend on the weights)."""
    from ..localize import ClusterClassifier
    from ..models import Normaliser, ResNet

    torch.manual_seed(seed)
    backbone = ResNet((2, 2, 2, 2), width, "cifar", stride).eval().to(memory_format=torch.channels_last)
    norm = Normaliser((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pixels = torch.randint(0, 256, (max(k, 512), 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        feats = backbone(norm(pixels))
    return ClusterClassifier(backbone, feats[:k]).eval(), norm, pixels


def bench_flip_test(n_candidates: int = 64, n_flip: int = 100, window: int = 12) -> None:
    """The batched flip test (candidates x flip images in large batches) against the official code's
    order: one candidate at a time, its flip images pasted one by one and forwarded as one batch."""
    from ..localize import assign
    from ..search import flip_test, flip_test_loop, paste_locations

    model, norm, pixels = _cluster_model(k=n_flip)
    flips = pixels[:n_flip]
    before = assign(model, norm(flips))
    patches = pixels[200 : 200 + n_candidates, :, 4 : 4 + window, 4 : 4 + window].contiguous()
    clusters = assign(model, norm(pixels[200 : 200 + n_candidates]))
    loc = paste_locations(np.arange(n_candidates), n_flip, 32, 32, window, seed=0)
    batch = 1024 if torch.cuda.is_available() else 256  # on a CPU, batches past a few hundred images get slower
    batched = flip_test(model, norm, flips, before, patches, clusters, loc, batch_size=batch)
    loop = flip_test_loop(model, norm, flips, before, patches, clusters, loc)
    same = np.array_equal(batched, loop)
    t_batched = best_of(lambda: flip_test(model, norm, flips, before, patches, clusters, loc, batch_size=batch), 2)
    t_loop = best_of(lambda: flip_test_loop(model, norm, flips, before, patches, clusters, loc), 2)
    print(
        f"flip test {n_candidates} candidates x {n_flip} flip images (ResNet-18/2 stride 2, w = {window}): "
        f"batched {n_candidates / t_batched:,.1f} candidates/s, per-candidate loop {n_candidates / t_loop:,.1f} "
        f"candidates/s, ratio {t_loop / t_batched:.2f}x (scores {'identical' if same else 'DIFFER'}; forward passes "
        f"of {batch} images: on a CPU the network dominates both, on a GPU the loop's small batches idle it)"
    )
    if not same:
        raise SystemExit("flip test: batched and loop scores differ")


def bench_grad_cam(n: int = 256) -> None:
    """Our batched Grad-CAM against the pytorch-grad-cam library on the same model and images."""
    from ..localize import grad_cam, grad_cam_library

    model, norm, pixels = _cluster_model()
    model.cam_layer_name = "layer2"
    x = norm(pixels[:n])
    targets = model(x).argmax(1).detach()
    ours, ref = grad_cam(model, x, targets), grad_cam_library(model, x, targets.tolist())
    diff = float(np.abs(ours.numpy() - ref).max())
    t_ours = best_of(lambda: grad_cam(model, x, targets), 2)
    t_lib = best_of(lambda: grad_cam_library(model, x, targets.tolist()), 2)
    print(
        f"Grad-CAM {n} images: batched {n / t_ours:,.0f} img/s, pytorch-grad-cam {n / t_lib:,.0f} img/s, "
        f"ratio {t_lib / t_ours:.1f}x (max abs difference {diff:.1e})"
    )


def matmul_rate(n: int, dtype: torch.dtype = torch.bfloat16, repeat: int = 10) -> float:
    """FLOP/s of an ``n x n x n`` matrix product on the run's device (the peak the SSL step is held against)."""
    from ..compute import device_for_run

    device = device_for_run()
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def ssl_flops_per_image(p, size: int = 32, batch: int = 8) -> float:
    """FLOPs of one SSL training step per image (forward and backward of every network, both views),
    counted by ``torch.utils.flop_counter`` on the run's device."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..augment import BatchAugment
    from ..compute import device_for_run
    from ..ssl import augment_config, build_model

    device = device_for_run()
    model = build_model(p, size).to(device)
    augment = BatchAugment(augment_config(p, size))
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    g = torch.Generator().manual_seed(0)
    v1, v2 = augment(x, g), augment(x, g)
    with FlopCounterMode(display=False) as counter:
        model(v1, v2).backward()
    return counter.get_total_flops() / batch


def profile_bench(prm) -> str:
    """A profile's network on this machine, as a Markdown table: the SSL step in fp32 and bf16 and the share of
    the measured bf16 matrix rate it reaches, feature extraction, the flip test batched and per candidate,
    Grad-CAM and PoisonCAM's masked passes (``helpers.runners.gpu``'s job J2 brings it back from the GPU)."""
    from ..compute import device_for_run
    from ..localize import ClusterClassifier, assign, grad_cam_batched, make_masks, poisoncam_heatmaps
    from ..models import Normaliser, backbone_for, extract_features
    from ..search import flip_test, flip_test_loop, paste_locations

    gpu = torch.cuda.is_available()
    device = device_for_run()
    rows = []

    def add(what: str, value: float, unit: str, note: str = "") -> None:
        rows.append(f"| {what} | {value:,.1f} | {unit} | {note} |")

    steps, skip = (30, 10) if gpu else (1, 1)
    rates = {
        prec: ssl_rate(prm.ssl, prec, batch=prm.ssl.batch_size, steps=steps, skip=skip) for prec in ("fp32", "bf16")
    }
    augment.SELECT = False  # the colour operations on the drawn rows alone: a host synchronisation each
    try:
        rows_rate = ssl_rate(prm.ssl, "bf16", batch=prm.ssl.batch_size, steps=steps, skip=skip)
    finally:
        augment.SELECT = None
    flops = ssl_flops_per_image(prm.ssl)
    peak = matmul_rate(8192 if gpu else 512)
    for prec, rate in rates.items():
        add(f"SSL step ({prm.ssl.method}, batch {prm.ssl.batch_size}), {prec}", rate, "img/s")
    add("SSL step bf16 / fp32", rates["bf16"] / rates["fp32"], "x")
    default = "whole batch, kept where drawn" if gpu else "the same"
    add("SSL step bf16, colour ops on the drawn rows (host syncs)", rows_rate, "img/s",
        f"the default ({default}) is {rates['bf16'] / rows_rate:.2f}x")  # fmt: skip
    add("SSL step's FLOPs per image (counted)", flops / 1e9, "GFLOP")
    add("bf16 matrix product (measured peak)", peak / 1e12, "TFLOP/s", "8192^3" if gpu else "512^3")
    add("SSL step bf16, share of that peak", 100 * rates["bf16"] * flops / peak, "%")
    torch.manual_seed(0)
    size = 32
    backbone = backbone_for(prm.ssl, size).to(device).eval().to(memory_format=torch.channels_last)
    norm = Normaliser((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), device)
    n = 8192 if gpu else 256
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    t = best_of(lambda: extract_features(backbone, pixels, (0.5,) * 3, (0.25,) * 3, 1024, precision="bf16"), 2)
    add("feature extraction, bf16", n / t, "img/s")
    k = min(prm.cluster.k, n // 2)
    feats = torch.as_tensor(extract_features(backbone, pixels[:k], (0.5,) * 3, (0.25,) * 3, 1024, precision="bf16"))
    model = ClusterClassifier(backbone, feats, prm.search.cam_layer, "bf16").to(device).eval()
    flips = pixels[:k].to(device)
    before = assign(model, norm(flips))
    n_cand, w = (64 if gpu else 4), 8
    patches = pixels[k : k + n_cand, :, 4 : 4 + w, 4 : 4 + w].contiguous().to(device)
    clusters = assign(model, norm(pixels[k : k + n_cand].to(device)))
    loc = paste_locations(np.arange(n_cand), k, size, size, w, seed=0)
    bs = prm.search.batch_size
    t_batched = best_of(lambda: flip_test(model, norm, flips, before, patches, clusters, loc, bs), 2)
    t_loop = best_of(lambda: flip_test_loop(model, norm, flips, before, patches, clusters, loc), 2)
    add(f"flip test, batched ({k} flip images)", n_cand / t_batched, "candidates/s")
    add("flip test, per-candidate loop", n_cand / t_loop, "candidates/s", f"batched is {t_loop / t_batched:.1f}x")
    m = 1024 if gpu else 16
    x = norm(pixels[:m].to(device))
    targets = assign(model, x).cpu()
    t = best_of(lambda: grad_cam_batched(model, x, targets, max(1, bs // 4)), 2)
    add("Grad-CAM, batched", m / t, "img/s")
    q = prm.search
    masks = make_masks(q.mask_strategy, q.masks, size, q.mask_grid, q.mask_keep, q.seed).to(device)
    stats = np.tile([[0.0, 1.0]], (k, 1)).astype(np.float32)
    m = 128 if gpu else 4
    t = best_of(lambda: poisoncam_heatmaps(model, x[:m], targets[:m], masks, stats, bs), 2)
    add(f"PoisonCAM heatmaps ({q.masks} masked passes each)", m / t, "img/s", f"{m * q.masks / t:,.0f} passes/s")
    machine = torch.cuda.get_device_name(0) if gpu else "CPU"
    head = f"Benchmark of profile {prm.profile} on {machine} (torch {torch.__version__})"
    return "\n".join([head, "", "| what | value | unit | note |", "|---|---:|---|---|", *rows]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--images", type=int, default=5000, help="images to decode for the cache benchmark")
    parser.add_argument(
        "--only", nargs="*", choices=["precision", "compile", "side_by_side"], help="run only these benchmarks"
    )
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    chosen = {
        "precision": bench_precision,
        "compile": bench_compile,
        "side_by_side": bench_side_by_side,
    }
    if args.only:
        for name in args.only:
            chosen[name]()
        return
    for bench in chosen.values():
        bench()
    bench_paste()
    bench_flip_test()
    bench_grad_cam()
    bench_augment()
    p = params.from_dict({"profile": "bench", "data": {"root": args.data_root}}, "bench")
    bench_decode_cache(params.resolve_data_root(p), args.images)
    bench_training()


if __name__ == "__main__":
    main()
