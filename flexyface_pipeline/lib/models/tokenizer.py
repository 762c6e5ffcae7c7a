"""CLIP's BPE vocabulary, written as Hugging Face tokenizer files.

No model hub is needed: open-clip-torch ships OpenAI CLIP's BPE merges
(``bpe_simple_vocab_16e6.txt.gz``). From it we write ``vocab.json`` / ``merges.txt`` of the
real 49,408-token vocabulary, which ``transformers.CLIPTokenizer`` loads as it loads a hub
tokenizer. Tiny and full-size random-weight models use it, and hpsv2's tokenizer needs the same
file inside its own package (its wheel lacks it).
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from importlib import resources
from pathlib import Path

from flexyface_pipeline.lib.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


def open_clip_bpe_path() -> Path:
    """The BPE merges file shipped by open-clip-torch."""
    path = Path(str(resources.files("open_clip").joinpath(BPE_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"open-clip-torch does not ship {BPE_FILE}; reinstall open-clip-torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merges of OpenAI's CLIP tokenizer (49,408 tokens)."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(directory: Path) -> Path:
    """Write a CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    atomic_write_bytes(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(directory / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    atomic_write_bytes(directory / "tokenizer_config.json", json.dumps(config, indent=2).encode())
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    atomic_write_bytes(directory / "special_tokens_map.json", json.dumps(special, indent=2).encode())
    return directory


def ensure_hpsv2_vocab() -> Path:
    """Put the BPE file where hpsv2's tokenizer looks for it (the hpsv2 1.2.0 wheel lacks it).

    hpsv2's ``open_clip.tokenizer`` builds a tokenizer at import time from
    ``hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz``; without the file nothing in
    ``hpsv2.src.open_clip`` imports. open-clip-torch ships a byte-identical copy.
    """
    spec = resources.files("hpsv2").joinpath("src", "open_clip", BPE_FILE)
    target = Path(str(spec))
    if target.is_file():
        return target
    source = open_clip_bpe_path()
    logger.warning("hpsv2 lacks %s; copying open-clip-torch's identical file to %s", BPE_FILE, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target
