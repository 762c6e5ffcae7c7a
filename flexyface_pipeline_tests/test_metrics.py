"""The four image metrics on tiny random-weight models, against the libraries' own computations."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
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
from flexyface_pipeline.lib.metrics import base as metrics_base
from flexyface_pipeline.lib.metrics.aesthetic import import_aesthetics_predictor
from flexyface_pipeline.lib.metrics.clip_score import preprocessing_settings, vision_tower_digest
from flexyface_pipeline.lib.metrics.images import default_workers, device_batch_size, embed_paths
from flexyface_pipeline.lib.models.common import (
    DigestCache,
    MissingWeightsError,
    Runtime,
    resolve_runtime,
    weights_digest,
)
from flexyface_pipeline.lib.models.scorer_builders import model_directory, scorer_builder

CPU = resolve_runtime("cpu", "fp32")
CPU_BF16 = resolve_runtime("cpu", "bf16")
# bfloat16 autocast vs float32, largest |difference| allowed per metric. bfloat16 keeps 8
# significant bits (relative rounding 2**-9 = 0.2 %); through 24-32 transformer layers the
# normalised embeddings move by about 1 % of their length. Cosine scores (CLIP, HPS) therefore
# move by about 1e-2 and the aesthetic heads (which run in float32 on that embedding) by about
# 1e-2 times their gain. Measured on the full-size random-weight models (test_metrics_full_size):
# see BENCHMARKS.md. Differences between images that matter are larger than these for CLIP and
# the aesthetic scores; for HPS (spread ~0.01-0.03 within a prompt) use float32 when ranking
# near-ties.
BF16_TOLERANCE = {"clip_score": 2e-2, "aesthetic_score": 5e-2, "aes_v2_score": 5e-2, "hps_v2_score": 2e-2}
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
    for metric in SCORERS:
        scorer_builder(metric).build_tiny(root / metric)
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


def test_long_prompts_are_cut_to_bos_75_tokens_eos(tiny) -> None:
    """A prompt over CLIP's 77-token context is encoded as OpenAI CLIP and diffusers encode it:
    BOS, its first 75 tokens, EOS (torchmetrics' CLIPScore keeps 77 tokens without EOS)."""
    scorer = tiny["clip_score"]
    tokenizer, model = scorer.processor.tokenizer, scorer.model
    long = "a portrait of a woman, " + ", ".join(f"detail {i} in red and blue" for i in range(30))
    ids = tokenizer(long, truncation=False, verbose=False)["input_ids"]
    assert len(ids) > 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert scorer.prompts_truncated([long, "a red cat", long]) == [True, False, True]
    assert scorer.prompt_token_counts([long]) == [len(ids)]

    cut = torch.tensor([[ids[0], *ids[1:76], tokenizer.eos_token_id]])
    assert cut.shape == (1, 77)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.get_text_features(input_ids=cut).pooler_output, dim=-1)
        # What keeping 77 tokens without EOS would give: another embedding.
        no_eos = torch.nn.functional.normalize(
            model.get_text_features(input_ids=torch.tensor([ids[:77]])).pooler_output, dim=-1)
    got = scorer.text_embeddings([long])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got - no_eos).abs().max() > 1e-3
    # Exactly 77 tokens is not truncated.
    words = long.split(" ")
    fits = next(" ".join(words[:n]) for n in range(len(words), 0, -1)
                if len(tokenizer(" ".join(words[:n]), verbose=False)["input_ids"]) <= 77)
    assert scorer.prompts_truncated([fits]) == [False]


