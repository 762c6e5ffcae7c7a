"""The four image metrics on tiny random-weight models, against the libraries' own computations."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from flexyface_pipeline.lib.metrics import (
    SCORERS,
    AestheticV1Scorer,
    AestheticV2Scorer,
    ClipScorer,
    HpsV2Scorer,
    get_scorer,
    score_paths,
)
from flexyface_pipeline.lib.models.common import MissingWeightsError, resolve_runtime, weights_digest
from flexyface_pipeline.lib.models.scorer_builders import model_directory

CPU = resolve_runtime("cpu", "fp32")
PROMPTS = ["a red cat", "a dog on a sofa", "a red cat", "portrait of a woman, oil painting", "a blue sky"]


def make_images() -> list[PIL.Image.Image]:
    """Five different images of different sizes and modes."""
    rng = np.random.default_rng(7)
    h, w = 40, 56
    y, x = np.mgrid[0:h, 0:w]
    gradient = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 60)], -1).astype(np.uint8)
    checker = ((x // 8 + y // 8) % 2 * 255).astype(np.uint8)
    return [
        PIL.Image.fromarray(gradient),
        PIL.Image.new("RGB", (64, 48), (200, 30, 30)),
        PIL.Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)),
        PIL.Image.fromarray(checker, mode="L"),
        PIL.Image.new("RGBA", (30, 70), (20, 120, 240, 255)),
    ]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_scorers")
    dirs = {}
    for metric, cls in SCORERS.items():
        cls.build_tiny(root / metric)
        dirs[metric] = root / metric
    return dirs


@pytest.fixture(scope="session")
def tiny(tiny_dirs: dict[str, Path]):
    scorers = {metric: cls.load(str(tiny_dirs[metric]), CPU, offline=True) for metric, cls in SCORERS.items()}
    yield scorers
    for scorer in scorers.values():
        scorer.close()


@pytest.fixture(scope="module")
def images() -> list[PIL.Image.Image]:
    return make_images()


def test_registry_order_names_and_settings() -> None:
    assert list(SCORERS) == ["clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score"]
    assert [c.column_prefix for c in SCORERS.values()] == ["clip", "aesthetic_v1", "aesthetic_v2", "hps_v2"]
    assert [c.setting for c in SCORERS.values()] == [
        "FLEXYFACE_CLIP_MODEL", "FLEXYFACE_AESTHETIC_V1_MODEL", "FLEXYFACE_AESTHETIC_V2_MODEL",
        "FLEXYFACE_HPS_V2_MODEL"]
    assert get_scorer("hps_v2_score") is HpsV2Scorer
    with pytest.raises(ValueError, match="clip_score, aesthetic_score, aes_v2_score, hps_v2_score"):
        get_scorer("fid")


def test_clip_score_matches_transformers(tiny, tiny_dirs, images) -> None:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_dirs["clip_score"]).eval()
    processor = CLIPProcessor.from_pretrained(tiny_dirs["clip_score"])
    rgb = [im.convert("RGB") for im in images]
    with torch.no_grad():
        inputs = processor(text=PROMPTS, images=rgb, return_tensors="pt", padding=True)
        out = model(**inputs)
        image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        expected = (image * text).sum(-1).clamp(min=0).numpy()

    got = tiny["clip_score"].score(images, PROMPTS)
    assert got.dtype == np.float64 and got.shape == (5,)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.all((got >= 0) & (got <= 1))
    assert got.max() - got.min() > 1e-2  # the comparison is not between constants


@pytest.mark.parametrize("metric", ["aesthetic_score", "aes_v2_score"])
def test_aesthetic_matches_predictor_forward(tiny, tiny_dirs, images, metric) -> None:
    import aesthetics_predictor
    from transformers import CLIPProcessor

    predictor = getattr(aesthetics_predictor, SCORERS[metric].predictor_class)
    model = predictor.from_pretrained(tiny_dirs[metric]).eval()
    processor = CLIPProcessor.from_pretrained(tiny_dirs[metric])
    with torch.no_grad():
        expected = model(**processor(images=[im.convert("RGB") for im in images], return_tensors="pt")).logits[:, 0]

    got = tiny[metric].score(images, PROMPTS)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)
    assert got.max() - got.min() > 1e-2


def test_hps_matches_hpsv2_img_score_computation(tiny, tiny_dirs, images) -> None:
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

    info = json.loads((tiny_dirs["hps_v2_score"] / "hps_model.json").read_text())
    # hpsv2/img_score.py: initialize_model() then, per image, model(image, text) and the diagonal
    # of image_features @ text_features.T; here with pretrained=None and the tiny checkpoint.
    model, _, preprocess_val = create_model_and_transforms(
        info["architecture"], None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    checkpoint = torch.load(tiny_dirs["hps_v2_score"] / info["checkpoint"], map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    tokenizer = get_tokenizer(info["architecture"])
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            outputs = model(preprocess_val(image.convert("RGB")).unsqueeze(0), tokenizer([prompt]))
            logits = outputs["image_features"] @ outputs["text_features"].T
            expected.append(torch.diagonal(logits).numpy()[0])

    got = tiny["hps_v2_score"].score(images, PROMPTS)
    np.testing.assert_allclose(got, np.array(expected), atol=1e-5, rtol=0)
    assert np.all(np.abs(got) <= 1 + 1e-6)
    assert got.max() - got.min() > 1e-2


@pytest.mark.parametrize("metric", list(SCORERS))
def test_batch_equals_single_images(tiny, images, metric) -> None:
    scorer = tiny[metric]
    batch = scorer.score(images, PROMPTS)
    singles = np.array([scorer.score([im], [p])[0] for im, p in zip(images, PROMPTS)])
    np.testing.assert_allclose(batch, singles, atol=1e-5, rtol=0)


def test_clip_towers_share_embeddings(tiny, images) -> None:
    clip = tiny["clip_score"]
    digests = {m: tiny[m].vision_digest for m in ("clip_score", "aesthetic_score", "aes_v2_score")}
    assert len(set(digests.values())) == 1, digests
    embeddings = clip.image_embeddings(images)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(images)))
    for metric in ("aesthetic_score", "aes_v2_score"):
        shared = tiny[metric].score_from_embeddings(embeddings)
        np.testing.assert_array_equal(shared, tiny[metric].score(images, PROMPTS))


def test_vision_digest_follows_the_weights(tiny, tiny_dirs) -> None:
    scorer = AestheticV1Scorer.load(str(tiny_dirs["aesthetic_score"]), CPU, offline=True)
    with torch.no_grad():
        scorer.model.vision_model.post_layernorm.bias.add_(1e-3)
    assert scorer.vision_digest != tiny["aesthetic_score"].vision_digest
    scorer.close()


def test_score_paths_equals_direct_scoring(tiny, images, tmp_path) -> None:
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    for metric, scorer in tiny.items():
        direct = scorer.score([PIL.Image.open(p).convert("RGB") for p in paths], PROMPTS)
        got = score_paths(scorer, paths, PROMPTS, batch_size=2, workers=2)
        np.testing.assert_allclose(got, direct, atol=1e-5, rtol=0, err_msg=metric)


class _OutOfMemoryAbove:
    """A scorer that runs out of CUDA memory on batches larger than ``limit`` (as a GPU would)."""

    def __init__(self, scorer, limit: int) -> None:
        self.scorer, self.limit, self.metric, self.sizes = scorer, limit, scorer.metric, []

    def score(self, images, prompts):
        self.sizes.append(len(images))
        if len(images) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.scorer.score(images, prompts)


def test_score_paths_halves_the_batch_on_out_of_memory(tiny, images, tmp_path, caplog) -> None:
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    scorer = _OutOfMemoryAbove(tiny["clip_score"], limit=2)
    with caplog.at_level(logging.WARNING):
        got = score_paths(scorer, paths, PROMPTS, batch_size=8)
    np.testing.assert_allclose(got, score_paths(tiny["clip_score"], paths, PROMPTS), atol=1e-5, rtol=0)
    assert scorer.sizes == [5, 4, 2, 2, 1]
    assert "retrying with batch size 4" in caplog.text and "retrying with batch size 2" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):
        score_paths(_OutOfMemoryAbove(tiny["clip_score"], limit=0), paths, PROMPTS, batch_size=4)


def test_score_paths_rejects_bad_input_before_work(tiny, tmp_path) -> None:
    existing = tmp_path / "a.png"
    PIL.Image.new("RGB", (8, 8)).save(existing)
    never_called = _OutOfMemoryAbove(tiny["clip_score"], limit=0)
    with pytest.raises(ValueError, match="2 image paths but 1 prompts"):
        score_paths(never_called, [existing, existing], ["x"])
    with pytest.raises(ValueError, match=r"image file not found: .*missing\.png"):
        score_paths(never_called, [existing, tmp_path / "missing.png"], ["x", "y"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        score_paths(never_called, [existing, existing], ["x", "  "])
    assert never_called.sizes == []


@pytest.mark.parametrize("metric", list(SCORERS))
def test_score_rejects_bad_input(tiny, images, metric) -> None:
    scorer = tiny[metric]
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images[:2], PROMPTS[:1])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        scorer.score(images[:1], [""])
    with pytest.raises(ValueError, match="expected a PIL image"):
        scorer.score([np.zeros((8, 8, 3))], ["x"])
    assert scorer.score([], []).shape == (0,)


@pytest.mark.parametrize("metric", list(SCORERS))
def test_missing_hub_weights_offline(metric) -> None:
    cls = SCORERS[metric]
    with pytest.raises(MissingWeightsError) as info:
        cls.load("flexyface-tests/no-such-model", CPU, offline=True)
    message = str(info.value)
    assert cls.title in message and "flexyface-tests/no-such-model" in message
    assert "not available offline" in message and cls.setting in message


@pytest.mark.parametrize("metric", list(SCORERS))
def test_missing_local_weights(metric, tmp_path) -> None:
    cls = SCORERS[metric]
    with pytest.raises(MissingWeightsError, match=f"local path .* does not exist; set {cls.setting}"):
        cls.load(str(tmp_path / "nowhere"), CPU, offline=True)


def test_hps_directory_without_checkpoint(tmp_path) -> None:
    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt not found"):
        HpsV2Scorer.load(str(tmp_path), CPU, offline=True)


@pytest.mark.parametrize("metric", list(SCORERS))
def test_identity_of_local_weights(tiny, tiny_dirs, metric) -> None:
    scorer = tiny[metric]
    assert scorer.identity.model_id == str(tiny_dirs[metric].resolve())
    assert scorer.identity.revision == "sha256:" + weights_digest(str(tiny_dirs[metric]))
    prefix = SCORERS[metric].column_prefix
    assert scorer.columns() == {f"{prefix}_model": scorer.identity.model_id,
                                f"{prefix}_model_revision": scorer.identity.revision}


def test_tiny_models_are_written_in_the_real_formats(tiny_dirs) -> None:
    for metric in ("clip_score", "aesthetic_score", "aes_v2_score"):
        names = {p.name for p in tiny_dirs[metric].iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, names
    config = json.loads((tiny_dirs["aesthetic_score"] / "config.json").read_text())
    assert config["architectures"] == ["AestheticsPredictorV1"]
    info = json.loads((tiny_dirs["hps_v2_score"] / "hps_model.json").read_text())
    assert info == {"architecture": "flexyface-tiny-hps", "checkpoint": "flexyface-tiny-hps.pt"}
    arch = json.loads((tiny_dirs["hps_v2_score"] / "flexyface-tiny-hps.json").read_text())
    assert arch["text_cfg"]["vocab_size"] == 49408 and arch["text_cfg"]["context_length"] == 77


def test_builders_refuse_a_non_empty_directory(tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        with model_directory(tmp_path):
            pass
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_closed_scorer_refuses_to_score(tiny_dirs, images) -> None:
    scorer = ClipScorer.load(str(tiny_dirs["clip_score"]), CPU, offline=True)
    scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(images[:1], PROMPTS[:1])
    scorer.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("metric", list(SCORERS))
def test_cuda_bf16_close_to_cpu_fp32(tiny, tiny_dirs, images, metric) -> None:
    gpu = SCORERS[metric].load(str(tiny_dirs[metric]), resolve_runtime("cuda", "bf16"), offline=True)
    got = gpu.score(images, PROMPTS)
    gpu.close()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, tiny[metric].score(images, PROMPTS), atol=0.05, rtol=0.05)


def test_aesthetic_scorers_are_distinct_heads(tiny, images) -> None:
    v1 = tiny["aesthetic_score"].score(images, PROMPTS)
    v2 = tiny["aes_v2_score"].score(images, PROMPTS)
    assert AestheticV1Scorer.head_attribute == "predictor" and AestheticV2Scorer.head_attribute == "layers"
    assert not np.allclose(v1, v2)
