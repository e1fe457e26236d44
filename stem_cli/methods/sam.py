"""sam: Stem with the score-aware metric only (beta = 0, OAM off; ablation)."""

from stem_cli.config import StemConfig
from stem_cli.methods.stem import select  # same selector, value term switched off by the config

DEFAULTS = StemConfig(beta=0.0)
DESCRIPTION = "Stem with the score-only metric (beta = 0): TPD on, Output-Aware Metric off"
__all__ = ["select", "DEFAULTS", "DESCRIPTION"]
