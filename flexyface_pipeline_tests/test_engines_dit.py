"""The diffusion-transformer engines (FLUX.1 schnell, SD 3.5, HiDream-I1, FLUX.2 dev) on tiny
random-weight pipelines of the real classes, loaded through the real loading path.

Reference outputs come from diffusers' own pipelines (one image per call, prompt strings, seeded
CPU generator) loaded from the same directory: they encode the prompt inside the call, with every
model on one device, so they are also the "all at once" baseline of text-encoder-first generation.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flexyface_pipeline.lib.engines import (
    ENGINES,
    Flux1SchnellEngine,
    Flux2DevEngine,
    HiDreamEngine,
    ImageRequest,
    SD35Engine,
    get_engine,
)
from flexyface_pipeline.lib.engines.dit import TextFirstEngine
from flexyface_pipeline.lib.models.common import MissingWeightsError, resolve_runtime

CPU = torch.device("cpu")
NAMES = ["flux1_schnell", "sd35", "hidream", "flux2_dev"]
# Batched transformer calls and prompts encoded several at a time sum in another order than
# single-image calls: in float32 the images differ by a few 1e-6 on [0, 1] pixels (measured: at
# most 2.3e-6 over the four engines).
FP32_ATOL = 1e-5
PROMPTS = ["a portrait photo of a woman", "a dog on a beach", "an old man, studio light", "a red car"]
# Per-image guidance where the engine has guidance: two different values in one batch.
GUIDANCE = {"flux1_schnell": [None, None], "sd35": [3.0, 6.5], "hidream": [2.5, 5.0], "flux2_dev": [2.0, 5.5]}


def _request(name: str, i: int, *, seed: int | None = None, guidance: float | None = None, steps: int = 2,
             prompt: str | None = None, width: int = 64, height: int = 64) -> ImageRequest:
    return ImageRequest(
        image_id=f"img-{i:03d}", prompt=PROMPTS[i % len(PROMPTS)] if prompt is None else prompt, steps=steps,
        guidance=GUIDANCE[name][i % 2] if guidance is None else guidance, seed=100 + i if seed is None else seed,
        width=width, height=height,
    )


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Tiny pipelines, built on first use (one directory per engine)."""
    root = tmp_path_factory.mktemp("dit-engines")

    def build(name: str) -> Path:
        get_engine(name).build_tiny(root / name)
        return root / name

    yield _Lazy(build)


class _Lazy(dict):
    """``make(name)`` on first use of ``name``, then the same object."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, name: str):
        self[name] = value = self.make(name)
        return value


@pytest.fixture(scope="module")
def engines(tiny_dirs) -> Iterator[dict[str, TextFirstEngine]]:
    """One loaded engine per name for the tests that do not change it."""
    loaded = _Lazy(lambda name: _load(name, tiny_dirs[name]))
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.fixture(scope="module")
def stocks(tiny_dirs) -> dict:
    """diffusers' own pipeline per name, on the same weights."""
    return _Lazy(lambda name: _stock(name, tiny_dirs[name]))


def _load(name: str, directory: Path, **kwargs) -> TextFirstEngine:
    return get_engine(name).load(str(directory), resolve_runtime("cpu"), offline=True, **kwargs)


def _stock(name: str, directory: Path):
    import diffusers

    pipe = getattr(diffusers, get_engine(name).pipeline_name).from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if name == "hidream":
        pipe.default_sample_size = 8  # HiDream rescales to this area x 8^2: 64x64 stays 64x64
    return pipe


def _stock_images(name: str, pipe, requests: list[ImageRequest]) -> np.ndarray:
    """diffusers' own output: one call per image, the prompt as a string."""
    images = []
    for r in requests:
        kwargs = {"guidance_scale": r.guidance} if r.guidance is not None else {"guidance_scale": 0.0}
        if name in ("flux1_schnell", "sd35"):
            kwargs["max_sequence_length"] = 256
        images.append(pipe(
            prompt=r.prompt, num_inference_steps=r.steps, width=r.width, height=r.height,
            generator=torch.Generator(CPU).manual_seed(r.seed), output_type="np", **kwargs,
        ).images[0])
    return np.stack(images)


