"""Scoring 2000 images with the four metrics on one CUDA GPU, the per-image reference on a
subset, and (optionally) full-size SDXL generation at 512x512.

    benchmarks/gpu/run_gpu_bench.sh                 # on the GPU machine (see BENCHMARKS.md)
    benchmarks/gpu/run_gpu_bench.sh --cpu-smoke     # the same steps on the CPU, tiny models, seconds

Steps, each timed:
1. synthetic 512x512 PNGs (``--images``, default 2000) in a sweep under ``--work-dir``;
2. random-weight full-size models built once under ``<work-dir>/models`` (not timed as scoring);
3. ours: ``score_sweep`` for the four metrics, model loading included (bf16 autocast on CUDA), first
   with every weight file hashed (new weights), then again with the hashes remembered (a re-score);
4. the reference per-image way (``benchmarks/bench_scoring.py``) on the first
   ``--reference-images`` (default 20), extrapolated to all images for the ratio;
5. unless ``--no-sdxl``: the SDXL engine (``lib/engines``) built with random full-size weights,
   loaded, and our ``generate_sweep`` timed making ``--sdxl-images`` PNGs at 512x512 with
   ``--sdxl-steps`` steps and classifier-free guidance, batches sized as in a sweep. Utilisation counts only UNet work: 1.59 TFLOP per UNet call for one
   512x512 image (1.59 * (side/512)^2 elsewhere), two calls per step with guidance > 1; text
   encoders, VAE decoding and the scheduler are in the time but not in the FLOPs, so it is a
   lower bound. Peak: dense bf16 989 TFLOP/s (H100 SXM, H200), 756 (H100 PCIe).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.bench_scoring import (
    METRICS,
    PROMPTS,
    build_models,
    compare,
    format_report,
    machine,
    run_ours,
    run_reference,
    sweep_inputs,
    synthesize_sweep,
    warm_imports,
)
from flexyface_pipeline.lib.atomic import atomic_write_bytes
from flexyface_pipeline.lib.models.common import DigestCache, Runtime, free_memory, resolve_runtime

logger = logging.getLogger("gpu_bench")

UNET_TFLOP_512 = 1.59  # one SDXL UNet forward pass, one 512x512 image (64x64 latents)
# Dense bf16 tensor-core peaks (NVIDIA data sheets); more specific names first.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200 NVL": 835.0, "H200": 989.4}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" and "H100 NVL" before "H100"
        if key in device_name:
            return value
    return None


def bench_sdxl(models_dir: Path, work_dir: Path, runtime: Runtime, *, tiny: bool, images: int, steps: int,
               size: int, guidance: float, batch_size: int | None) -> dict:
    """Build (once), load and time our generation path (``generate_sweep``: batches, per-image
    seeds and guidance, PNGs written atomically in background threads); UNet TFLOP/s and
    utilisation. ``batch_size`` None: the engine sizes batches to the free memory."""
    import pandas as pd

    from flexyface_pipeline.lib.engines import get_engine
    from flexyface_pipeline.lib.generation import generate_sweep
    from flexyface_pipeline.lib.store import SweepStore

    engine_cls = get_engine("realvis_xl")
    target = models_dir / "realvis_xl"
    if not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        (engine_cls.build_tiny if tiny else engine_cls.build_random_full)(target)
        (target / ".complete").write_text("ok\n")
        logger.info("built the SDXL model in %.0f s", time.perf_counter() - started)
    started = time.perf_counter()
    engine = engine_cls.load(str(target), runtime, offline=True)
    load_s = time.perf_counter() - started
    parameters = pd.DataFrame(
        [{"sweep": "sdxl", "image_id": f"sdxl-{i:04d}", "prompt": PROMPTS[i % len(PROMPTS)], "steps": steps,
          "guidance": guidance, "seed": i, "width": size, "height": size, "engine": engine_cls.name}
         for i in range(images)]
    )
    store_dir = work_dir / "sdxl-images"
    shutil.rmtree(store_dir, ignore_errors=True)
    try:
        started = time.perf_counter()
        # On CUDA, generate_sweep makes one untimed short call per batch shape first (kernel
        # loading, cuBLAS/cuDNN selection): reported apart, as it stays out of elapsed_ms.
        report = generate_sweep(parameters, SweepStore(store_dir), lambda: engine, batch_size=batch_size)
        _sync(runtime)
        wall_s = time.perf_counter() - started
        generate_s = wall_s - report.warm_up_seconds
    finally:
        engine.close()
        free_memory(runtime.device)
    calls_per_step = 2 if guidance > 1 else 1
    unet_tflop = images * steps * calls_per_step * UNET_TFLOP_512 * (size / 512) ** 2
    result = {"images": images, "steps": steps, "size": size, "guidance": guidance,
              "batch_sizes": sorted(set(report.table["batch_size"].tolist())),
              "load_s": load_s, "warm_up_s": report.warm_up_seconds, "wall_s": wall_s,
              "generate_s": generate_s, "images_per_s": images / generate_s,
              "elapsed_ms_sum_s": float(report.table["elapsed_ms"].sum()) / 1000.0,
              "unet_calls": images * steps * calls_per_step, "unet_tflop": unet_tflop,
              "unet_tflops_achieved": unet_tflop / generate_s}
    peak = peak_tflops(torch.cuda.get_device_name()) if runtime.is_cuda else None
    if peak:
        result.update(peak_tflops=peak, utilisation=result["unet_tflops_achieved"] / peak)
    return result


def _sync(runtime: Runtime) -> None:
    if runtime.is_cuda:
        torch.cuda.synchronize(runtime.device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every step on the CPU with tiny models and tiny counts")
    parser.add_argument("--images", type=int, default=None, help="images to score (default 2000; smoke 12)")
    parser.add_argument("--reference-images", type=int, default=None, help="default 20; smoke 3")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/flexyface-gpu-bench"),
                        help="synthetic sweep and built models (kept between runs)")
    parser.add_argument("--batch-size", type=int, default=None, help="ours: default sized to the device")
    parser.add_argument("--workers", type=int, default=None, help="ours: preprocessing threads (default: cores)")
    parser.add_argument("--no-sdxl", action="store_true", help="skip the SDXL generation step")
    parser.add_argument("--sdxl-images", type=int, default=None, help="default 32; smoke 2")
    parser.add_argument("--sdxl-steps", type=int, default=None, help="default 20; smoke 2")
    parser.add_argument("--sdxl-batch-size", type=int, default=None,
                        help="images per pipeline call (default: sized to the device, as in a sweep)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    images = args.images or (12 if smoke else 2000)
    reference_images = min(images, args.reference_images or (3 if smoke else 20))
    size = 64 if smoke else 512
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device; use --cpu-smoke to check the script on a CPU")
    runtime = resolve_runtime("cpu", "fp32") if smoke else resolve_runtime("cuda", "bf16")
    kind = "tiny" if smoke else "random_full"
    models_dir = args.work_dir / "models" / kind
    started_all = time.perf_counter()
    result: dict = {"machine": machine(), "runtime": str(runtime), "smoke": smoke, "date": time.strftime("%Y-%m-%d")}
    warm_imports()
    if runtime.is_cuda:  # CUDA context and cuBLAS handle: not charged to whichever way runs first
        torch.ones(64, 64, device=runtime.device) @ torch.ones(64, 64, device=runtime.device)
        _sync(runtime)

    started = time.perf_counter()
    store = synthesize_sweep(args.work_dir / f"data-{size}", images, PROMPTS[: args.prompts], size=size)
    result["synthesize_s"] = time.perf_counter() - started
    started = time.perf_counter()
    locations = build_models(models_dir, METRICS, tiny=smoke)
    result["build_models_s"] = time.perf_counter() - started

    # First load of these weights: every file is hashed (and remembered in ``digests``).
    digests_file = args.work_dir / "model_digests.json"
    digests_file.unlink(missing_ok=True)
    ours = run_ours(store, locations, runtime, batch_size=args.batch_size, workers=args.workers,
                    digests=DigestCache(digests_file))
    # A re-score: the same run again, the weight hashes remembered from the first.
    again = run_ours(store, locations, runtime, batch_size=args.batch_size, workers=args.workers,
                     digests=DigestCache(digests_file))
    result["ours_again_s"] = sum(t.total_s for t in again.values())
    result["ours_again_load_s"] = {m: t.load_s for m, t in again.items()}
    paths, prompts = sweep_inputs(store)
    scratch = args.work_dir / "hpsv2-root"
    reference = run_reference(locations, paths[:reference_images], prompts[:reference_images],
                              str(runtime.device), scratch)
    result["scoring"] = compare(ours, reference, images, reference_images)
    title = (f"{images} images {size}x{size}, {args.prompts} prompts, {kind} models; ours {runtime.device} "
             f"{str(runtime.dtype).removeprefix('torch.')} (load included), reference per image on "
             f"{reference_images} images, extrapolated")
    report = format_report(result["scoring"], images, reference_images, title)
    report += (f"all four again, weight hashes remembered (a re-score): ours {result['ours_again_s']:.1f} s "
               f"(loads {', '.join(f'{s:.1f}' for s in result['ours_again_load_s'].values())} s)\n")

    if not args.no_sdxl:
        sdxl = bench_sdxl(models_dir, args.work_dir, runtime, tiny=smoke,
                          images=args.sdxl_images or (2 if smoke else 32),
                          steps=args.sdxl_steps or (2 if smoke else 20), size=size, guidance=5.0,
                          batch_size=args.sdxl_batch_size)
        result["sdxl"] = sdxl
        line = (f"SDXL {sdxl['size']}x{sdxl['size']}, {sdxl['steps']} steps, CFG, batches of "
                f"{'/'.join(map(str, sdxl['batch_sizes']))}: {sdxl['images']} images in "
                f"{sdxl['generate_s']:.2f} s ({sdxl['images_per_s']:.2f} images/s, load {sdxl['load_s']:.1f} s, "
                f"untimed warm-up {sdxl['warm_up_s']:.1f} s); "
                f"UNet {sdxl['unet_tflops_achieved']:.1f} TFLOP/s")
        if "utilisation" in sdxl:
            line += f" = {100 * sdxl['utilisation']:.1f} % of {sdxl['peak_tflops']:.0f} TFLOP/s bf16 peak"
        if smoke:
            line += " (full-size UNet FLOPs: meaningless for the tiny model)"
        report += line + "\n"
    result["wall_s"] = time.perf_counter() - started_all
    report += (f"wall {result['wall_s']:.0f} s (synthesis {result['synthesize_s']:.0f} s, "
               f"model builds {result['build_models_s']:.0f} s)\n")
    sys.stdout.write(report)
    if args.json:
        with contextlib.suppress(OSError):
            args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, json.dumps(result, indent=2, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
