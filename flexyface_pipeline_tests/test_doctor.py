"""`flexyface doctor`: damaged definitions, tables and images are named, removed and made again;
the repaired export equals the undamaged one."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from flexyface_pipeline import cli
from flexyface_pipeline.lib import doctor
from flexyface_pipeline.lib.store import SweepStore
from flexyface_pipeline_tests.test_cli import COMMON, cli_env  # noqa: F401  (fixture)

ORDER = ["sweep", "image_id"]


def _export(data_dir) -> pd.DataFrame:
    df = pd.read_parquet(data_dir / "exports" / "sweep_results.parquet")
    return df.sort_values(ORDER, ignore_index=True)


def _stable(df: pd.DataFrame) -> pd.DataFrame:
    """The export without what differs between two generations of one image: wall time."""
    return df.drop(columns=["elapsed_ms"])


def test_doctor_finds_and_repairs_each_kind_of_damage(cli_env, capsys) -> None:  # noqa: F811
    data_dir = cli_env
    assert cli.main(["sweep", "doc", "--images", "4", *COMMON]) == 0
    before = _export(data_dir)
    store = SweepStore(data_dir)
    assert doctor.examine(store, "doc").healthy
    assert cli.main(["doctor"]) == 0
    assert "doc: healthy" in capsys.readouterr().out

    # A score value changed in place: found by its checksum, repaired by re-scoring that metric.
    path = store.table_path("aes_v2_scores", "doc")
    table = pd.read_parquet(path)
    table.loc[0, "aes_v2_score"] += 1.0
    table.to_parquet(path, index=False)
    found = doctor.examine(store, "doc")
    assert [f.path for f in found.findings] == [path] and found.rescore == ["aes_v2_score"] and not found.regenerate
    assert cli.main(["doctor", "doc"]) == 1  # without --repair: named, nothing changed
    assert str(path) in capsys.readouterr().out
    assert pd.read_parquet(path).loc[0, "aes_v2_score"] == table.loc[0, "aes_v2_score"]
    assert cli.main(["doctor", "--repair", "doc"]) == 0
    assert "re-scoring aes_v2_score" in capsys.readouterr().out
    pd.testing.assert_frame_equal(_stable(_export(data_dir)), _stable(before))

    # A truncated PNG, a zero-byte definition and a zero-byte images table at once.
    image = store.absolute(store.read_table("images", "doc")["image_path"].iloc[1])
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    store.spec_path("doc").write_bytes(b"")
    store.table_path("images", "doc").write_bytes(b"")
    found = doctor.examine(store, "doc")
    assert found.regenerate and found.restorable_spec is not None
    named = {f.path for f in found.findings}
    assert store.spec_path("doc") in named and store.table_path("images", "doc") in named
    assert cli.main(["doctor", "--repair", "doc"]) == 0
    out = capsys.readouterr().out
    assert "restored" in out and "running the sweep again" in out
    assert doctor.examine(store, "doc").healthy
    with Image.open(image) as repaired:
        repaired.load()
    after = _export(data_dir)
    # The truncated image was generated again (same settings and seed); its pixels may differ in
    # the last bits, so its scores are compared loosely and every other value exactly.
    pd.testing.assert_frame_equal(_stable(after).drop(columns=["clip_score", "aesthetic_score", "aes_v2_score",
                                                                "hps_v2_score"]),
                                  _stable(before).drop(columns=["clip_score", "aesthetic_score", "aes_v2_score",
                                                                 "hps_v2_score"]))
    for metric in ("clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score"):
        assert (after[metric] - before[metric]).abs().max() < 1e-3
