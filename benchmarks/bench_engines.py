"""Text encoders first vs encoding inside every batch, on the tiny diffusion-transformer engines (CPU).

    .venv/bin/python benchmarks/bench_engines.py [--engines flux1_schnell sd35 hidream flux2_dev]
                                                 [--prompts 4] [--images 32] [--batch 4]

Ours: ``engine.prepare_prompts`` (each distinct prompt encoded once), then ``engine.generate`` per
batch with the kept embeddings. Baseline, same process, same loaded weights: the stock diffusers
pipeline called per batch with the prompt strings, as a loop over batches would (it encodes every
prompt of every batch, and the negative prompt of CFG engines, each time). Same requests, same
seeds; both warm up once first. On tiny models the transformer is cheap, so the figure shows the
encoding work saved, not the GPU-memory gain (benchmarks/engine_memory.py).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from flexyface_pipeline.lib.engines import ImageRequest, get_engine
from flexyface_pipeline.lib.models.common import resolve_runtime

REPO = Path(__file__).resolve().parents[1]
GUIDANCE = {"none": None, "cfg": 4.0, "distilled": 3.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["flux1_schnell", "sd35", "hidream", "flux2_dev"])
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    prompts = [line.strip() for line in (REPO / "data" / "prompts" / "demo.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")][: args.prompts]
    runtime = resolve_runtime("cpu")
    print(f"{args.images} images of {args.size}x{args.size}, {args.steps} steps, {len(prompts)} distinct prompts, "
          f"batches of {args.batch}, CPU ({torch.get_num_threads()} threads)\n")
    print("| engine | ours: encode once + batches (s) | baseline: stock pipeline per batch (s) | "
          "text-encoder passes ours / baseline |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.engines:
            cls = get_engine(name)
            directory = Path(tmp) / name
            cls.build_tiny(directory)
            engine = cls.load(str(directory), runtime, offline=True)
            pipe = engine.pipeline
            guidance = GUIDANCE[cls.guidance_kind]
            requests = [ImageRequest(f"i{i}", prompts[i % len(prompts)], args.steps, guidance, i, args.size, args.size)
                        for i in range(args.images)]
            batches = [requests[i : i + args.batch] for i in range(0, len(requests), args.batch)]
            extra = {"guidance_scale": 0.0 if guidance is None else guidance}
            if hasattr(cls, "max_sequence_length"):
                extra["max_sequence_length"] = cls.max_sequence_length
            if name == "hidream":
                pipe.default_sample_size = args.size // pipe.vae_scale_factor

            def stock(batch: list[ImageRequest]) -> None:
                pipe(prompt=[r.prompt for r in batch], num_inference_steps=args.steps, width=args.size,
                     height=args.size, output_type="np",
                     generator=[torch.Generator().manual_seed(r.seed) for r in batch], **extra)

            encoder_calls = {"n": 0}
            first_encoder = getattr(pipe, cls.text_encoders[-1])
            first_encoder.register_forward_pre_hook(lambda *_: encoder_calls.__setitem__("n", encoder_calls["n"] + 1))
            stock(batches[0])  # warm-up (also leaves every model where the baseline needs it)
            engine.generate(batches[0])
            engine._embeddings.clear()

            encoder_calls["n"] = 0
            t0 = time.perf_counter()
            engine.prepare_prompts([r.prompt for r in requests])
            for batch in batches:
                engine.generate(batch)
            ours = time.perf_counter() - t0
            ours_calls = encoder_calls["n"]

            encoder_calls["n"] = 0
            t0 = time.perf_counter()
            for batch in batches:
                stock(batch)
            baseline = time.perf_counter() - t0
            print(f"| {name} | {ours:.2f} | {baseline:.2f} | {ours_calls} / {encoder_calls['n']} |")
            engine.close()


if __name__ == "__main__":
    main()
