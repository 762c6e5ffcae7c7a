"""The RealVisXL engine on tiny random-weight SDXL pipelines, loaded through the real loading path.

Reference outputs come from diffusers' own ``StableDiffusionXLPipeline`` (one image per call,
seeded CPU generator) loaded from the same directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from flexyface_pipeline.lib.engines import ENGINES, ImageRequest, RealVisXLEngine, get_engine
from flexyface_pipeline.lib.models.common import MissingWeightsError, Runtime, resolve_runtime

CPU = torch.device("cpu")
# A batched UNet call sums in another order than a single-image call: in float32 the images of a
# batch differ from single-image ones by a few 1e-6 (measured: at most 2.8e-6 on [0, 1] pixels).
FP32_ATOL = 1e-5
# bfloat16 pixels come out of the VAE rounded to 8 significant bits: any deviation is at least one
# bf16 step (1/256 above 0.5). Rounding the guidance scale to bf16 would cost 0.0078 here.
BF16_ATOL = 1e-3

PROMPTS = ["a portrait photo of a woman", "a dog on a beach", "an old man, studio light", "a red car"]


def _request(i: int, *, guidance: float, seed: int | None = None, steps: int = 2, prompt: str | None = None,
             width: int = 64, height: int = 64) -> ImageRequest:
    return ImageRequest(
        image_id=f"img-{i:03d}", prompt=prompt if prompt is not None else PROMPTS[i % len(PROMPTS)], steps=steps,
        guidance=guidance, seed=1000 + i if seed is None else seed, width=width, height=height,
    )


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("realvis_xl") / "tiny"
    RealVisXLEngine.build_tiny(directory)
    return directory


@pytest.fixture(scope="module")
def engine(tiny_sdxl_dir: Path) -> Iterator[RealVisXLEngine]:
    with RealVisXLEngine.load(str(tiny_sdxl_dir), resolve_runtime("cpu", "auto"), offline=True) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def bf16_engine(tiny_sdxl_dir: Path) -> Iterator[RealVisXLEngine]:
    with RealVisXLEngine.load(str(tiny_sdxl_dir), Runtime(CPU, torch.bfloat16), offline=True) as loaded:
        yield loaded


def _stock_pipeline(directory: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(directory, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock_pipeline(tiny_sdxl_dir: Path):
    """diffusers' own pipeline on the same weights, float32."""
    return _stock_pipeline(tiny_sdxl_dir, torch.float32)


def _stock_images(pipe, requests: list[ImageRequest]) -> np.ndarray:
    """diffusers' own output, one call and one seeded generator per image."""
    return np.stack([
        pipe(
            prompt=r.prompt, num_inference_steps=r.steps, guidance_scale=r.guidance, width=r.width,
            height=r.height, generator=torch.Generator(CPU).manual_seed(r.seed), output_type="np",
        ).images[0]
        for r in requests
    ])


# -- registry and requests -----------------------------------------------------------------------


def test_registry_knows_realvis_xl() -> None:
    assert ENGINES["realvis_xl"] is RealVisXLEngine
    assert sorted(ENGINES) == ["flux1_schnell", "flux2_dev", "hidream", "realvis_xl", "sd35"]
    assert get_engine("realvis_xl") is RealVisXLEngine
    assert RealVisXLEngine.default_model == "SG161222/RealVisXL_V5.0"
    assert RealVisXLEngine.setting == "FLEXYFACE_REALVIS_XL_MODEL"


def test_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown engine 'flux'.*known engines: flux1_schnell, flux2_dev, hidream, realvis_xl, sd35"):
        get_engine("flux")


