"""The Elastic Attention router: per layer, pooled pre-RoPE keys per KV head -> mode logits.

Input per KV head h of a layer: x_h = [mean of the pre-RoPE keys of the first 100 valid
tokens, mean of those of the last 100] (2d numbers, d = head dim), standardised per
(head, feature) by statistics of the training prompts, then layer-normalised without
parameters:

    x'_h = LN((x_h - mu_h) / sigma_h)      mu_h, sigma_h: mean and std of x_h over the training prompts

Why standardise: a head's pooled keys are mostly a constant of the head; on SmolLM2-135M
at 1K they vary about ten times less between prompts than between heads (std 0.08 vs 0.78
after LN), so an LN-only router reads its head's identity and routes every input alike.
Subtracting each head's mean leaves what the input changes. (mu, sigma) are buffers in the
file; files of versions 1 and 2 load with mu = 0, sigma = 1 (their LN-only input).

Two small MLPs per layer (spec section 3):
    f_h      = W2 gelu(W1 x_h + b1) + b2 + e_h          feature MLP, shared by the layer's
                                                         KV heads; e_h a learned head embedding
    c        = mean_h f_h                                the layer's context
    logits_h = W4 gelu(W3 [f_h, c] + b3) + b4            mode MLP -> (dense, stem, streaming)
with hidden width H = 2d. Parameters per layer: (2d H + H) + (H^2 + H) + Hkv H
+ (2H H + H) + (3 H + 3); for Llama-3-8B (d = 128, Hkv = 8) that is 265,731, the
"about 0.27M per layer" of the published router. At pre-fill the mode is the argmax, left on the device
(no host copy: the elastic selector builds its index from device modes).

Saved with torch.save as plain dicts of tensors and numbers, so torch.load(weights_only=True)
reads it: no code is unpickled. The file records the model it was trained for (name, weights
identity when known, architecture: type, layers, heads, head dim, hidden size, vocabulary),
the training settings and curve, and the code version that wrote it; `check_model` refuses
a model of another architecture (ConfigError), `check_weights` one with other weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stem_cli.config import ConfigError
from stem_cli.elastic.config import MODES

FORMAT = "stem-elastic-router"
# Routing on a GPU in one Triton launch per layer (kernels/router_mlp.py) when True. Off: on an H200 the module's ops
# measured faster (Gemma-3-270M, 3 routed layers per pre-fill: 1.0-1.9 ms against 2.2-2.4 ms at 8K-32K;
# profiles/elastic/router-bench-20261203-152353-nvidia-h200.json): the kernel's one program per sequence reads
# every weight through a single SM.
FUSED_MODES = False
VERSION = 3  # 3: feature statistics (mu, sigma); 2: model = {name, weights, architecture}, code version, training curve
READABLE = (1, 2, 3)
POOL_TOKENS = 100  # first and last tokens pooled into the router's input


def architecture(model) -> dict[str, Any]:
    """What a router depends on in a model besides its weights (the router's inputs and outputs are shaped by it)."""
    cfg = getattr(model, "config", model)
    cfg = getattr(cfg, "text_config", None) or cfg
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"model_type": getattr(cfg, "model_type", None), "num_layers": cfg.num_hidden_layers,
            "num_query_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads, "head_dim": head_dim,
            "hidden_size": cfg.hidden_size, "vocab_size": getattr(cfg, "vocab_size", None)}


