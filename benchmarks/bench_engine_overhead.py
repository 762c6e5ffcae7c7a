"""Per-image overhead of a sweep's generation path against a bare diffusers loop, for every engine.

    .venv/bin/python benchmarks/bench_engine_overhead.py [--engines realvis_xl flux1_schnell sd35 hidream flux2_dev]
                                                         [--images 8] [--rounds 3] [--steps 4] [--size 64]
                                                         [--threads 1] [--profile tiny|random_full]
    .venv/bin/python benchmarks/bench_engine_overhead.py --profile random_full --engines realvis_xl \
                                                         --size 1024 --steps 8 --images 8   # on a GPU

Ours: the full ``generate_sweep`` path, what the ``generated_images`` asset runs for one engine's
rows: the parameters table in, a fresh ``SweepStore`` per round (so every image is generated; the
existence check of each file is included), ``prepare_prompts`` (the diffusion-transformer engines
encode every distinct prompt once; their kept embeddings are cleared before every round, as a new
run starts without them), ``plan_batches``, ``engine.generate`` per batch, each PNG with its
settings chunk written atomically (temporary file, fsync, rename) by the background writer
threads, and the images table it returns. Batch size 1. Encoding each distinct prompt once is a
saving of the text-first engines over a per-image loop, not overhead; it shows in their figures.

Baseline, in the same process on the same loaded weights: a plain loop calling the engine's
pipeline object (``engine.pipeline``) once per image with the prompt string, steps, guidance
(engines whose ``guidance_kind`` is not ``none``), a ``torch.Generator`` seeded with the image's
seed, width, height, the engine's ``max_sequence_length`` where it has one (so both sides run the
same text-encoder input and make the same image) and ``output_type="pil"``, then
``image.save(path)``.

Same rows for both (prompts of data/prompts/demo.txt in turn, seeds, one step count, guidance
spread over the engine's default range, one size). Both warm up once first; then ``--rounds``
rounds, alternating which side goes first, and the medians of the per-image wall times are
reported (overhead = ours / bare - 1; also from each side's fastest round, which a busy machine
disturbs least). ``max pixel Δ`` compares each image of the first round's two sides (0: identical,
in 0-255 levels). The process's CPU time (all threads, ``time.process_time``) is reported as well:
on a machine shared with other work it moves far less than the wall time does.

``--threads`` (default 1) sets torch's intra-op threads, so that noise on a small shared machine
matters less. ``--profile random_full`` runs the full-size architectures with random weights
(``cls.build_random_full``, written once under ``--models-dir``): the figure that matters, for a
GPU; the baseline then holds the whole pipeline on the device at once, as a plain diffusers user
does, while ours starts every round from the state ``load`` leaves (text-first engines: models in
host memory) and so also pays its stage moves. On CUDA a sweep's untimed warm-up call per batch
shape is part of ours (shown as its own column).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from flexyface_pipeline.lib.engines import ENGINES, Engine, get_engine
from flexyface_pipeline.lib.engines.dit import PARKED, TextFirstEngine
from flexyface_pipeline.lib.generation import generate_sweep
from flexyface_pipeline.lib.models.common import free_memory, resolve_runtime
from flexyface_pipeline.lib.sampling import PARAMETER_COLUMNS, image_id
from flexyface_pipeline.lib.store import SweepStore

REPO = Path(__file__).resolve().parents[1]
SWEEP = "overhead"


def read_prompts(count: int | None) -> list[str]:
    lines = (REPO / "data" / "prompts" / "demo.txt").read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return prompts[:count] if count else prompts


def parameters(cls: type[Engine], prompts: list[str], images: int, steps: int, size: int) -> pd.DataFrame:
    """A sweep's parameters table: prompts in turn, seeds, one step count, guidance spread over the
    engine's default range (NaN for engines without guidance), one size."""
    rows = []
    for i in range(images):
        if cls.default_guidance is None:
            guidance = float("nan")
        else:
            lo, hi = cls.default_guidance
            guidance = round(lo + (hi - lo) * (i + 0.5) / images, 2)
        rows.append({
            "image_id": image_id(SWEEP, i), "sweep": SWEEP, "index": i, "prompt": prompts[i % len(prompts)],
            "prompt_index": i % len(prompts), "steps": steps, "guidance": guidance, "seed": 1000 + i,
            "width": size, "height": size, "engine": cls.name,
        })
    return pd.DataFrame(rows, columns=PARAMETER_COLUMNS)