# -- registry and declared semantics ------------------------------------------------------------


def test_registry_and_declared_parameters() -> None:
    assert {name: ENGINES[name] for name in NAMES} == {
        "flux1_schnell": Flux1SchnellEngine, "sd35": SD35Engine, "hidream": HiDreamEngine, "flux2_dev": Flux2DevEngine,
    }
    assert {name: (ENGINES[name].default_model, ENGINES[name].setting) for name in NAMES} == {
        "flux1_schnell": ("black-forest-labs/FLUX.1-schnell", "FLEXYFACE_FLUX1_SCHNELL_MODEL"),
        "sd35": ("stabilityai/stable-diffusion-3.5-large", "FLEXYFACE_SD35_MODEL"),
        "hidream": ("HiDream-ai/HiDream-I1-Full", "FLEXYFACE_HIDREAM_MODEL"),
        "flux2_dev": ("black-forest-labs/FLUX.2-dev", "FLEXYFACE_FLUX2_DEV_MODEL"),
    }
    assert {name: ENGINES[name].guidance_kind for name in NAMES} == {
        "flux1_schnell": "none", "sd35": "cfg", "hidream": "cfg", "flux2_dev": "distilled",
    }
    for name in NAMES:
        cls = ENGINES[name]
        low, high = cls.steps_limits
        assert low <= cls.default_steps[0] <= cls.default_steps[1] <= high, name
        assert cls.size_multiple == 16, name
        if cls.uses_guidance():
            g_low, g_high = cls.guidance_limits
            assert g_low <= cls.default_guidance[0] < cls.default_guidance[1] <= g_high, name
        else:
            assert cls.guidance_limits is None and cls.default_guidance is None, name
    assert Flux1SchnellEngine.steps_limits == (1, 8) and Flux1SchnellEngine.max_sequence_length == 256


def test_batch_keys_split_cfg_modes_only_where_guidance_is_cfg() -> None:
    same = dict(steps=4, width=64, height=64)
    cfg_on, cfg_off = (ImageRequest("a", "p", guidance=g, seed=1, **same) for g in (3.0, 1.0))
    assert SD35Engine.batch_key(cfg_on) != SD35Engine.batch_key(cfg_off)
    assert HiDreamEngine.batch_key(cfg_on) != HiDreamEngine.batch_key(cfg_off)
    assert Flux2DevEngine.batch_key(cfg_on) == Flux2DevEngine.batch_key(cfg_off)  # per-image embedded guidance
    plan = Flux2DevEngine.plan_batches([ImageRequest(f"i{k}", "p", guidance=1.0 + k, seed=k, **same)
                                        for k in range(4)], max_batch=8)
    assert [len(batch) for batch in plan] == [4]


# -- generation against diffusers -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_batch_with_per_image_prompts_seeds_and_guidance_matches_stock(name: str, engines, stocks) -> None:
    engine = engines[name]
    batch = [_request(name, 0), _request(name, 1)]
    engine.prepare_prompts([r.prompt for r in batch])
    images = engine.generate_arrays(batch)
    stock = _stock_images(name, stocks[name], batch)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32
    assert np.abs(images - stock).max() <= FP32_ATOL
    assert np.abs(images[0] - images[1]).max() > 0.05  # different prompts and seeds: different images
    pil = np.stack([np.asarray(im) for im in engine.generate(batch)])
    assert np.array_equal(pil, (images * 255).round().astype(np.uint8))
    if engine.uses_guidance():
        # Guidance is per image and it matters: image 0 at image 1's value is another image.
        swapped = engine.generate_arrays([_request(name, 0, guidance=GUIDANCE[name][1])])[0]
        assert np.abs(swapped - images[0]).max() > 0.01


