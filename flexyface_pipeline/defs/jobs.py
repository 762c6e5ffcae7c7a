import dagster as dg

from flexyface_pipeline.defs.assets.analysis import image_grid
from flexyface_pipeline.defs.assets.results import sweep_results
from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.assets.sweep import generated_images, sweep_parameters

sweep_selection = dg.AssetSelection.assets(sweep_parameters, generated_images, *score_assets, image_grid)

# Sample, generate and score one sweep (one partition).
sweep_job = dg.define_asset_job(
    "sweep_job",
    selection=sweep_selection,
    description="Sample, generate and score one sweep.",
)

# Merge every sweep into the export (and what is computed from it).
export_job = dg.define_asset_job(
    "export_job",
    selection=dg.AssetSelection.assets(sweep_results).downstream(),
    description="Merge all sweeps into data/exports/ and refresh what is computed from the export.",
)

# One sweep's contact sheets, redrawn after its images or a score table change outside sweep_job
# (a re-score from the Assets page or the CLI); requested by the refresh sensors (schedules.py).
grid_job = dg.define_asset_job(
    "image_grid_job",
    selection=dg.AssetSelection.assets(image_grid),
    description="Redraw one sweep's contact sheets.",
)
