"""The budget knob of a method: the one parameter an equal-budget solver bisects to reach a target BUD.

Each method module exports `BUDGET_KNOB = Knob(...)` (dense has none). Over [low, high]
BUD moves from about the method's minimum (its always-kept blocks only) to about full
(every causal block) at the lengths we run; `increasing` says BUD grows with the value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    name: str  # a field of the method's config
    low: float  # BUD near the method's minimum here
    high: float  # BUD near full here (at up to 128K tokens, block 128)
    integer: bool  # the field takes whole numbers
    increasing: bool = True  # BUD is non-decreasing in the value
