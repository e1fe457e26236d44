"""uniform: Stem's metric with one per-row budget k_start (1 + mu) / 2, i.e. TPD off (ablation)."""

from stem_cli.config import StemConfig
from stem_cli.methods.stem import BUDGET_KNOB, choose, estimate, select  # same selector, TPD switched off by the config

DEFAULTS = StemConfig(tpd=False)
DESCRIPTION = "Stem's Output-Aware Metric with a uniform per-row budget k_start(1+mu)/2 (TPD off; equal total budget)"
__all__ = ["select", "estimate", "choose", "DEFAULTS", "DESCRIPTION", "BUDGET_KNOB"]