def test_vision_digest_follows_weights_preprocessing_and_dtype(tiny, tiny_dirs, tmp_path) -> None:
    import aesthetics_predictor

    reference = tiny["aesthetic_score"].vision_digest
    # The same tower saved again: equal digest (it is over tensors, not files).
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dirs["aesthetic_score"], copy)
    again = AestheticV1Scorer.load(str(copy), CPU, offline=True)
    assert again.vision_digest == reference
    again.close()
    # One image-tower weight changed: a different digest.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_dirs["aesthetic_score"], changed)
    model = aesthetics_predictor.AestheticsPredictorV1.from_pretrained(changed)
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.add_(1e-3)
    model.save_pretrained(changed)
    scorer = AestheticV1Scorer.load(str(changed), CPU, offline=True)
    assert scorer.vision_digest != reference
    scorer.close()
    # A head-only change keeps the digest: the embedding does not depend on the head.
    model = aesthetics_predictor.AestheticsPredictorV1.from_pretrained(tiny_dirs["aesthetic_score"])
    with torch.no_grad():
        model.predictor.bias.add_(1.0)
    model.save_pretrained(copy)
    scorer = AestheticV1Scorer.load(str(copy), CPU, offline=True)
    assert scorer.vision_digest == reference
    scorer.close()
    # Another compute dtype or other preprocessing gives other embeddings: other digests.
    bf16 = AestheticV1Scorer.load(str(tiny_dirs["aesthetic_score"]), CPU_BF16, offline=True)
    assert bf16.vision_digest != reference
    bf16.close()
    config = json.loads((copy / "processor_config.json").read_text())
    config["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    (copy / "processor_config.json").write_text(json.dumps(config))
    scorer = AestheticV1Scorer.load(str(copy), CPU, offline=True)
    assert scorer.vision_digest != reference
    scorer.close()


def _edit_config(directory: Path, **changes) -> None:
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def test_vision_digest_follows_the_vision_config(tiny, tiny_dirs, tmp_path) -> None:
    reference = tiny["aesthetic_score"].vision_digest
    # Settings that change the embedding without changing a tensor's shape: other digests.
    seen = {reference}
    for name, value in (("layer_norm_eps", 1e-3), ("num_attention_heads", 2), ("hidden_act", "gelu")):
        changed = tmp_path / name
        shutil.copytree(tiny_dirs["aesthetic_score"], changed)
        _edit_config(changed, **{name: value})
        scorer = AestheticV1Scorer.load(str(changed), CPU, offline=True)
        assert getattr(scorer.model.vision_model.config, name) == value
        seen.add(scorer.vision_digest)
        scorer.close()
    assert len(seen) == 4
    # Names and leftovers of other transformers versions that the image tower does not read
    # keep the digest: the real CLIP model and the predictors still share their embeddings.
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_dirs["aesthetic_score"], renamed)
    _edit_config(renamed, _name_or_path="openai/clip-vit-large-patch14", transformers_version="4.30.2",
                 torch_dtype="float32", dropout=0.0, add_cross_attention=False)
    scorer = AestheticV1Scorer.load(str(renamed), CPU, offline=True)
    assert scorer.vision_digest == reference == tiny["clip_score"].vision_digest
    scorer.close()


def test_remembered_vision_digest_follows_the_vision_config(tiny_dirs, tmp_path) -> None:
    # The same weight files at the same place (one identity), another config.json: the digest
    # remembered for the first load must not be handed to the second.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dirs["aesthetic_score"], model_dir)
    digests = DigestCache(tmp_path / "digests.json")
    first = AestheticV1Scorer.load(str(model_dir), CPU, offline=True, digests=digests)
    _edit_config(model_dir, layer_norm_eps=1e-3)
    second = AestheticV1Scorer.load(str(model_dir), CPU, offline=True, digests=DigestCache(tmp_path / "digests.json"))
    plain = AestheticV1Scorer.load(str(model_dir), CPU, offline=True)
    assert second.identity == first.identity
    assert second.vision_digest == plain.vision_digest != first.vision_digest
    for scorer in (first, second, plain):
        scorer.close()


