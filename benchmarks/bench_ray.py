"""Generation spread over Ray workers (lib/distributed.py): scaling and the driver's overhead.

1. Simulation: a stand-in engine whose batches take a fixed time (``time.sleep``: no CPU, like a
   GPU busy with a batch) runs through the real driver path (``generate_sweep`` with a
   ``RayBackend``: planning, the shared queue, PNG bytes back, atomic writes, the images table)
   on 1, 2, 4, 8, 16 workers of a local Ray cluster (workers reserve no CPU). Throughput against
   the ideal N× of the single-worker time, and the driver's CPU seconds per image. Baseline in
   the same run: the same stand-in engine in this process (no Ray).
2. Real CPU run: the tiny SDXL model, in this process (torch on 2 threads and on 1) against 1
   and 2 Ray workers (one CPU, one torch thread each), models loaded before timing.

    .venv/bin/python benchmarks/bench_ray.py                      # both parts
    .venv/bin/python benchmarks/bench_ray.py --skip-real --images 400 --actors 1,8

Workers start (a process, imports, the model) before the timed part: a run pays that once per
stage, seconds to a minute, next to sweeps of minutes to hours.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexyface_pipeline.lib.distributed import RayBackend, WorkerSettings  # noqa: E402
from flexyface_pipeline.lib.engines.base import Engine  # noqa: E402
from flexyface_pipeline.lib.generation import generate_sweep  # noqa: E402
from flexyface_pipeline.lib.models.common import ModelIdentity  # noqa: E402
from flexyface_pipeline.lib.store import SweepStore  # noqa: E402

QUIET = logging.getLogger("bench_ray.quiet")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


class SleepEngine(Engine):
    """Batches take ``seconds_per_image`` × their size without using a core; 64×64 images."""

    name = "realvis_xl"  # plans batches like it: by steps and size
    default_model = "stand-in/sleep"
    setting = "-"
    identity = ModelIdentity("stand-in/sleep", "none")
    needs_warm_up = False

    def __init__(self, seconds_per_image: float) -> None:
        self.seconds_per_image = seconds_per_image

    @classmethod
    def load(cls, *args, **kwargs):
        raise NotImplementedError

    @classmethod
    def build_tiny(cls, directory):
        raise NotImplementedError

    @classmethod
    def build_random_full(cls, directory):
        raise NotImplementedError

    def batch_size_for(self, width: int, height: int) -> int:
        return 1

    def generate(self, batch):
        from PIL import Image

        time.sleep(self.seconds_per_image * len(batch))
        return [Image.new("RGB", (r.width, r.height), (r.seed % 256, r.steps % 256, 7)) for r in batch]

    def close(self) -> None:
        pass


class SleepLoader:
    """A worker's loader for the stand-in engine (pickled by value from this script)."""

    def __init__(self, fields) -> None:
        self.seconds = float(fields["seconds_per_image"])

    def engine(self, name: str) -> SleepEngine:
        return SleepEngine(self.seconds)

    def scorer(self, metric: str):
        raise NotImplementedError

    def release(self) -> None:
        pass