def test_image_request_takes_numpy_scalars_and_rejects_bad_values() -> None:
    request = ImageRequest("a", "p", np.int64(30), np.float64(7.5), np.int64(12), np.int64(512), np.int64(768))
    assert (request.steps, request.guidance, request.seed, request.width, request.height) == (30, 7.5, 12, 512, 768)
    assert all(type(v) in (int, float) for v in (request.steps, request.guidance, request.seed, request.width))
    for kwargs, message in [
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": 2.5}, "steps: expected an integer"),
        ({"guidance": float("inf")}, "guidance must be a finite number"),
        ({"guidance": -1.0}, "guidance must be a finite number >= 0"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*63\)"),
        ({"width": 100}, "width must be a positive multiple of 8"),
        ({"height": True}, "height: expected an integer"),
    ]:
        fields = {"image_id": "a", "prompt": "p", "steps": 2, "guidance": 5.0, "seed": 1, "width": 64, "height": 64}
        with pytest.raises(ValueError, match=message):
            ImageRequest(**(fields | kwargs))
    # An empty guidance cell (NaN in a table, None): the engine takes no guidance value.
    assert ImageRequest("a", "p", 2, np.float64("nan"), 1, 64, 64).guidance is None
    assert ImageRequest("a", "p", 2, None, 1, 64, 64).guidance is None


def test_plan_batches_groups_by_steps_size_and_guidance_mode() -> None:
    requests = [
        _request(0, steps=20, guidance=7.0),
        _request(1, steps=30, guidance=3.0),
        _request(2, steps=20, guidance=0.5),  # no CFG: not with 0, 3
        _request(3, steps=20, guidance=12.0),
        _request(4, steps=20, guidance=1.0),  # 1.0 runs without CFG too
        _request(5, steps=20, guidance=1.01),
        _request(6, steps=20, guidance=4.0, width=128),
        _request(7, steps=30, guidance=9.5),
    ]
    plan = RealVisXLEngine.plan_batches(requests, max_batch=2)
    assert [[r.image_id[-1] for r in batch] for batch in plan] == [
        ["0", "3"], ["5"], ["1", "7"], ["2", "4"], ["6"],
    ]
    assert sorted(r.image_id for batch in plan for r in batch) == sorted(r.image_id for r in requests)
    one_batch = RealVisXLEngine.plan_batches([_request(i, guidance=2.0 + i) for i in range(5)], max_batch=8)
    assert [len(b) for b in one_batch] == [5]
    assert RealVisXLEngine.plan_batches([], max_batch=4) == []
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        RealVisXLEngine.plan_batches(requests, max_batch=0)


# -- missing weights -----------------------------------------------------------------------------


def test_missing_local_path_names_model_and_setting(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=r"realvis_xl.*does not exist.*FLEXYFACE_REALVIS_XL_MODEL"):
        RealVisXLEngine.load(str(tmp_path / "no-such-model"), resolve_runtime("cpu"), offline=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=r"realvis_xl.*no model_index\.json.*FLEXYFACE_REALVIS_XL_MODEL"):
        RealVisXLEngine.load(str(tmp_path / "empty"), resolve_runtime("cpu"), offline=True)


def test_offline_hub_id_without_cache_names_model_and_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(MissingWeightsError) as error:
        RealVisXLEngine.load(RealVisXLEngine.default_model, resolve_runtime("cpu"), offline=True)
    message = str(error.value)
    assert "realvis_xl" in message and "SG161222/RealVisXL_V5.0" in message
    assert "not available offline" in message and "FLEXYFACE_REALVIS_XL_MODEL" in message


