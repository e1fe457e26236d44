"""Elastic Attention (spec section 3): per-head computation modes chosen per input.

    config.py     ElasticConfig (the `elastic` method's parameters), mode names
    headmap.py    head maps (JSON): load, save, validate, check against a model
    modes.py      modes -> one BlockIndex per layer; apply-time prepare (checks, pre-RoPE key hooks);
                  router input; Omega accounting
    router.py     the router (two small MLPs per layer) and its file format
    calibrate.py  `stem calibrate`: training-free head ranking -> head map
    train.py      `stem train-router`: Gumbel-softmax straight-through training
"""

from stem_cli.elastic.config import DENSE, MODES, STEM, STREAMING, ElasticConfig
from stem_cli.elastic.headmap import HeadMap, load_head_map, save_head_map

__all__ = ["DENSE", "MODES", "STEM", "STREAMING", "ElasticConfig", "HeadMap", "load_head_map", "save_head_map"]
