"""Pipeline overhead of `generated_images`' path over a bare diffusers loop, same model and settings.

    .venv/bin/python benchmarks/bench_generation.py --profile tiny --images 16 --size 256
    .venv/bin/python benchmarks/bench_generation.py --profile random_full --images 4 --size 512 --steps 4 6

Ours: `generate_sweep` (verification of existing files, per-image seeded generators, batches of
one step count with per-image guidance, PNG with its settings chunk written atomically).
Baseline, in the same process on the same loaded weights: a bare loop over the same rows calling
stock `StableDiffusionXLPipeline` once per image and saving a PNG. Batch size 1 for ours too,
so the figure is pure overhead; `--batch` shows what batching gains. Both warm up once first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexyface_pipeline.lib.config import build_sweep_spec
from flexyface_pipeline.lib.engines import get_engine
from flexyface_pipeline.lib.generation import generate_sweep
from flexyface_pipeline.lib.models.common import resolve_runtime
from flexyface_pipeline.lib.sampling import sample_parameters
from flexyface_pipeline.lib.store import SweepStore

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["tiny", "random_full"], default="tiny")
    parser.add_argument("--models-dir", type=Path, default=REPO / "data" / "models")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs=2, default=[4, 8])
    parser.add_argument("--batch", type=int, default=1, help="our batch size (1: pure overhead)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    runtime = resolve_runtime(args.device, args.dtype)
    cls = get_engine("realvis_xl")
    model_dir = args.models_dir / args.profile / "realvis_xl"
    if not (model_dir / "model_index.json").is_file():
        (cls.build_tiny if args.profile == "tiny" else cls.build_random_full)(model_dir)
    engine = cls.load(str(model_dir), runtime, offline=True)
    pipe = engine.pipeline

    with tempfile.TemporaryDirectory() as tmp:
        store = SweepStore(tmp)
        (store.root / "prompts").mkdir(parents=True)
        (store.root / "prompts" / "p.txt").write_text((REPO / "data" / "prompts" / "demo.txt").read_text())
        spec = build_sweep_spec(sweep="bench", num_images=args.images, steps_min=args.steps[0],
                                steps_max=args.steps[1], width=args.size, height=args.size,
                                prompt_files=["p.txt"], prompts_dir=store.root / "prompts")
        params = sample_parameters(spec)
        rows = params.to_dict("records")

        def bare_one(row, out: Path) -> None:
            generator = torch.Generator(device=runtime.device).manual_seed(int(row["seed"]))
            image = pipe(prompt=row["prompt"], num_inference_steps=int(row["steps"]),
                         guidance_scale=float(row["guidance"]), width=int(row["width"]),
                         height=int(row["height"]), generator=generator).images[0]
            image.save(out / f"{row['image_id']}.png")

        warm = Path(tmp) / "warm"
        warm.mkdir()
        bare_one(rows[0], warm)  # warm-up: first-call costs out of both figures

        bare_dir = Path(tmp) / "bare"
        bare_dir.mkdir()
        t0 = time.perf_counter()
        for row in rows:
            bare_one(row, bare_dir)
        bare = time.perf_counter() - t0

        t0 = time.perf_counter()
        report = generate_sweep(params, store, lambda: engine, batch_size=args.batch)
        ours = time.perf_counter() - t0
        assert report.generated == len(rows)

    ratio = ours / bare
    sys.stdout.write(
        f"generation of {len(rows)} images, {args.size}², steps {args.steps[0]}–{args.steps[1]}, profile "
        f"{args.profile}, {runtime.device.type}/{str(runtime.dtype).removeprefix('torch.')}\n"
        f"  bare diffusers loop:            {bare:8.2f} s  ({len(rows) / bare:.3f} images/s)\n"
        f"  ours (generated_images path):   {ours:8.2f} s  ({len(rows) / ours:.3f} images/s), batch {args.batch}\n"
        f"  overhead: {100 * (ratio - 1):+.1f} %  (target ≤ 5 %)\n"
    )


if __name__ == "__main__":
    main()
