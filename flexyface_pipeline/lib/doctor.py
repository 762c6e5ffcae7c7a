"""Find a sweep's damaged files and say what makes them again.

``examine`` only reads: the definition (``sweep.json``), every table against the checksum
recorded when it was written, and every image the images table names (complete PNGs). ``clear``
removes what was found damaged, so that running the sweep again (for the definition, the
parameters, the images table or image files: finished images are verified and kept) or
re-scoring a metric (for a score table) writes it anew. The runs themselves are Dagster's
business; this module names them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flexyface_pipeline.lib.checks import check_images_exist
from flexyface_pipeline.lib.store import TABLES, DamagedTableError, SweepStore

# Score tables by metric name (the re-score command takes the metric).
_METRICS = {"clip_scores": "clip_score", "aesthetic_scores": "aesthetic_score",
            "aes_v2_scores": "aes_v2_score", "hps_v2_scores": "hps_v2_score"}


@dataclass
class Finding:
    path: Path
    problem: str


@dataclass
class Diagnosis:
    """What is damaged in one sweep, and the runs that repair it."""

    sweep: str
    findings: list[Finding] = field(default_factory=list)
    regenerate: bool = False  # run the sweep again with its stored settings
    rescore: list[str] = field(default_factory=list)  # metrics to score again
    restorable_spec: dict | None = None  # the definition kept in the manifest, for a damaged sweep.json
    unrepairable: str = ""

    @property
    def healthy(self) -> bool:
        return not self.findings


def _spec_problem(store: SweepStore, sweep: str) -> str | None:
    path = store.spec_path(sweep)
    if not path.is_file():
        return None if not store.sweep_dir(sweep).exists() else "missing"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"unreadable ({type(err).__name__})"
    return None if isinstance(data, dict) and data.get("sweep") == sweep else "not this sweep's definition"


def examine(store: SweepStore, sweep: str) -> Diagnosis:
    """Everything damaged in ``sweep``; reads only."""
    found = Diagnosis(sweep)
    problem = _spec_problem(store, sweep)
    if problem is not None:
        found.findings.append(Finding(store.spec_path(sweep), f"sweep definition {problem}"))
        kept = store.read_manifest(sweep).get("spec")
        if isinstance(kept, dict) and kept.get("sweep") == sweep:
            found.restorable_spec = kept
            found.regenerate = True
        else:
            found.unrepairable = (f"no copy of the definition of {sweep} is kept: remove the sweep "
                                  f"(`flexyface remove {sweep}`) and define it again")
    for table in TABLES:
        if not store.has_table(table, sweep):
            continue
        try:
            store.read_table(table, sweep)
        except DamagedTableError as err:
            found.findings.append(Finding(store.table_path(table, sweep), str(err)))
            if table in _METRICS:
                found.rescore.append(_METRICS[table])
            else:
                found.regenerate = True
    if store.has_table("images", sweep) and not any(f.path == store.table_path("images", sweep)
                                                    for f in found.findings):
        images = store.read_table("images", sweep)
        outcome = check_images_exist([store.absolute(p) for p in images["image_path"]])
        for path in outcome.metadata["damaged"]:
            found.findings.append(Finding(Path(path), "image damaged (not a complete PNG)"))
        if outcome.metadata["num_damaged"] or outcome.metadata["num_missing"]:
            found.regenerate = True
            if outcome.metadata["num_missing"]:
                found.findings.append(Finding(store.images_dir(sweep),
                                              f"{outcome.metadata['num_missing']} image file(s) missing"))
    if found.regenerate:
        found.rescore = []  # the sweep's run scores every metric again
    return found


def clear(store: SweepStore, diagnosis: Diagnosis) -> list[str]:
    """Remove what ``examine`` found damaged (and restore a kept definition) so the repair runs
    write it anew; returns what was done, one line each."""
    done = []
    if diagnosis.restorable_spec is not None:
        store.restore_spec(diagnosis.restorable_spec)
        done.append(f"restored {store.spec_path(diagnosis.sweep)} from the copy kept in the manifest")
    for finding in diagnosis.findings:
        path = finding.path
        if path.suffix == ".parquet":
            table = path.stem
            store.drop_tables(diagnosis.sweep, (table,))
            done.append(f"removed damaged table {path}")
        elif path.suffix == ".png" and path.is_file():
            path.unlink()
            done.append(f"removed damaged image {path}")
    return done
