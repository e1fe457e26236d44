"""Run as a torchrun worker (`python -m torch.distributed.run --nproc-per-node 2 -m tests.tp_worker OUT [cpu|cuda]`):
tiny-llama tensor parallel (transformers' tp_plan="auto"; gloo on the CPU, nccl on GPUs), each method's logits, kept blocks per layer and BUD saved per rank
to OUT/rank{r}.pt; tests/test_distributed.py compares them with one process (`run_methods` without TP)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

METHODS = ("dense", "stem", "streaming", "xattention", "flexprefill", "minference", "elastic")
OVERRIDES = ["block_size=16", "dense_layers=[0]", "k_start=4", "sink_blocks=1", "window_blocks=2", "xattention.threshold=0.5",
             "flexprefill.gamma=0.5", "flexprefill.min_budget=16", "minference.vertical_size=20", "minference.slash_size=40",
             "minference.sink_columns=4", "minference.local_diagonals=16"]


def run_methods(model, device) -> dict:
    """Per method: last-token logits, {layer: kept-block mask (B, H, P, P)}, BUD, query heads the attention saw."""
    import stem_cli
    from stem_cli.integration import Runtime
    from stem_cli.registry import build_configs

    configs = build_configs(list(METHODS), None, OVERRIDES)
    ids = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(3)).to(device)
    seen, out = {}, {}
    select = Runtime.select

    def recording(self, query, key, value, *, layer, scale, key_valid):
        index = select(self, query, key, value, layer=layer, scale=scale, key_valid=key_valid)
        seen["masks"][layer], seen["heads"] = index.to_mask().cpu(), query.shape[1]
        return index

    Runtime.select = recording
    try:
        for name in METHODS:
            seen = {"masks": {}}
            runtime = stem_cli.apply(model, name, configs[name])
            with torch.no_grad():
                logits = model(ids).logits[0, -1].float().cpu()
            out[name] = {"logits": logits, "masks": seen["masks"], "heads": seen["heads"], "bud": runtime.recorder.bud}
    finally:
        Runtime.select = select
    return out


def main(folder: str, device: str = "cpu") -> None:
    import os

    import torch.distributed as dist

    from stem_cli.models import load_model

    where = torch.device("cpu")
    if device == "cuda":
        where = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(where)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    loaded = load_model("tiny-llama", device=device, dtype="fp32", tp=dist.get_world_size())
    torch.save(run_methods(loaded.model, where), Path(folder) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
