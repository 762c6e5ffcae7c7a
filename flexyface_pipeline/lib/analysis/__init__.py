"""Sweep analysis: which steps and guidance settings are worth their time.

``analyze(df) -> Analysis`` does the statistics; ``write_report`` writes the HTML report and the
JSON recommendations; ``analysis_markdown`` and ``key_numbers`` feed asset metadata.
"""

from flexyface_pipeline.lib.analysis.core import (
    METHOD,
    Analysis,
    GuidanceRecommendation,
    MetricAnalysis,
    ParetoSetting,
    StepsRecommendation,
    analyze,
)
from flexyface_pipeline.lib.analysis.report import (
    RECOMMENDATIONS_NAME,
    REPORT_NAME,
    analysis_markdown,
    key_numbers,
    recommendations_dict,
    write_report,
)
from flexyface_pipeline.lib.analysis.stats import Estimate, pareto_front, within_prompt_zscores

__all__ = [
    "METHOD",
    "RECOMMENDATIONS_NAME",
    "REPORT_NAME",
    "Analysis",
    "Estimate",
    "GuidanceRecommendation",
    "MetricAnalysis",
    "ParetoSetting",
    "StepsRecommendation",
    "analysis_markdown",
    "analyze",
    "key_numbers",
    "pareto_front",
    "recommendations_dict",
    "within_prompt_zscores",
    "write_report",
]