def test_cached_hub_id_loads_offline_with_its_revision(tiny_sdxl_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--flexyface--tiny-sdxl"  # the Hugging Face cache layout
    shutil.copytree(tiny_sdxl_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with RealVisXLEngine.load("flexyface/tiny-sdxl", resolve_runtime("cpu"), offline=True) as cached:
        assert cached.identity.as_columns("engine") == {
            "engine_model": "flexyface/tiny-sdxl", "engine_model_revision": commit,
        }
        assert cached.generate([_request(0, guidance=5.0)])[0].size == (64, 64)


# -- loading -------------------------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_loads_like_a_release(tiny_sdxl_dir: Path, tmp_path: Path,
                                                            engine: RealVisXLEngine) -> None:
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert list((tiny_sdxl_dir / sub).glob("*.safetensors")), sub
    assert engine.identity.model_id == str(tiny_sdxl_dir.resolve())
    assert engine.identity.revision.startswith("sha256:")
    RealVisXLEngine.build_tiny(tmp_path / "again")
    with RealVisXLEngine.load(str(tmp_path / "again"), resolve_runtime("cpu"), offline=True) as again:
        assert again.identity.revision == engine.identity.revision  # same weights, bit for bit
    pipe = engine.pipeline
    assert pipe.tokenizer.vocab_size == 49408 and pipe.text_encoder.config.vocab_size == 49408
    assert pipe.tokenizer_2.pad_token == "!"
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    with pytest.raises(ValueError, match="not an empty directory"):
        RealVisXLEngine.build_tiny(tiny_sdxl_dir)


def test_vae_dtype_follows_force_upcast(tiny_sdxl_dir: Path) -> None:
    # The tiny VAE keeps diffusers' default force_upcast=True, like the original SDXL VAE.
    with RealVisXLEngine.load(str(tiny_sdxl_dir), Runtime(CPU, torch.float16), offline=True) as fp16:
        assert fp16.pipeline.unet.dtype == torch.float16
        assert fp16.pipeline.vae.dtype == torch.float32
    with RealVisXLEngine.load(str(tiny_sdxl_dir), Runtime(CPU, torch.bfloat16), offline=True) as bf16:
        assert bf16.pipeline.vae.dtype == torch.bfloat16


# -- generation ----------------------------------------------------------------------------------


def test_same_request_same_image_and_seed_prompt_guidance_matter(engine: RealVisXLEngine) -> None:
    request = _request(0, guidance=5.0, width=96, height=64)
    first = engine.generate([request])[0]
    assert first.mode == "RGB" and first.size == (96, 64)
    again = engine.generate([request])[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    base = np.asarray(first, dtype=np.int16)
    for changed in (
        _request(0, guidance=5.0, width=96, height=64, seed=request.seed + 1),
        _request(0, guidance=9.0, width=96, height=64),
        _request(0, guidance=5.0, width=96, height=64, prompt="a lighthouse at night"),
    ):
        other = np.asarray(engine.generate([changed])[0], dtype=np.int16)
        assert np.abs(other - base).max() > 10


def test_batch_equals_single_images(engine: RealVisXLEngine) -> None:
    batch = [_request(i, guidance=6.0) for i in range(4)]
    batched = engine.generate_arrays(batch)
    singles = np.concatenate([engine.generate_arrays([r]) for r in batch])
    assert batched.shape == (4, 64, 64, 3) and batched.dtype == np.float32
    assert np.abs(batched - singles).max() <= FP32_ATOL
    assert np.abs(batched[0] - batched[1]).max() > 0.05  # different seeds and prompts: different images
    pil = np.stack([np.asarray(im) for im in engine.generate(batch)])
    assert np.array_equal(pil, (batched * 255).round().astype(np.uint8))
    assert np.abs(pil.astype(np.int16) - (singles * 255).round()).max() <= 1  # a rounding edge at most


def test_mixed_guidance_batch_matches_stock_diffusers(stock_pipeline, engine: RealVisXLEngine) -> None:
    batch = [_request(i, guidance=g) for i, g in enumerate([1.5, 3.03, 7.37, 11.11])]
    batched = engine.generate_arrays(batch)
    stock = _stock_images(stock_pipeline, batch)
    assert np.abs(batched - stock).max() <= FP32_ATOL
    # A single-image call takes exactly diffusers' path.
    assert np.array_equal(engine.generate_arrays(batch[2:3])[0], stock[2])
    # The scales matter: the same seed and prompt at another scale is another image.
    swapped = engine.generate_arrays([_request(2, guidance=3.03)])[0]
    assert np.abs(swapped - stock[2]).max() > 0.05


def test_mixed_guidance_batch_matches_stock_diffusers_in_bf16(tiny_sdxl_dir: Path,
                                                               bf16_engine: RealVisXLEngine) -> None:
    batch = [_request(i, guidance=g) for i, g in enumerate([3.03, 7.37, 11.11])]
    batched = bf16_engine.generate_arrays(batch)
    stock = _stock_images(_stock_pipeline(tiny_sdxl_dir, torch.bfloat16), batch)
    assert np.isfinite(batched).all()
    assert np.abs(batched - stock).max() <= BF16_ATOL


def test_unguided_batch_matches_stock_diffusers(stock_pipeline, engine: RealVisXLEngine) -> None:
    batch = [_request(0, guidance=0.5), _request(1, guidance=1.0)]
    batched = engine.generate_arrays(batch)
    assert np.abs(batched - _stock_images(stock_pipeline, batch)).max() <= FP32_ATOL
    # Without CFG the scale is unused: 0.5 and 1.0 give the same image; CFG at 1.5 does not.
    same = engine.generate_arrays([_request(0, guidance=1.0)])[0]
    assert np.abs(same - batched[0]).max() <= FP32_ATOL
    guided = engine.generate_arrays([_request(0, guidance=1.5)])[0]
    assert np.abs(guided - batched[0]).max() > 0.01


def test_generate_rejects_batches_plan_batches_would_split(engine: RealVisXLEngine) -> None:
    with pytest.raises(ValueError, match="guidance mode"):
        engine.generate([_request(0, guidance=0.5), _request(1, guidance=5.0)])
    with pytest.raises(ValueError, match="share steps"):
        engine.generate([_request(0, guidance=5.0, steps=2), _request(1, guidance=5.0, steps=3)])
    with pytest.raises(ValueError, match="share steps, size"):
        engine.generate([_request(0, guidance=5.0), _request(1, guidance=5.0, width=128)])
    with pytest.raises(ValueError, match="empty"):
        engine.generate([])


def test_infinite_decoder_output_is_an_error_not_a_white_image(tiny_sdxl_dir: Path) -> None:
    # An overflowing VAE can give inf without NaN; postprocessing would clamp it to white.
    with RealVisXLEngine.load(str(tiny_sdxl_dir), resolve_runtime("cpu", "fp32"), offline=True) as loaded:
        good = loaded.generate_arrays([_request(0, guidance=5.0)])
        assert np.isfinite(good).all() and good.std() > 0
        with torch.no_grad():
            loaded.pipeline.vae.decoder.conv_out.bias.fill_(float("inf"))
        with pytest.raises(RuntimeError, match=r"non-finite pixel values in \['img-000'\]"):
            loaded.generate_arrays([_request(0, guidance=5.0)])


def test_warm_up_is_wanted_on_cuda_or_when_compiled(tiny_sdxl_dir: Path, engine: RealVisXLEngine) -> None:
    assert engine.runtime.device.type == "cpu" and not engine.compiled and not engine.needs_warm_up
    assert RealVisXLEngine(None, Runtime(torch.device("cuda"), torch.bfloat16), engine.identity).needs_warm_up
    compiled = RealVisXLEngine(engine.pipeline, engine.runtime, engine.identity)
    compiled.compiled = True
    assert compiled.needs_warm_up


def test_close_releases_the_pipeline(tiny_sdxl_dir: Path) -> None:
    loaded = RealVisXLEngine.load(str(tiny_sdxl_dir), resolve_runtime("cpu"), offline=True)
    loaded.close()
    loaded.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        loaded.generate([_request(0, guidance=5.0)])


# -- full-size architecture ----------------------------------------------------------------------


def test_full_size_configs_are_the_sdxl_architecture() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from flexyface_pipeline.lib.models import sdxl_builders as b

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        models = {
            "unet": UNet2DConditionModel(**b.SDXL_UNET_CONFIG),
            "vae": AutoencoderKL(**b.SDXL_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**b.SDXL_TEXT_ENCODER_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**b.SDXL_TEXT_ENCODER_2_CONFIG)),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    # Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's components.
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


@pytest.mark.slow
def test_random_full_sdxl_builds_loads_and_generates(tmp_path: Path) -> None:
    """Full size, random weights, bf16: ~1 min to build and save (6.5 GB), ~10 GB peak memory."""
    directory = tmp_path / "sdxl-full"
    try:
        RealVisXLEngine.build_random_full(directory)
        with RealVisXLEngine.load(str(directory), Runtime(CPU, torch.bfloat16), offline=True) as full:
            assert sum(p.numel() for p in full.pipeline.unet.parameters()) == 2_567_463_684
            assert full.pipeline.text_encoder_2.config.hidden_size == 1280
            image = full.generate_arrays([_request(0, guidance=5.0, steps=1)])
            assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
            assert image.std() > 0.01
    finally:
        shutil.rmtree(directory, ignore_errors=True)