class LayerRouter(nn.Module):
    def __init__(self, num_kv_heads: int, head_dim: int, hidden: int | None = None):
        super().__init__()
        h = hidden or 2 * head_dim
        self.norm = nn.LayerNorm(2 * head_dim, elementwise_affine=False)
        self.register_buffer("feature_mean", torch.zeros(num_kv_heads, 2 * head_dim))
        self.register_buffer("feature_std", torch.ones(num_kv_heads, 2 * head_dim))
        self.feature = nn.Sequential(nn.Linear(2 * head_dim, h), nn.GELU(), nn.Linear(h, h))
        self.head_embedding = nn.Parameter(torch.randn(num_kv_heads, h) * 0.02)
        self.mode = nn.Sequential(nn.Linear(2 * h, h), nn.GELU(), nn.Linear(h, len(MODES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, 2d) pooled keys -> (B, Hkv, 3) mode logits."""
        x = (x - self.feature_mean) / self.feature_std
        f = self.feature(self.norm(x)) + self.head_embedding
        context = f.mean(1, keepdim=True).expand_as(f)
        return self.mode(torch.cat([f, context], dim=-1))


class ElasticRouter(nn.Module):
    """One LayerRouter per routed layer; the layers in `dense_layers` are always dense."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        hidden: int | None = None,
        dense_layers=(),
        unrouted_layers=(),
        model: str | dict = "",
        target_sparsity: float | None = None,
        training: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.hidden = hidden or 2 * head_dim
        self.dense_layers = tuple(sorted(int(x) for x in dense_layers if 0 <= int(x) < num_layers))
        # layers the method never governs (sliding-window ones, e.g. Gemma-3's local layers): no router is made for them
        self.unrouted_layers = tuple(sorted(int(x) for x in unrouted_layers if 0 <= int(x) < num_layers))
        model = model if isinstance(model, dict) else {"name": model}
        self.model_info = {"name": str(model.get("name") or ""), "weights": model.get("weights"), "architecture": model.get("architecture")}
        self.model_name = self.model_info["name"]
        self.target_sparsity = target_sparsity
        self.training_info = dict(training or {})
        self.layers = nn.ModuleDict(
            {str(i): LayerRouter(num_kv_heads, head_dim, self.hidden) for i in range(num_layers)
             if i not in self.dense_layers and i not in self.unrouted_layers}
        )

    def routes(self, layer: int) -> bool:
        return str(layer) in self.layers

    def on(self, device: torch.device | str) -> "ElasticRouter":
        """This router with its weights on `device`, moved only when they are elsewhere: nn.Module.to walks every
        parameter and buffer (2 ms on a CPU host for SmolLM2's 28 layer routers), and a run asks once per routed
        layer per pre-fill."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        first = next(self.parameters(), None)
        return self if first is None or first.device == device else self.to(device)

    def logits(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, 2d) -> (B, Hkv, 3) float32 logits of a routed layer."""
        router = self.layers[str(layer)]
        w = router.feature[0].weight
        return router(features.to(device=w.device, dtype=w.dtype))

    def set_feature_statistics(self, features: dict[int, torch.Tensor]) -> None:
        """mu, sigma per routed layer from `features`: layer -> (P, Hkv, 2d) pooled keys of P prompts.
        sigma is floored at 5% of the features' mean magnitude: a difference smaller than that between prompts
        (a feature constant over them, two near-equal prompts) is not blown up to +-1."""
        with torch.no_grad():
            for layer, x in features.items():
                if not self.routes(layer):
                    continue
                r = self.layers[str(layer)]
                x = x.to(r.feature_mean.device, torch.float32)
                std = x.std(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(x[0])
                r.feature_mean.copy_(x.mean(0))
                r.feature_std.copy_(std.clamp_min(0.05 * float(x.abs().mean()) + 1e-12))

    def modes(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(B, Hkv) mode ids on the features' device, argmax of the logits (dense for the always-dense layers).
        With FUSED_MODES, on a GPU one Triton launch computes them (kernels/router_mlp.py; the module's ops are ~15)."""
        if not self.routes(layer):
            return torch.zeros(features.shape[:2], dtype=torch.long, device=features.device)
        if features.is_cuda and FUSED_MODES:
            from stem_cli.kernels.router_mlp import router_modes

            router = self.layers[str(layer)]
            return router_modes(router, features.to(router.feature[0].weight.device))[0]
        return self.logits(layer, features).argmax(-1)

    def init_prior(self, target_sparsity: float) -> None:
        """Start every head at P(dense) = 1 - target, the rest split evenly (a neutral prior)."""
        t = min(max(target_sparsity, 1e-3), 1 - 1e-3)
        prior = torch.tensor([math.log(1 - t), math.log(t / 2), math.log(t / 2)])
        with torch.no_grad():
            for r in self.layers.values():
                r.mode[-1].weight.mul_(0.1)
                r.mode[-1].bias.copy_(prior)

    def num_parameters(self, layer: int | None = None) -> int:
        mods = [self.layers[str(layer)]] if layer is not None else list(self.layers.values())
        return sum(p.numel() for m in mods for p in m.parameters())

    def check_model(self, num_layers: int | None, num_kv_heads: int | None, head_dim: int | None, where: str = "router",
                    arch: dict | None = None) -> None:
        """ConfigError unless the model has this router's layers, KV heads and head dim (and, given `arch`
        and recorded in the file, the same architecture: type, heads, hidden size, vocabulary)."""
        problems = []
        for name, mine, theirs in (("layers", self.num_layers, num_layers), ("KV heads per layer", self.num_kv_heads, num_kv_heads),
                                   ("head dim", self.head_dim, head_dim)):
            if theirs is not None and theirs != mine:
                problems.append(f"{mine} {name} but the model has {theirs}")
        recorded = self.model_info.get("architecture") or {}
        for name, theirs in (arch or {}).items():
            mine = recorded.get(name)
            if mine is not None and theirs is not None and mine != theirs and name not in ("num_layers", "num_kv_heads", "head_dim"):
                problems.append(f"{name} {mine!r} but the model has {theirs!r}")
        if problems:
            raise ConfigError(
                f"{where} (trained on {self.model_name!r}) does not fit this model: it has {' and '.join(problems)}; "
                "train one for this model with `stem train-router --model ...`"
            )

    def check_weights(self, weights: str | None, where: str = "router") -> None:
        """ConfigError when the file records the weights it was trained on and `weights` (an identity) differs."""
        mine = self.model_info.get("weights")
        if mine and weights and mine != weights:
            raise ConfigError(
                f"{where} was trained on {self.model_name!r} with weights {mine} but this model's weights are {weights}; "
                "train one for this model with `stem train-router --model ...`"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": FORMAT,
                "version": VERSION,
                "model": self.model_info,
                "code": _code_version(),
                "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "hidden": self.hidden,
                "dense_layers": list(self.dense_layers),
                "unrouted_layers": list(self.unrouted_layers),
                "target_sparsity": self.target_sparsity,
                "training": self.training_info,
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            },
            path,
        )
        return path


def _code_version() -> dict:
    from stem_cli.environment import provenance

    return provenance()


_cache: dict[tuple, ElasticRouter] = {}


def load_router(path: str | Path) -> ElasticRouter:
    """Read a router file (weights_only: plain tensors and numbers); ConfigError if it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"router file {str(path)!r} does not exist (make one with `stem train-router`)")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _cache:
        return _cache[key]
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, ...
        raise ConfigError(f"router file {str(path)!r} cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"router file {str(path)!r} is not a stem router (format {FORMAT!r})")
    if data.get("version") not in READABLE:
        raise ConfigError(f"router file {str(path)!r}: version {data.get('version')!r} is not supported (this stem reads {READABLE})")
    try:
        router = ElasticRouter(
            int(data["num_layers"]), int(data["num_kv_heads"]), int(data["head_dim"]), hidden=int(data["hidden"]),
            dense_layers=data.get("dense_layers", ()), unrouted_layers=data.get("unrouted_layers", ()), model=data.get("model", ""),
            target_sparsity=data.get("target_sparsity"), training=data.get("training"),
        )
        state = dict(data["state_dict"])
        if int(data["version"]) < 3:  # before feature statistics: mu = 0, sigma = 1 reproduce the LN-only input
            state.update({k: v for k, v in router.state_dict().items() if k.endswith(("feature_mean", "feature_std"))})
        router.load_state_dict(state)
        router.code_version = data.get("code")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"router file {str(path)!r} is damaged: {str(e).splitlines()[0]}") from None
    router.eval().requires_grad_(False)
    _cache[key] = router
    return router
