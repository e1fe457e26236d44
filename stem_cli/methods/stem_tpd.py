"""stem-tpd: the paper's ablation step "+TPD" (TPD budgets, score-only metric).

This is Stem with beta = 0, i.e. exactly the `sam` method under the ablation table's name,
registered so result rows can carry the paper's label. Same selector, same defaults, same
budget knob as `sam`.
"""

from stem_cli.config import StemConfig
from stem_cli.methods.stem import (  # same selector, value term switched off by the config
    BUDGET_KNOB,
    choose,
    estimate,
    select,
)

DEFAULTS = StemConfig(beta=0.0)
DESCRIPTION = "ablation name '+TPD': TPD budgets with the score-only metric (beta = 0); identical to sam"
__all__ = ["BUDGET_KNOB", "DEFAULTS", "DESCRIPTION", "choose", "estimate", "select"]