def test_vision_digest_follows_the_image_processor_class_and_tf32(tiny, tmp_path) -> None:
    from transformers import CLIPImageProcessor

    scorer = tiny["aesthetic_score"]
    model, processor = scorer.model, scorer.image_processor

    class OtherImageProcessor(CLIPImageProcessor):
        pass

    other = OtherImageProcessor(**processor.to_dict())
    assert preprocessing_settings(other) == preprocessing_settings(processor)  # only the class differs
    assert vision_tower_digest(model, other, CPU) != vision_tower_digest(model, processor, CPU) == scorer.vision_digest

    # Only the runtime's TF32 setting is read (the model stays where it is), so a CUDA runtime
    # can be described without a GPU.
    digests = DigestCache(tmp_path / "digests.json")
    by_flag = {}
    for allowed in (True, False):
        cuda = Runtime(torch.device("cuda"), torch.float32, tf32=allowed)
        by_flag[allowed] = vision_tower_digest(model, processor, cuda)
        # remembered under a key that holds the flag
        remembered = vision_tower_digest(model, processor, cuda, identity=scorer.identity, digests=digests)
        assert remembered == by_flag[allowed]
        assert vision_tower_digest(model, processor, CPU) == scorer.vision_digest
    assert by_flag[True] != by_flag[False]
    assert scorer.vision_digest not in by_flag.values()


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

    def __init__(self, scorer, limit: int, error=None) -> None:
        self.scorer, self.limit, self.sizes = scorer, limit, []
        self.error = error or (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        self.metric, self.runtime = scorer.metric, scorer.runtime
        self.activation_bytes_per_image = scorer.activation_bytes_per_image
        self.prepare = scorer.prepare

    def score_prepared(self, pixels, prompts):
        self.sizes.append(len(pixels))
        if len(pixels) > self.limit:
            raise self.error()
        return self.scorer.score_prepared(pixels, prompts)


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


def test_allocation_failures_outside_the_allocator_halve_too_and_others_do_not(tiny, images, tmp_path) -> None:
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    cudnn = _OutOfMemoryAbove(tiny["aesthetic_score"], limit=2,
                              error=lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    got = score_paths(cudnn, paths, PROMPTS, batch_size=4)
    np.testing.assert_allclose(got, score_paths(tiny["aesthetic_score"], paths, PROMPTS), atol=1e-5, rtol=0)
    assert cudnn.sizes == [4, 2, 2, 1]
    other = _OutOfMemoryAbove(tiny["aesthetic_score"], limit=2, error=lambda: RuntimeError("expected 3 channels"))
    with pytest.raises(RuntimeError, match="expected 3 channels"):
        score_paths(other, paths, PROMPTS, batch_size=4)
    assert other.sizes == [4]


def test_is_out_of_memory_knows_the_allocation_failures() -> None:
    from flexyface_pipeline.lib.models.common import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not is_out_of_memory(ValueError("out of memory"))


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


def test_aesthetic_load_refuses_a_checkpoint_without_its_head(tiny, tiny_dirs, images) -> None:
    # The v1 predictor (one Linear head) loaded as v2 (five Linear layers): the v2 head is not
    # in the checkpoint and would be drawn at random.
    with pytest.raises(MissingWeightsError) as info:
        AestheticV2Scorer.load(str(tiny_dirs["aesthetic_score"]), CPU, offline=True)
    message = str(info.value)
    assert AestheticV2Scorer.title in message and str(tiny_dirs["aesthetic_score"]) in message
    assert "layers.0.weight" in message and "layers.7.bias" in message and AestheticV2Scorer.setting in message
    # A plain CLIP checkpoint has the image tower but no predictor head.
    with pytest.raises(MissingWeightsError,
                       match=r"LAION aesthetic predictor v1: .*predictor\.bias, predictor\.weight"):
        AestheticV1Scorer.load(str(tiny_dirs["clip_score"]), CPU, offline=True)
    # Each predictor's own checkpoint loads.
    for metric in ("aesthetic_score", "aes_v2_score"):
        scorer = SCORERS[metric].load(str(tiny_dirs[metric]), CPU, offline=True)
        np.testing.assert_array_equal(scorer.score(images, PROMPTS), tiny[metric].score(images, PROMPTS))
        scorer.close()


def test_importing_the_predictors_keeps_the_transformers_verbosity(monkeypatch) -> None:
    from transformers.utils import logging as hf_logging

    # A first import, as in a fresh process: the package's modules run again.
    for name in [m for m in sys.modules if m == "aesthetics_predictor" or m.startswith("aesthetics_predictor.")]:
        monkeypatch.delitem(sys.modules, name)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity(hf_logging.INFO)
    try:
        module = import_aesthetics_predictor()
        assert "aesthetics_predictor.v1" in sys.modules  # the module did run
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert module.AestheticsPredictorV1.__name__ == AestheticV1Scorer.predictor_class
    finally:
        hf_logging.set_verbosity(before)


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
                                f"{prefix}_model_revision": scorer.identity.revision,
                                f"{prefix}_device": "cpu", f"{prefix}_dtype": "float32", f"{prefix}_tf32": False}


def test_digest_cache_remembers_unchanged_files_only(tmp_path, monkeypatch) -> None:
    from flexyface_pipeline.lib.models import common

    weights = tmp_path / "weights"
    (weights / "unet").mkdir(parents=True)
    (weights / "unet" / "model.safetensors").write_bytes(b"u" * 1000)
    (weights / "model.safetensors").write_bytes(b"m" * 1000)
    (weights / "config.json").write_text("{}")  # not a weight file
    expected = hashlib.sha256()
    for rel, data in (("model.safetensors", b"m" * 1000), ("unet/model.safetensors", b"u" * 1000)):
        expected.update(rel.encode() + hashlib.sha256(data).hexdigest().encode())
    cache_file = tmp_path / "cache" / "digests.json"
    digests = common.DigestCache(cache_file)
    assert weights_digest(str(weights), digests) == expected.hexdigest() == weights_digest(str(weights))
    stored = json.loads(cache_file.read_text())
    assert sorted(stored.values()) == sorted([hashlib.sha256(b"m" * 1000).hexdigest(),
                                              hashlib.sha256(b"u" * 1000).hexdigest()])

    hashed = []
    real_sha256_file = common.sha256_file
    monkeypatch.setattr(common, "sha256_file", lambda path: hashed.append(path.name) or real_sha256_file(path))
    # A new process (a new cache object) reads the file: nothing is hashed again.
    assert weights_digest(str(weights), common.DigestCache(cache_file)) == expected.hexdigest()
    assert hashed == []
    # A changed file is hashed again (same size, new bytes), the unchanged one is not.
    (weights / "model.safetensors").write_bytes(b"n" * 1000)
    changed = weights_digest(str(weights), common.DigestCache(cache_file))
    assert hashed == ["model.safetensors"] and changed != expected.hexdigest()
    assert changed == weights_digest(str(weights))
    # A damaged cache file costs only the hashing.
    cache_file.write_text("{not json")
    assert weights_digest(str(weights), common.DigestCache(cache_file)) == changed


@pytest.mark.parametrize("metric", ["clip_score", "aesthetic_score"])
def test_vision_digest_is_remembered_for_the_same_weights(tiny_dirs, tmp_path, monkeypatch, metric) -> None:
    from flexyface_pipeline.lib.metrics import base as metrics_base
    from flexyface_pipeline.lib.models.common import DigestCache

    cls = SCORERS[metric]
    cache_file = tmp_path / "digests.json"
    first = cls.load(str(tiny_dirs[metric]), CPU, offline=True, digests=DigestCache(cache_file))
    plain = cls.load(str(tiny_dirs[metric]), CPU, offline=True)
    assert first.vision_digest == plain.vision_digest
    assert first.identity == plain.identity

    def no_hashing(*args, **kwargs):
        raise AssertionError("weights hashed again")

    monkeypatch.setattr(metrics_base, "_tensor_sha256", no_hashing)
    monkeypatch.setattr("flexyface_pipeline.lib.models.common.sha256_file", no_hashing)
    again = cls.load(str(tiny_dirs[metric]), CPU, offline=True, digests=DigestCache(cache_file))
    assert again.vision_digest == plain.vision_digest
    assert again.identity == plain.identity
    for scorer in (first, plain, again):
        scorer.close()


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
    np.testing.assert_allclose(got, tiny[metric].score(images, PROMPTS), atol=BF16_TOLERANCE[metric], rtol=0)


def test_aesthetic_scorers_are_distinct_heads(tiny, images) -> None:
    v1 = tiny["aesthetic_score"].score(images, PROMPTS)
    v2 = tiny["aes_v2_score"].score(images, PROMPTS)
    assert AestheticV1Scorer.head_attribute == "predictor" and AestheticV2Scorer.head_attribute == "layers"
    assert not np.allclose(v1, v2)


@pytest.mark.parametrize("metric", list(SCORERS))
def test_bf16_autocast_on_cpu_within_tolerance(tiny, tiny_dirs, images, metric) -> None:
    scorer = SCORERS[metric].load(str(tiny_dirs[metric]), CPU_BF16, offline=True)
    try:
        got = scorer.score(images, PROMPTS)
    finally:
        scorer.close()
    expected = tiny[metric].score(images, PROMPTS)
    assert got.dtype == np.float64 and np.isfinite(got).all()
    assert not np.array_equal(got, expected)  # the towers did run in bfloat16
    np.testing.assert_allclose(got, expected, atol=BF16_TOLERANCE[metric], rtol=0)


def _record_encoded_prompts(scorer) -> list[str]:
    """The prompts ``scorer`` sends through its text tower from now on, in order."""
    encoded: list[str] = []
    encode = scorer._encode_prompts

    def counting(prompts):
        encoded.extend(prompts)
        return encode(prompts)

    scorer._encode_prompts = counting
    return encoded


@pytest.mark.parametrize("metric", ["clip_score", "hps_v2_score"])
def test_each_distinct_prompt_is_encoded_once(tiny_dirs, images, tmp_path, metric) -> None:
    scorer = SCORERS[metric].load(str(tiny_dirs[metric]), CPU, offline=True)
    encoded = _record_encoded_prompts(scorer)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    first = score_paths(scorer, paths, PROMPTS, batch_size=2, workers=2)
    assert sorted(encoded) == sorted(set(PROMPTS))  # 4 distinct prompts over 3 batches
    again = score_paths(scorer, paths[::-1], PROMPTS[::-1], batch_size=3)
    assert sorted(encoded) == sorted(set(PROMPTS))  # nothing encoded a second time
    np.testing.assert_allclose(again[::-1], first, atol=1e-6, rtol=0)
    scorer.close()


def test_prompt_cache_over_its_limit_keeps_every_requested_prompt(tiny_dirs, monkeypatch) -> None:
    monkeypatch.setattr(metrics_base, "MAX_CACHED_PROMPTS", 3)
    scorer = ClipScorer.load(str(tiny_dirs["clip_score"]), CPU, offline=True)
    encode = scorer._encode_prompts
    encoded = _record_encoded_prompts(scorer)
    with torch.inference_mode():
        alone = {p: encode([p])[0] for p in ("a", "b", "c", "d", "e", "f", "g")}

    def check(prompts):
        got = scorer.prompt_features(prompts)
        torch.testing.assert_close(got, torch.stack([alone[p] for p in prompts]), atol=1e-6, rtol=0)
        assert len(scorer._prompt_cache) <= 3

    check(["a", "b", "c"])
    check(["a", "d"])  # "a" was cached before the cache had to make room
    assert encoded == ["a", "b", "c", "d"]
    check(["c", "a", "d"])  # the three most recently requested are kept
    assert encoded == ["a", "b", "c", "d"]
    check(["b"])  # the oldest one made room
    assert encoded == ["a", "b", "c", "d", "b"]
    check(["d", "e", "f", "g", "d"])  # more distinct prompts than the cache holds
    assert encoded == ["a", "b", "c", "d", "b", "e", "f", "g"]
    scorer.close()


def test_prompts_are_encoded_in_bounded_batches(tiny_dirs, images, monkeypatch) -> None:
    prompts = ["a red cat", "a dog on a sofa, photographed from above in warm evening light", "a blue sky",
               "portrait of a woman, oil painting", "x"]
    unchunked = ClipScorer.load(str(tiny_dirs["clip_score"]), CPU, offline=True)
    embeddings = unchunked.image_embeddings(images)
    expected = unchunked.score_from_embeddings(embeddings, prompts)

    monkeypatch.setattr(metrics_base, "PROMPT_BATCH", 2)
    chunked = ClipScorer.load(str(tiny_dirs["clip_score"]), CPU, offline=True)
    batches: list[int] = []
    encode = chunked._encode_prompts
    chunked._encode_prompts = lambda chunk: batches.append(len(chunk)) or encode(chunk)
    got = chunked.score_from_embeddings(embeddings, prompts)
    assert batches == [2, 2, 1]
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert got.max() - got.min() > 1e-3
    for scorer in (unchunked, chunked):
        scorer.close()


@pytest.mark.parametrize("metric", list(SCORERS))
def test_score_prepared_equals_score(tiny, images, metric) -> None:
    scorer = tiny[metric]
    pixels = torch.stack([scorer.prepare(im) for im in images])
    assert pixels.dtype == torch.float32 and pixels.device.type == "cpu" and pixels.ndim == 4
    np.testing.assert_array_equal(scorer.score_prepared(pixels, PROMPTS), scorer.score(images, PROMPTS))
    with pytest.raises(ValueError, match="4 prepared images but 5 prompts"):
        scorer.score_prepared(pixels[:4], PROMPTS)
    with pytest.raises(ValueError, match="expected a float tensor"):
        scorer.score_prepared(pixels[0], PROMPTS[:1])


def test_embed_paths_returns_embeddings_and_file_hashes(tiny, images, tmp_path) -> None:
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    clip = tiny["clip_score"]
    embeddings, digests = embed_paths(clip, paths, batch_size=2, workers=2)
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, 16)
    assert digests == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    direct = clip.image_embeddings([PIL.Image.open(p) for p in paths]).numpy()
    np.testing.assert_allclose(embeddings, direct, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


def test_score_from_embeddings_checks_its_input(tiny, images) -> None:
    embeddings = tiny["clip_score"].image_embeddings(images)
    with pytest.raises(ValueError, match="5 embeddings but no prompts"):
        tiny["clip_score"].score_from_embeddings(embeddings)
    with pytest.raises(ValueError, match="5 embeddings but 2 prompts"):
        tiny["clip_score"].score_from_embeddings(embeddings, PROMPTS[:2])
    with pytest.raises(ValueError, match="expected a 2-D tensor"):
        tiny["aesthetic_score"].score_from_embeddings(embeddings[0])
    np.testing.assert_array_equal(tiny["clip_score"].score_from_embeddings(embeddings.numpy(), PROMPTS),
                                  tiny["clip_score"].score(images, PROMPTS))


def test_workers_leave_torch_thread_count_alone(tiny, images, tmp_path) -> None:
    before = torch.get_num_threads()
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    score_paths(tiny["hps_v2_score"], paths, PROMPTS, batch_size=2, workers=3)
    assert torch.get_num_threads() == before


def test_batch_size_and_workers_follow_the_machine() -> None:
    assert device_batch_size(CPU, 64 << 20) == 16
    assert 1 <= default_workers() <= 16
    if torch.cuda.is_available():
        cuda = resolve_runtime("cuda", "bf16")
        assert 1 <= device_batch_size(cuda, 32 << 20) <= 256