def place_all(engine: Engine, on_device: bool) -> None:
    """CUDA only: every model of a text-first engine on the device (a plain diffusers user's
    ``pipe.to("cuda")``) or back in host memory (where ``load`` leaves them), with the engine's
    record of what is resident kept right. On a CPU every model already lives there."""
    if not engine.runtime.is_cuda or not isinstance(engine, TextFirstEngine) or engine.offloaded:
        return
    pipe = engine.pipeline
    names = [n for n in (*engine.text_encoders, *engine.denoisers) if getattr(pipe, n, None) is not None]
    target = engine.runtime.device if on_device else PARKED
    for name in names:
        getattr(pipe, name).to(target)
    engine.resident = set(names) if on_device else set()
    free_memory(engine.runtime.device)


def max_pixel_difference(ours: SweepStore, bare: Path, ids: list[str]) -> int:
    worst = 0
    for iid in ids:
        with Image.open(ours.image_path(SWEEP, iid)) as a, Image.open(bare / f"{iid}.png") as b:
            diff = np.abs(np.asarray(a.convert("RGB"), dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16))
        worst = max(worst, int(diff.max()))
    return worst


def run_engine(name: str, args: argparse.Namespace, runtime, prompts: list[str], work: Path) -> dict:
    cls = get_engine(name)
    if args.profile == "tiny":
        model_dir = work / "models" / name
        cls.build_tiny(model_dir)
    else:
        model_dir = args.models_dir / "random_full" / name
        if not (model_dir / "model_index.json").is_file():
            cls.build_random_full(model_dir)
    engine = cls.load(str(model_dir), runtime, offline=True)
    pipe = engine.pipeline
    params = parameters(cls, prompts, args.images, args.steps, args.size)
    rows = params.to_dict("records")
    extra = {}
    if hasattr(cls, "max_sequence_length"):
        extra["max_sequence_length"] = cls.max_sequence_length

    def bare_loop(todo: list[dict], out: Path) -> None:
        out.mkdir(parents=True)
        for row in todo:
            guidance = {} if not cls.uses_guidance() else {"guidance_scale": float(row["guidance"])}
            generator = torch.Generator(device=runtime.device).manual_seed(int(row["seed"]))
            image = pipe(prompt=row["prompt"], num_inference_steps=int(row["steps"]), width=int(row["width"]),
                         height=int(row["height"]), generator=generator, output_type="pil",
                         **guidance, **extra).images[0]
            image.save(out / f"{row['image_id']}.png")

    def timed_bare(out: Path) -> tuple[float, float]:
        place_all(engine, on_device=True)
        t0, c0 = time.perf_counter(), time.process_time()
        bare_loop(rows, out)
        return time.perf_counter() - t0, time.process_time() - c0

    def timed_ours(store: SweepStore) -> tuple[float, float, float]:
        place_all(engine, on_device=False)
        if isinstance(engine, TextFirstEngine):
            engine._embeddings.clear()  # a new run starts without kept embeddings
        t0, c0 = time.perf_counter(), time.process_time()
        report = generate_sweep(params, store, lambda: engine, batch_size=1)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if report.generated != len(rows):
            raise RuntimeError(f"{name}: generate_sweep generated {report.generated} of {len(rows)} images")
        return seconds, cpu, report.warm_up_seconds

    # Warm-up: one image each way, untimed.
    timed_bare(work / name / "warm-bare")
    warm_store = SweepStore(work / name / "warm-ours")
    place_all(engine, on_device=False)
    generate_sweep(params.iloc[:1], warm_store, lambda: engine, batch_size=1)

    n = len(rows)
    ours_s, bare_s, ours_cpu, bare_cpu, warm_s = [], [], [], [], []
    for k in range(args.rounds):
        store, bare_dir = SweepStore(work / name / f"ours-{k}"), work / name / f"bare-{k}"
        order = ("ours", "bare") if k % 2 == 0 else ("bare", "ours")
        for side in order:
            if side == "ours":
                seconds, cpu, warm = timed_ours(store)
                ours_s.append(seconds / n)
                ours_cpu.append(cpu / n)
                warm_s.append(warm / n)
            else:
                seconds, cpu = timed_bare(bare_dir)
                bare_s.append(seconds / n)
                bare_cpu.append(cpu / n)
    delta = max_pixel_difference(SweepStore(work / name / "ours-0"), work / name / "bare-0",
                                 [r["image_id"] for r in rows])
    engine.close()
    ours, bare = statistics.median(ours_s), statistics.median(bare_s)
    return {"engine": name, "ours": ours, "bare": bare, "overhead": 100.0 * (ours / bare - 1.0),
            "best_overhead": 100.0 * (min(ours_s) / min(bare_s) - 1.0),
            "ours_cpu": statistics.median(ours_cpu), "bare_cpu": statistics.median(bare_cpu),
            "warm_up": statistics.median(warm_s), "delta": delta, "ours_all": ours_s, "bare_all": bare_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--images", type=int, default=8, help="images per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="width and height (a multiple of 16)")
    parser.add_argument("--prompts", type=int, default=None, help="first N prompts of data/prompts/demo.txt")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--profile", choices=["tiny", "random_full"], default="tiny")
    parser.add_argument("--models-dir", type=Path, default=REPO / "data" / "models",
                        help="random_full weights are written to / read from MODELS_DIR/random_full/ENGINE")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    if args.images < 1 or args.rounds < 1:
        parser.error("--images and --rounds must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    runtime = resolve_runtime(args.device, args.dtype)
    prompts = read_prompts(args.prompts)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for name in args.engines:
            results.append(run_engine(name, args, runtime, prompts, Path(tmp)))

    device = runtime.device.type if not runtime.is_cuda else torch.cuda.get_device_name(runtime.device)
    print(f"{args.profile} weights, {args.images} images of {args.size}x{args.size}, {args.steps} steps, "
          f"{len(prompts)} prompts, batch 1, {args.rounds} rounds (medians), {device}, "
          f"{str(runtime.dtype).removeprefix('torch.')}, torch {torch.get_num_threads()} thread(s)\n")
    show_warm_up = any(r["warm_up"] > 0 for r in results)
    print("| engine | ours s/image | bare diffusers s/image | overhead % | overhead %, fastest rounds | max pixel Δ |"
          + (" of ours: sweep warm-up s/image |" if show_warm_up else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if show_warm_up else ""))
    for r in results:
        print(f"| {r['engine']} | {r['ours']:.3f} | {r['bare']:.3f} | {r['overhead']:+.1f} | {r['best_overhead']:+.1f} "
              f"| {r['delta']} |"
              + (f" {r['warm_up']:.3f} |" if show_warm_up else ""))
    print("\nCPU time of the process (all threads), medians:\n")
    print("| engine | ours CPU s/image | bare diffusers CPU s/image | CPU overhead % |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['engine']} | {r['ours_cpu']:.3f} | {r['bare_cpu']:.3f} | "
              f"{100.0 * (r['ours_cpu'] / r['bare_cpu'] - 1.0):+.1f} |")
    print("\nper round, wall s/image (ours / bare):")
    for r in results:
        pairs = ", ".join(f"{o:.3f} / {b:.3f}" for o, b in zip(r["ours_all"], r["bare_all"]))
        print(f"  {r['engine']}: {pairs}")


if __name__ == "__main__":
    main()