def test_guidance_free_engine_ignores_guidance(engines) -> None:
    engine = engines["flux1_schnell"]
    unguided = engine.generate_arrays([_request("flux1_schnell", 0)])
    assert _request("flux1_schnell", 0).guidance is None
    given = engine.generate_arrays([_request("flux1_schnell", 0, guidance=7.0)])
    assert np.array_equal(unguided, given)
    with pytest.raises(ValueError, match="needs a guidance value"):
        engines["sd35"].generate([ImageRequest("x", "p", steps=2, guidance=None, seed=1, width=64, height=64)])


def test_flux1_schnell_refuses_guidance_distilled_weights(tiny_dirs, tmp_path: Path) -> None:
    copy = tmp_path / "dev-like"
    shutil.copytree(tiny_dirs["flux1_schnell"], copy)
    config_path = copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["guidance_embeds"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"flux1_schnell: .*guidance embedding.*FLEXYFACE_FLUX1_SCHNELL_MODEL"):
        _load("flux1_schnell", copy)


def test_hidream_keeps_the_requested_size() -> None:
    """HiDreamImagePipeline scales (w, h) to the area (default_sample_size * 8)**2, in multiples of 16
    (its own arithmetic, repeated here); the engine's default_sample_size makes that the identity."""
    import math

    from flexyface_pipeline.lib.engines.dit import exact_sample_size

    for width, height in [(64, 64), (1024, 1024), (832, 1216), (1344, 768), (512, 1536), (1008, 1024)]:
        s_max = (exact_sample_size(width, height, 8) * 8) ** 2
        scale = math.sqrt(s_max / (width * height))
        assert (int(width * scale // 16 * 16), int(height * scale // 16 * 16)) == (width, height)


# -- text encoders first --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_text_encoders_never_share_the_device_with_the_transformer(name: str, tiny_dirs, stocks) -> None:
    directory = tiny_dirs[name]
    engine = _load(name, directory)
    pipe = engine.pipeline
    events: list[tuple[str, str, frozenset]] = []  # (model, "forward" or "to", resident set at that moment)

    def watch(model: str) -> None:
        module = getattr(pipe, model)
        module.register_forward_pre_hook(lambda *_: events.append((model, "forward", frozenset(engine.resident))))
        move = module.to

        def to(*args, **kwargs):
            events.append((model, "to", frozenset(engine.resident)))
            return move(*args, **kwargs)

        module.to = to

    for model in (*engine.text_encoders, "transformer"):
        watch(model)
    batch = [_request(name, 0), _request(name, 1)]
    with engine:
        engine.prepare_prompts([r.prompt for r in batch] + [batch[0].prompt])  # repeats are encoded once
        prepared = len(events)
        forwards = [e for e in events if e[1] == "forward"]
        assert {e[0] for e in forwards} == set(engine.text_encoders)
        assert engine.encode_calls == 1 and engine.resident == set()  # encoders parked again
        assert all(e[0] in e[2] and "transformer" not in e[2] for e in forwards)
        images = engine.generate_arrays(batch)
        during = events[prepared:]
        assert [e for e in during if e[1] == "forward" and e[0] != "transformer"] == []  # no encoder ran
        assert any(e[0] == "transformer" and e[1] == "forward" for e in during)
        assert all(not (set(engine.text_encoders) & e[2]) for e in during if e[0] == "transformer")
        assert engine.resident == {"transformer", "vae"}
        # A prompt that was not prepared: encoded on demand, the transformer parked meanwhile.
        extra = _request(name, 2, prompt="a lighthouse at night")
        before = len(events)
        late = engine.generate_arrays([extra])
        on_demand = events[before:]
        encoder_runs = [e for e in on_demand if e[1] == "forward" and e[0] in engine.text_encoders]
        assert encoder_runs and all("transformer" not in e[2] for e in encoder_runs)
        assert engine.encode_calls == 2
        stock = stocks[name]
        assert np.abs(images - _stock_images(name, stock, batch)).max() <= FP32_ATOL
        assert np.abs(late - _stock_images(name, stock, [extra])).max() <= FP32_ATOL


def test_flux2_prompt_embeddings_are_the_pipelines_default_shape(tiny_dirs) -> None:
    with _load("flux2_dev", tiny_dirs["flux2_dev"]) as engine:
        engine.prepare_prompts(["a red car"])
        embeddings = engine._embeddings["a red car"]["prompt_embeds"]
        # 512 tokens (padded), hidden states of Mistral layers 10, 20, 30 stacked: 3 x 16.
        assert embeddings.shape == (1, 512, 48) and embeddings.device == CPU


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_cached_hub_id_loads_offline_with_its_revision(name: str, tiny_dirs, engines, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hf-cache" / f"models--flexyface--tiny-{name}"  # the Hugging Face cache layout
    shutil.copytree(tiny_dirs[name], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with get_engine(name).load(f"flexyface/tiny-{name}", resolve_runtime("cpu"), offline=True) as cached:
        assert cached.identity.as_columns("engine") == {
            "engine_model": f"flexyface/tiny-{name}", "engine_model_revision": commit,
        }
        image = cached.generate_arrays([_request(name, 3)])
    local = engines[name]
    assert local.identity.revision.startswith("sha256:") and local.identity.model_id == str(tiny_dirs[name])
    assert np.abs(image - local.generate_arrays([_request(name, 3)])).max() <= FP32_ATOL


@pytest.mark.parametrize("name", NAMES)
def test_missing_weights_name_the_engine_and_its_setting(name: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    cls = get_engine(name)
    with pytest.raises(MissingWeightsError, match=rf"{name}.*does not exist.*{cls.setting}"):
        cls.load(str(tmp_path / "no-such-model"), resolve_runtime("cpu"), offline=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=rf"{name}.*no model_index\.json.*{cls.setting}"):
        cls.load(str(tmp_path / "empty"), resolve_runtime("cpu"), offline=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    offline = rf"{name}.*{cls.default_model}.*not available offline.*{cls.setting}"
    with pytest.raises(MissingWeightsError, match=offline):
        cls.load(cls.default_model, resolve_runtime("cpu"), offline=True)


def test_hidream_loads_llama_from_its_own_location(tiny_dirs, engines, tmp_path: Path) -> None:
    """HiDream's hub releases lack text_encoder_4: the Llama model comes from its own setting."""
    full = tiny_dirs["hidream"]
    release = tmp_path / "release"
    shutil.copytree(full, release, ignore=shutil.ignore_patterns("text_encoder_4", "tokenizer_4"))
    index = json.loads((release / "model_index.json").read_text())
    index["text_encoder_4"] = index["tokenizer_4"] = [None, None]
    (release / "model_index.json").write_text(json.dumps(index))
    llama = tmp_path / "llama"
    shutil.copytree(full / "text_encoder_4", llama)
    shutil.copytree(full / "tokenizer_4", llama, dirs_exist_ok=True)
    with pytest.raises(MissingWeightsError, match=r"hidream Llama text encoder.*FLEXYFACE_HIDREAM_LLAMA_MODEL"):
        _load("hidream", release, text_encoder_4=str(tmp_path / "no-llama"))
    request = _request("hidream", 0)
    with _load("hidream", release, text_encoder_4=str(llama)) as split:
        assert np.array_equal(split.generate_arrays([request]), engines["hidream"].generate_arrays([request]))


def test_cpu_offload_is_a_logged_no_op_on_a_cpu(tiny_dirs, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), _load("sd35", tiny_dirs["sd35"], cpu_offload=True) as engine:
        assert not engine.offloaded
        assert engine.generate_arrays([_request("sd35", 0)]).shape == (1, 64, 64, 3)
    assert "sd35: cpu_offload has no effect on cpu" in caplog.text


# -- bad requests ---------------------------------------------------------------------------------


def test_bad_batches_are_refused_before_any_work(tiny_dirs) -> None:
    with _load("sd35", tiny_dirs["sd35"]) as engine:
        with pytest.raises(ValueError, match="multiples of 16, got 72x64"):
            engine.generate([_request("sd35", 0, width=72)])
        with pytest.raises(ValueError, match=r"guidance mode \(> 1 or <= 1\)"):
            engine.generate([_request("sd35", 0, guidance=3.0), _request("sd35", 1, guidance=1.0)])
        with pytest.raises(ValueError, match="empty"):
            engine.generate([])
        other_scheduler = replace(_request("sd35", 0), scheduler="dpmpp_2m")  # not the weights' own
        with pytest.raises(ValueError, match="sd35: scheduler 'dpmpp_2m' is not supported"):
            engine.generate([other_scheduler])
        assert engine.encode_calls == 0
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([_request("sd35", 0)])


# -- full-size architectures ----------------------------------------------------------------------


def test_full_size_configs_have_the_published_sizes() -> None:
    from flexyface_pipeline.lib.models.dit_builders import meta_components

    def billions(pipeline_name: str) -> dict[str, float]:
        return {name: round(sum(p.numel() for p in module.parameters()) / 1e9, 2)
                for name, module in meta_components(pipeline_name).items()}

    # Published sizes: FLUX.1 12 B transformer (11.90 B for [dev], with its guidance embedder),
    # T5-XXL encoder 4.76 B, CLIP-L 123 M; SD 3.5 Large 8.1 B; HiDream-I1 17 B, Llama-3.1 8.0 B;
    # FLUX.2 [dev] 32 B, Mistral-Small-3.x 24 B.
    assert billions("FluxPipeline") == {"transformer": 11.89, "vae": 0.08, "text_encoder": 0.12,
                                        "text_encoder_2": 4.76}
    sd35 = billions("StableDiffusion3Pipeline")
    assert sd35["transformer"] == 8.06 and sd35["text_encoder_2"] == 0.69 and sd35["text_encoder_3"] == 4.76
    hidream = billions("HiDreamImagePipeline")
    assert 17.0 <= hidream["transformer"] <= 17.2 and hidream["text_encoder_4"] == 8.03
    flux2 = billions("Flux2Pipeline")
    assert 32.0 <= flux2["transformer"] <= 32.3 and 24.0 <= flux2["text_encoder"] <= 24.1


# -- settings -------------------------------------------------------------------------------------


def test_model_resource_settings_for_the_new_engines(tmp_path: Path) -> None:
    from flexyface_pipeline.defs.resources import ModelResource, StorageResource

    storage = StorageResource(data_dir=str(tmp_path / "data"))
    models = ModelResource(storage=storage, profile="tiny", device="cpu", models_dir=str(tmp_path / "models"),
                           cpu_offload="true")
    models.validate()
    try:
        engine = models.engine("flux1_schnell")  # built on first use, loaded with cpu_offload (a no-op here)
        assert isinstance(engine, Flux1SchnellEngine) and not engine.offloaded
        assert engine.generate_arrays([_request("flux1_schnell", 0)]).shape == (1, 64, 64, 3)
    finally:
        models.release()
    assert {key: models.configured_location(key) for key in ("sd35", "hidream_llama", "flux2_dev")} == {
        "sd35": "stabilityai/stable-diffusion-3.5-large", "hidream_llama": "meta-llama/Llama-3.1-8B-Instruct",
        "flux2_dev": "black-forest-labs/FLUX.2-dev",
    }
    with pytest.raises(ValueError, match=r"FLEXYFACE_CPU_OFFLOAD='maybe': expected true or false"):
        ModelResource(storage=storage, profile="tiny", device="cpu", cpu_offload="maybe").validate()
    with pytest.raises(ValueError, match=r"FLEXYFACE_HIDREAM_LLAMA_MODEL=.*does not exist.*FLEXYFACE_HIDREAM_LLAMA_MODEL"):
        ModelResource(storage=storage, profile="real", device="cpu",
                      hidream_llama_model=str(tmp_path / "no-llama")).validate()
