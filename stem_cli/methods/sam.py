"""sam: Stem with the score-aware metric only (beta = 0, OAM off; ablation)."""

from stem_cli.config import StemConfig
from stem_cli.methods.stem import BUDGET_KNOB, choose, estimate, select  # same selector, value term switched off by the config

DEFAULTS = StemConfig(beta=0.0)
DESCRIPTION = "Stem with the score-only metric (beta = 0): TPD on, Output-Aware Metric off"
__all__ = ["select", "estimate", "choose", "DEFAULTS", "DESCRIPTION", "BUDGET_KNOB"]