def sweep_rows(sweep: str, images: int, size: int = 64, engine: str = "realvis_xl") -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "sweep": sweep,
        "image_id": [f"{sweep}-{i:05d}" for i in range(images)],
        "prompt": [f"a portrait, style {i % 4}" for i in range(images)],
        "steps": rng.integers(4, 9, images),
        "guidance": np.round(rng.uniform(1, 8, images), 3),
        "seed": np.arange(images) + 1000,
        "width": size,
        "height": size,
        "engine": engine,
    })


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def simulation(args, root: Path) -> list[str]:
    t = args.seconds_per_image
    lines = [f"## Simulation: {args.images} images, batches of {args.batch}, {t * 1000:.0f} ms per image "
             f"({t * args.batch * 1000:.0f} ms per batch), stand-in engine (sleep)", "",
             "| workers | wall s | images/s | ideal images/s | of ideal | driver CPU ms/image | retried |",
             "|---|---|---|---|---|---|---|"]
    # Baseline: the same engine in this process, no Ray.
    n = args.baseline_images
    store = SweepStore(root / "inproc")
    rep, wall, cpu = timed(lambda: generate_sweep(sweep_rows("inproc", n), store, lambda: SleepEngine(t),
                                                  batch_size=args.batch, log=QUIET))
    assert rep.generated == n
    lines.append(f"| in process (no Ray, {n} images) | {wall:.1f} | {n / wall:.1f} | {1 / t:.1f} | "
                 f"{(n / wall) * t:.1%} | {cpu / n * 1000:.2f} | – |")
    print(lines[-1], flush=True)
    settings = WorkerSettings(loader=SleepLoader, fields={"seconds_per_image": t})
    for actors in args.actors:
        backend = RayBackend("auto", settings, device="cpu", max_actors=actors, cpus_per_actor=0)
        try:
            warm = SweepStore(root / f"warm{actors}")
            generate_sweep(sweep_rows("warm", 2 * actors), warm, None, batch_size=1, log=QUIET, backend=backend)
            backend.wait_ready()
            store = SweepStore(root / f"ray{actors}")
            rep, wall, cpu = timed(lambda: generate_sweep(sweep_rows("sim", args.images), store, None,
                                                          batch_size=args.batch, log=QUIET, backend=backend))
            assert rep.generated == args.images and len(list(store.images_dir("sim").glob("*.png"))) == args.images
            rate, ideal = args.images / wall, actors / t
            lines.append(f"| {actors} | {wall:.1f} | {rate:.1f} | {ideal:.1f} | {rate / ideal:.1%} | "
                         f"{cpu / args.images * 1000:.2f} | {len(backend.retried())} |")
            print(lines[-1], flush=True)
        finally:
            backend.release()
    return lines


def real_cpu(args, root: Path) -> list[str]:
    import torch

    from flexyface_pipeline.lib.engines import get_engine
    from flexyface_pipeline.lib.models.common import resolve_runtime

    models_dir = root / "models"
    engine_cls = get_engine("realvis_xl")
    (models_dir / "tiny").mkdir(parents=True)
    engine_cls.build_tiny(models_dir / "tiny" / "realvis_xl")
    (models_dir / "tiny" / "realvis_xl" / ".complete").write_text("ok\n")
    n = args.real_images
    lines = [f"## Real CPU run: tiny SDXL, {n} images of {args.real_size}², steps 4–8, batches of 1, "
             "models loaded before timing", "", "| how | wall s | images/s | vs in process (2 threads) |", "|---|---|---|---|"]
    base = None
    for threads in (2, 1):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            engine = engine_cls.load(str(models_dir / "tiny" / "realvis_xl"), resolve_runtime("cpu", "fp32"), offline=True)
            store = SweepStore(root / f"real-inproc{threads}")
            _, wall, _ = timed(lambda: generate_sweep(sweep_rows("real", n, args.real_size), store, lambda: engine,
                                                      batch_size=1, log=QUIET))
            engine.close()
        finally:
            torch.set_num_threads(previous)
        base = base or wall
        lines.append(f"| in process, torch {threads} thread(s) | {wall:.1f} | {n / wall:.2f} | {base / wall:.2f}× |")
        print(lines[-1], flush=True)
    from flexyface_pipeline.defs.resources import worker_models

    fields = {"profile": "tiny", "device": "cpu", "dtype": "fp32", "models_dir": str(models_dir),
              "data_dir": str(root / "real-data")}
    for actors in (1, 2):
        backend = RayBackend("auto", WorkerSettings(worker_models, fields), device="cpu", max_actors=actors)
        try:
            generate_sweep(sweep_rows("warm", actors, args.real_size), SweepStore(root / f"real-warm{actors}"), None,
                           batch_size=1, log=QUIET, backend=backend)
            backend.wait_ready()
            store = SweepStore(root / f"real-ray{actors}")
            _, wall, _ = timed(lambda: generate_sweep(sweep_rows("real", n, args.real_size), store, None,
                                                      batch_size=1, log=QUIET, backend=backend))
            lines.append(f"| Ray, {actors} worker(s) (1 CPU each) | {wall:.1f} | {n / wall:.2f} | {base / wall:.2f}× |")
            print(lines[-1], flush=True)
        finally:
            backend.release()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--baseline-images", type=int, default=200)
    parser.add_argument("--seconds-per-image", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--actors", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--real-images", type=int, default=16)
    parser.add_argument("--real-size", type=int, default=64)
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    out: list[str] = []
    try:
        if not args.skip_sim:
            out += simulation(args, root) + [""]
        if not args.skip_real:
            out += real_cpu(args, root)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
