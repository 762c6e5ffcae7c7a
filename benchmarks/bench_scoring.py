"""Scoring a sweep with the four metrics: ours (``score_sweep``) vs the libraries' per-image way.

    .venv/bin/python benchmarks/bench_scoring.py --images 32

Models: the full-size architectures with random weights (``random_full``: CLIP ViT-L/14 three
times, hpsv2's ViT-H-14), built on first use under ``--models-dir`` by
``lib/models/scorer_builders.py`` and loaded from disk as real weights would be. Data: ``--images``
synthetic 512x512 PNGs in a temporary sweep, ``--prompts`` distinct prompts.

Ours: ``lib.scoring.score_sweep`` for clip_score, aesthetic_score, aes_v2_score, hps_v2_score in
that order, each model loaded once (load time included); decoding and preprocessing in worker
threads, batches, each distinct prompt encoded once, and the ViT-L/14 image embedding computed
by the first metric and reused by the other two (the sweep's embedding cache starts empty).

Reference, same process, same files, same weights:
- CLIP: one image and its prompt at a time through ``CLIPProcessor`` + ``CLIPModel`` (what
  torchmetrics' functional ``clip_score`` does per call, without its per-call model load);
- LAION aesthetic v1 / v2: simple-aesthetics-predictor's README loop, one image at a time
  through the ``CLIPProcessor`` and the predictor;
- HPS v2.1: ``hpsv2.img_score.score(path, prompt, cp=checkpoint)`` for one image per call, which
  ``torch.load``s the checkpoint on every call. Its ``initialize_model`` would download the LAION
  backbone, so its module-level ``model_dict`` is filled first with the same
  ``create_model_and_transforms`` call minus the download (the checkpoint holds every weight).

The two ways alternate metric by metric (ours, then the reference), so that on a shared machine
both meet about the same background load. Printed: images/s per metric for both ways with model
loading included, the per-image scoring time without it, their ratios (wall clock; also in CPU
seconds of the process, which background load distorts less), the all-four total ratio, and the
largest score difference between the two ways (the same computation: float noise in float32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import torch

from flexyface_pipeline.lib.atomic import atomic_write_bytes
from flexyface_pipeline.lib.metrics import SCORERS
from flexyface_pipeline.lib.metrics.aesthetic import import_aesthetics_predictor
from flexyface_pipeline.lib.models.common import DigestCache, Runtime, free_memory, resolve_runtime
from flexyface_pipeline.lib.models.scorer_builders import scorer_builder
from flexyface_pipeline.lib.scoring import score_sweep
from flexyface_pipeline.lib.store import SweepStore

logger = logging.getLogger("bench_scoring")

METRICS = ("clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score")
SWEEP = "bench-scoring"
PROMPTS = (
    "portrait of a woman in a garden, golden hour, 85mm photo",
    "a red fox in fresh snow, wildlife photography",
    "an old lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen on a wooden table, studio lighting",
    "a futuristic city street at night, neon signs, rain",
    "a watercolor of a sailing boat on a calm lake",
)


@dataclass
class Timing:
    """One metric scored one way: seconds to load the model(s) and to score (wall clock, and CPU
    seconds of all this process's threads), the scores, and the 1-minute load average after."""

    load_s: float = 0.0
    score_s: float = 0.0
    load_cpu_s: float = 0.0
    score_cpu_s: float = 0.0
    load_average: float | None = None
    scores: list[float] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.load_s + self.score_s

    @property
    def total_cpu_s(self) -> float:
        return self.load_cpu_s + self.score_cpu_s


class Clock:
    """Wall-clock and process CPU time since the last ``lap``."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        elapsed = (wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu
        return elapsed


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


# -- models and data ---------------------------------------------------------------------------
def build_models(models_dir: Path, metrics: Sequence[str], *, tiny: bool = False) -> dict[str, Path]:
    """Random-weight models for ``metrics`` under ``models_dir/<metric>``, built once (the layout
    and ``.complete`` marker of ``ModelResource``'s random-weight profiles)."""
    locations = {}
    for metric in metrics:
        target = models_dir / metric
        if not (target / ".complete").is_file():
            if target.exists():
                shutil.rmtree(target)
            started = time.perf_counter()
            logger.info("building %s %s model under %s", "tiny" if tiny else "full-size random-weight", metric, target)
            builder = scorer_builder(metric)
            (builder.build_tiny if tiny else builder.build_random_full)(target)
            (target / ".complete").write_text("ok\n")
            logger.info("built %s in %.0f s", metric, time.perf_counter() - started)
        locations[metric] = target
    return locations


def synthetic_image(index: int, size: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth random colour field with fine noise: compresses and decodes like a photo-sized PNG."""
    rng = np.random.default_rng((seed, index))
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.Resampling.BICUBIC), np.int16)
    noise = rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    return PIL.Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def synthesize_sweep(data_dir: Path, count: int, prompts: Sequence[str], *, size: int = 512,
                     workers: int | None = None, sweep: str = SWEEP) -> SweepStore:
    """A sweep with ``count`` PNG images and the parameters/images tables ``score_sweep`` reads."""
    store = SweepStore(data_dir)
    image_ids = [f"{sweep}-{i:05d}" for i in range(count)]
    paths = [store.image_path(sweep, image_id) for image_id in image_ids]
    paths[0].parent.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        if not paths[i].is_file():
            synthetic_image(i, size).save(paths[i])

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(write, range(count)))
    store.write_table("parameters", sweep, pd.DataFrame({
        "image_id": image_ids, "sweep": sweep, "index": np.arange(count),
        "prompt": [prompts[i % len(prompts)] for i in range(count)], "width": size, "height": size,
    }))
    store.write_table("images", sweep, pd.DataFrame({
        "image_id": image_ids, "image_path": [store.relative(p) for p in paths],
    }))
    return store


def sweep_inputs(store: SweepStore, sweep: str = SWEEP) -> tuple[list[Path], list[str]]:
    rows = store.read_table("parameters", sweep).merge(store.read_table("images", sweep), on="image_id")
    return [store.absolute(p) for p in rows["image_path"]], list(rows["prompt"])


# -- ours ----------------------------------------------------------------------------------------
def ours_metric(metric: str, store: SweepStore, location: Path, runtime: Runtime, *, batch_size: int | None = None,
                workers: int | None = None, sweep: str = SWEEP, digests: DigestCache | None = None) -> Timing:
    """``score_sweep`` for one metric; the model load (inside the factory) is timed apart. Without
    ``digests`` the load hashes every weight file, as the first load of new weights does."""
    timing = Timing()
    scorers = []
    clock = Clock()

    def factory():
        before = clock.lap()
        scorers.append(SCORERS[metric].load(str(location), runtime, offline=True, digests=digests))
        timing.load_s, timing.load_cpu_s = clock.lap()
        timing.score_s, timing.score_cpu_s = before  # the table reads before the load
        return scorers[-1]

    table = score_sweep(metric, sweep, store, factory, batch_size=batch_size, workers=workers)
    _sync(runtime)
    wall, cpu = clock.lap()
    timing.score_s += wall
    timing.score_cpu_s += cpu
    timing.scores = table[metric].tolist()
    for scorer in scorers:
        scorer.close()
    free_memory(runtime.device)
    timing.load_average = _load_average()
    logger.info("ours %s: load %.1f s, score %.1f s (%.1f CPU s)", metric, timing.load_s, timing.score_s,
                timing.score_cpu_s)
    return timing


def clear_embeddings(store: SweepStore, sweep: str = SWEEP) -> None:
    shutil.rmtree(store.sweep_dir(sweep) / "embeddings", ignore_errors=True)


def run_ours(store: SweepStore, locations: dict[str, Path], runtime: Runtime, *, batch_size: int | None = None,
             workers: int | None = None, metrics: Sequence[str] = METRICS, sweep: str = SWEEP,
             digests: DigestCache | None = None) -> dict[str, Timing]:
    """``score_sweep`` for each metric in order, from an empty embedding cache."""
    clear_embeddings(store, sweep)
    return {m: ours_metric(m, store, locations[m], runtime, batch_size=batch_size, workers=workers, sweep=sweep,
                           digests=digests)
            for m in metrics}


# -- reference -----------------------------------------------------------------------------------
def _sync(runtime: Runtime | torch.device | str) -> None:
    device = runtime.device if isinstance(runtime, Runtime) else torch.device(runtime)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_clip(location: Path, paths: Sequence[Path], prompts: Sequence[str], device: str) -> Timing:
    """One image and its prompt per forward pass through CLIPProcessor + CLIPModel, float32."""
    from transformers import CLIPModel, CLIPProcessor

    timing = Timing()
    clock = Clock()
    model = CLIPModel.from_pretrained(location).to(device).eval()
    processor = CLIPProcessor.from_pretrained(location)
    timing.load_s, timing.load_cpu_s = clock.lap()
    for path, prompt in zip(paths, prompts):
        image = PIL.Image.open(path)
        inputs = processor(text=[prompt], images=image, return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            out = model(**inputs)
        image_embeds = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        timing.scores.append(float((image_embeds * text_embeds).sum(-1).clamp(min=0)[0]))
    _sync(device)
    timing.score_s, timing.score_cpu_s = clock.lap()
    del model
    free_memory(torch.device(device))
    return timing


def reference_aesthetic(predictor_class: str, location: Path, paths: Sequence[Path], device: str) -> Timing:
    """simple-aesthetics-predictor's README: processor + predictor, one image at a time."""
    from transformers import CLIPProcessor

    timing = Timing()
    clock = Clock()
    predictor = getattr(import_aesthetics_predictor(), predictor_class).from_pretrained(location)
    processor = CLIPProcessor.from_pretrained(location)
    predictor = predictor.to(device)
    timing.load_s, timing.load_cpu_s = clock.lap()
    for path in paths:
        image = PIL.Image.open(path)
        inputs = processor(images=image, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            outputs = predictor(**inputs)
        timing.scores.append(float(outputs.logits[0, 0]))
    _sync(device)
    timing.score_s, timing.score_cpu_s = clock.lap()
    del predictor
    free_memory(torch.device(device))
    return timing


@contextlib.contextmanager
def hpsv2_img_score(location: Path, scratch: Path) -> Iterator[tuple[Callable, Path]]:
    """hpsv2's ``img_score`` module with ``model_dict`` filled as ``initialize_model`` would fill it
    (``create_model_and_transforms`` on its module-level device, precision "amp") but without the
    LAION backbone download; yields (``img_score.score``, checkpoint path)."""
    from flexyface_pipeline.lib.metrics.hps import hpsv2_open_clip, resolve_checkpoint

    architecture, checkpoint, _ = resolve_checkpoint(str(location), "FLEXYFACE_HPS_V2_MODEL", offline=True)
    hpsv2_open_clip()  # the BPE file hpsv2's wheel lacks; registers nothing else
    from hpsv2 import img_score
    from hpsv2.src.open_clip import create_model_and_transforms

    model, _, preprocess_val = create_model_and_transforms(
        architecture, None, precision="amp", device=img_score.device, jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    saved_root = img_score.root_path
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    img_score.root_path = str(scratch)  # score() creates this directory
    try:
        yield img_score.score, checkpoint
    finally:
        img_score.model_dict.clear()
        img_score.root_path = saved_root
        free_memory()


def reference_hps(location: Path, paths: Sequence[Path], prompts: Sequence[str], scratch: Path) -> Timing:
    """``hpsv2.img_score.score`` once per image (each call reloads the checkpoint)."""
    import warnings

    timing = Timing()
    clock = Clock()
    with hpsv2_img_score(location, scratch) as (score, checkpoint):
        timing.load_s, timing.load_cpu_s = clock.lap()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp.autocast()
            for path, prompt in zip(paths, prompts):
                timing.scores.append(float(score(str(path), prompt, cp=str(checkpoint))[0]))
        _sync("cuda" if torch.cuda.is_available() else "cpu")
        timing.score_s, timing.score_cpu_s = clock.lap()
    return timing


def reference_metric(metric: str, locations: dict[str, Path], paths: Sequence[Path], prompts: Sequence[str],
                     device: str, scratch: Path) -> Timing:
    if metric == "clip_score":
        timing = reference_clip(locations[metric], paths, prompts, device)
    elif metric == "aesthetic_score":
        timing = reference_aesthetic("AestheticsPredictorV1", locations[metric], paths, device)
    elif metric == "aes_v2_score":
        timing = reference_aesthetic("AestheticsPredictorV2Linear", locations[metric], paths, device)
    elif metric == "hps_v2_score":
        timing = reference_hps(locations[metric], paths, prompts, scratch)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    timing.load_average = _load_average()
    logger.info("reference %s: load %.1f s, score %.1f s (%.1f CPU s)", metric, timing.load_s, timing.score_s,
                timing.score_cpu_s)
    return timing


def run_reference(locations: dict[str, Path], paths: Sequence[Path], prompts: Sequence[str], device: str,
                  scratch: Path, metrics: Sequence[str] = METRICS) -> dict[str, Timing]:
    return {m: reference_metric(m, locations, paths, prompts, device, scratch) for m in metrics}


def run_interleaved(store: SweepStore, locations: dict[str, Path], runtime: Runtime, scratch: Path, *,
                    batch_size: int | None = None, workers: int | None = None,
                    metrics: Sequence[str] = METRICS,
                    digests: DigestCache | None = None) -> tuple[dict[str, Timing], dict[str, Timing]]:
    """Ours then the reference, metric by metric (ours keeps its embedding cache across metrics):
    on a shared machine both ways of one metric meet about the same background load."""
    clear_embeddings(store)
    paths, prompts = sweep_inputs(store)
    ours, reference = {}, {}
    for metric in metrics:
        ours[metric] = ours_metric(metric, store, locations[metric], runtime, batch_size=batch_size, workers=workers,
                                   digests=digests)
        reference[metric] = reference_metric(metric, locations, paths, prompts, str(runtime.device), scratch)
    return ours, reference


def warm_imports() -> None:
    """Import what both ways use before anything is timed (the first import costs seconds)."""
    from transformers import CLIPModel, CLIPProcessor  # noqa: F401

    import_aesthetics_predictor()

    from flexyface_pipeline.lib.metrics.hps import hpsv2_open_clip

    hpsv2_open_clip()
    from hpsv2 import img_score  # noqa: F401


# -- report --------------------------------------------------------------------------------------
def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                            if line.startswith("Model name")), platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = os.getloadavg()
    return info


def compare(ours: dict[str, Timing], reference: dict[str, Timing], count: int, reference_count: int) -> dict:
    """Per metric and in total: images/s with model load included, ms per image without, ratios
    (wall clock, and CPU seconds, which background load on a shared machine distorts less).

    When the reference scored fewer images than ours (``reference_count < count``), its time for
    ``count`` images is its load time plus its per-image time times ``count``.
    """
    def scaled(t: Timing, cpu: bool = False) -> float:
        load, score = (t.load_cpu_s, t.score_cpu_s) if cpu else (t.load_s, t.score_s)
        return load + score * count / reference_count

    rows = {}
    for metric in ours:
        o, r = ours[metric], reference.get(metric)
        row = {"ours_load_s": o.load_s, "ours_score_s": o.score_s, "ours_load_cpu_s": o.load_cpu_s,
               "ours_score_cpu_s": o.score_cpu_s, "ours_images_per_s": count / o.total_s,
               "ours_ms_per_image": 1000 * o.score_s / count, "ours_load_average": o.load_average}
        if r is not None:
            n = min(reference_count, count)
            row.update({
                "reference_images": reference_count, "reference_load_s": r.load_s, "reference_score_s": r.score_s,
                "reference_load_cpu_s": r.load_cpu_s, "reference_score_cpu_s": r.score_cpu_s,
                "reference_images_per_s": count / scaled(r),
                "reference_ms_per_image": 1000 * r.score_s / reference_count,
                "reference_load_average": r.load_average,
                "ratio_with_load": scaled(r) / o.total_s,
                "ratio_without_load": (r.score_s / reference_count) / (o.score_s / count),
                "cpu_ratio_with_load": scaled(r, cpu=True) / o.total_cpu_s,
                "cpu_ratio_without_load": (r.score_cpu_s / reference_count) / (o.score_cpu_s / count),
                "max_abs_diff": float(np.max(np.abs(np.asarray(o.scores[:n]) - np.asarray(r.scores[:n])))),
            })
        rows[metric] = row
    total = {"images": count, "ours_s": sum(t.total_s for t in ours.values()),
             "ours_cpu_s": sum(t.total_cpu_s for t in ours.values())}
    if reference and all(m in reference for m in ours):
        total["reference_s"] = sum(scaled(reference[m]) for m in ours)
        total["reference_cpu_s"] = sum(scaled(reference[m], cpu=True) for m in ours)
        total["ratio"] = total["reference_s"] / total["ours_s"]
        total["cpu_ratio"] = total["reference_cpu_s"] / total["ours_cpu_s"]
    return {"metrics": rows, "total": total}


def _ratio(value: float) -> str:
    return f"{value:.2f}×" if value < 100 else f"{value:.0f}×"


def format_report(result: dict, count: int, reference_count: int, title: str) -> str:
    header = (f"{'metric':<16}{'ours img/s':>11}{'ref img/s':>11}{'ratio':>9}{'ours ms/img':>13}{'ref ms/img':>12}"
              f"{'ratio':>9}{'CPU ratio':>11}{'load s ours/ref':>17}{'max|Δ|':>10}")
    lines = [title, header, f"{'':<16}{'(model load included)':>31}{'(scoring only)':>34}{'(scoring)':>11}"]
    for metric, row in result["metrics"].items():
        if "reference_images_per_s" not in row:
            lines.append(f"{metric:<16}{row['ours_images_per_s']:>11.3f}{'':>20}{row['ours_ms_per_image']:>13.0f}")
            continue
        lines.append(
            f"{metric:<16}{row['ours_images_per_s']:>11.3f}{row['reference_images_per_s']:>11.3f}"
            f"{_ratio(row['ratio_with_load']):>9}{row['ours_ms_per_image']:>13.0f}{row['reference_ms_per_image']:>12.0f}"
            f"{_ratio(row['ratio_without_load']):>9}{_ratio(row['cpu_ratio_without_load']):>11}"
            f"{row['ours_load_s']:>9.1f} /{row['reference_load_s']:>5.1f}{row['max_abs_diff']:>10.1e}")
    total = result["total"]
    line = f"all four, {count} images, model loads included: ours {total['ours_s']:.1f} s"
    if "ratio" in total:
        scaled = f" (extrapolated from {reference_count} images)" if reference_count != count else ""
        line += (f", reference {total['reference_s']:.1f} s{scaled}: ratio {_ratio(total['ratio'])} "
                 f"(CPU seconds: {total['ours_cpu_s']:.0f} vs {total['reference_cpu_s']:.0f}, "
                 f"ratio {_ratio(total['cpu_ratio'])})")
    lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="synthetic 512x512 images (default 32)")
    parser.add_argument("--prompts", type=int, default=4, help=f"distinct prompts, 1..{len(PROMPTS)} (default 4)")
    parser.add_argument("--models-dir", type=Path, default=Path("data/models/random_full"),
                        help="where the random-weight models are built and kept (default data/models/random_full)")
    parser.add_argument("--work-dir", type=Path, default=None, help="data directory for the synthetic sweep "
                        "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="ours: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--batch-size", type=int, default=None, help="ours: default sized to the device")
    parser.add_argument("--workers", type=int, default=None, help="ours: preprocessing threads (default: cores)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--remembered-digests", action="store_true",
                        help="ours loads as a re-score does: weight hashes remembered from an untimed first load "
                        "(default: every weight file hashed, as on the first load of new weights)")
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight models (checks the script in seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.images < 1 or not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--images must be >= 1 and --prompts in 1..{len(PROMPTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    runtime = resolve_runtime(args.device, args.dtype)
    started = time.perf_counter()
    models_dir = args.models_dir.with_name("tiny") if args.tiny else args.models_dir
    locations = build_models(models_dir, METRICS, tiny=args.tiny)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scoring-")))
        store = synthesize_sweep(work, args.images, PROMPTS[: args.prompts])
        info = machine()
        warm_imports()
        digests = None
        if args.remembered_digests:
            digests = DigestCache(work / "model_digests.json")
            for metric in METRICS:  # untimed: hashes the weights once and remembers them
                SCORERS[metric].load(str(locations[metric]), runtime, offline=True, digests=digests).close()
        if args.skip_reference:
            ours = run_ours(store, locations, runtime, batch_size=args.batch_size, workers=args.workers,
                            digests=digests)
            reference = {}
        else:
            ours, reference = run_interleaved(store, locations, runtime, work / "hpsv2-root",
                                              batch_size=args.batch_size, workers=args.workers, digests=digests)
    result = compare(ours, reference, args.images, args.images)
    result.update(machine=info, images=args.images, prompts=args.prompts, runtime=str(runtime),
                  wall_s=time.perf_counter() - started, date=time.strftime("%Y-%m-%d"))
    with contextlib.suppress(OSError, AttributeError):
        result["machine"]["load_average_end"] = os.getloadavg()
    kind = "tiny random-weight models" if args.tiny else "random-weight full-size models"
    kind += ", weight hashes remembered" if args.remembered_digests else ", every weight file hashed"
    result["remembered_digests"] = args.remembered_digests
    title = (f"{args.images} images 512x512, {args.prompts} prompts, {kind}; "
             f"ours on {runtime.device} {str(runtime.dtype).removeprefix('torch.')}, reference float32 "
             f"({info.get('gpu') or info['cpu']}, {info['cores']} cores, torch {info['torch']})")
    sys.stdout.write(format_report(result, args.images, args.images, title))
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
