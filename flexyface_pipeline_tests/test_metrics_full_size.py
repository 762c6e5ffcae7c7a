"""Full-size metric architectures with random weights, written in the real file formats and
loaded back through the scorers' ``load`` (CLIP ViT-L/14 three times, hpsv2's ViT-H-14)."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import PIL.Image
import pytest
import torch

from flexyface_pipeline.lib.metrics import AestheticV1Scorer, AestheticV2Scorer, ClipScorer, HpsV2Scorer
from flexyface_pipeline.lib.models.common import DigestCache, free_memory, resolve_runtime
from flexyface_pipeline.lib.models.scorer_builders import scorer_builder
from flexyface_pipeline_tests.test_metrics import BF16_TOLERANCE

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

CPU = resolve_runtime("cpu", "fp32")
CPU_BF16 = resolve_runtime("cpu", "bf16")
PROMPT = "a portrait of a woman in a garden, golden hour"


def _image() -> PIL.Image.Image:
    y, x = np.mgrid[0:512, 0:384]
    return PIL.Image.fromarray(np.stack([x * 255 // 384, y * 255 // 512, (x + y) % 256], -1).astype(np.uint8))


def test_full_size_clip_l14_scorers(tmp_path) -> None:
    image = _image()
    scorers = {}
    digests = DigestCache(tmp_path / "model_digests.json")  # as a run keeps them: each file hashed once
    try:
        for cls in (ClipScorer, AestheticV1Scorer, AestheticV2Scorer):
            scorer_builder(cls.metric).build_random_full(tmp_path / cls.metric)
            assert (tmp_path / cls.metric / "model.safetensors").stat().st_size > 1e9
            scorer = cls.load(str(tmp_path / cls.metric), CPU, offline=True, digests=digests)
            vision = scorer.model.config.vision_config if cls is ClipScorer else scorer.model.config
            assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size,
                    vision.projection_dim) == (1024, 24, 14, 224, 768)
            start = time.perf_counter()
            value = scorer.score([image], [PROMPT])
            logger.info("%s: one 512x384 image in %.2f s", cls.metric, time.perf_counter() - start)
            assert value.shape == (1,) and np.isfinite(value).all()
            scorers[cls.metric] = (scorer, value)

        clip = scorers["clip_score"][0]
        assert 0.0 <= scorers["clip_score"][1][0] <= 1.0
        assert clip.model.config.text_config.hidden_size == 768
        # The shared image tower: one embedding serves both aesthetic heads, same numbers.
        embedding = clip.image_embeddings([image])
        for metric in ("aesthetic_score", "aes_v2_score"):
            scorer, value = scorers[metric]
            assert scorer.vision_digest == clip.vision_digest
            np.testing.assert_allclose(scorer.score_from_embeddings(embedding), value, atol=1e-5, rtol=0)

        # bfloat16 autocast against float32 on the full-size tower (the tolerance's basis). Random
        # CLIP weights give negative cosines (clipped to 0), so the raw cosine is compared too.
        for cls in (ClipScorer, AestheticV1Scorer, AestheticV2Scorer):
            bf16 = cls.load(str(tmp_path / cls.metric), CPU_BF16, offline=True, digests=digests)
            assert bf16.identity == scorers[cls.metric][0].identity
            try:
                fp32_scorer, fp32_value = scorers[cls.metric]
                bf16_embedding = bf16.image_embeddings([image])
                drift = float((bf16_embedding - fp32_scorer.image_embeddings([image])).norm())
                value = bf16.score([image], [PROMPT])
                logger.info("%s: bf16 embedding moved by %.2e, score by %.2e", cls.metric, drift,
                            abs(value[0] - fp32_value[0]))
                assert 0 < drift < 2e-2
                np.testing.assert_allclose(value, fp32_value, atol=BF16_TOLERANCE[cls.metric], rtol=0)
                if cls is ClipScorer:
                    text = clip.text_embeddings([PROMPT])
                    raw_fp32 = float((embedding * text).sum())
                    raw_bf16 = float((bf16_embedding * bf16.text_embeddings([PROMPT])).sum())
                    assert abs(raw_bf16 - raw_fp32) <= BF16_TOLERANCE["clip_score"]
            finally:
                bf16.close()
    finally:
        for scorer, _ in scorers.values():
            scorer.close()
        free_memory()


def test_full_size_hps_vit_h14(tmp_path) -> None:
    scorer_builder(HpsV2Scorer.metric).build_random_full(tmp_path / "hps")
    info = json.loads((tmp_path / "hps" / "hps_model.json").read_text())
    assert info == {"architecture": "ViT-H-14", "checkpoint": "HPS_v2.1_compressed.pt"}
    checkpoint = torch.load(tmp_path / "hps" / "HPS_v2.1_compressed.pt", map_location="cpu", mmap=True)
    assert set(checkpoint) == {"state_dict"}
    assert checkpoint["state_dict"]["visual.proj"].dtype == torch.float16
    del checkpoint

    digests = DigestCache(tmp_path / "model_digests.json")
    scorer = HpsV2Scorer.load(str(tmp_path / "hps"), CPU, offline=True, digests=digests)
    try:
        assert scorer.architecture == "ViT-H-14"
        assert sum(p.numel() for p in scorer.model.parameters()) > 980_000_000
        assert tuple(scorer.model.visual.proj.shape) == (1280, 1024)
        start = time.perf_counter()
        value = scorer.score([_image()], [PROMPT])
        logger.info("hps_v2_score: one 512x384 image in %.2f s", time.perf_counter() - start)
        assert value.shape == (1,) and np.isfinite(value).all() and abs(value[0]) <= 1.0
    finally:
        scorer.close()
    bf16 = HpsV2Scorer.load(str(tmp_path / "hps"), CPU_BF16, offline=True, digests=digests)
    assert bf16.identity == scorer.identity
    try:
        got = bf16.score([_image()], [PROMPT])
        logger.info("hps_v2_score: bf16 moved the score by %.2e", abs(got[0] - value[0]))
        assert got[0] != value[0]
        np.testing.assert_allclose(got, value, atol=BF16_TOLERANCE["hps_v2_score"], rtol=0)
    finally:
        bf16.close()
