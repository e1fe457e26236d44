"""`stem train-router`: train the Elastic Attention router with the backbone frozen.

Each step runs one synthetic retrieval prompt (stem_cli.elastic.calibrate.calibration_prompts:
a needle in prose, the answer appended) through the model with a mixed-mode attention in
every governed layer: each KV head's output is the straight-through Gumbel-softmax mixture

    y = onehot(argmax(z)) - stopgrad(softmax(z)) + softmax(z),   z = (logits + Gumbel noise) / tau
    O_h = y_dense O_dense + y_stem O_stem + y_streaming O_streaming

so the forward computes exactly one mode per head (as at inference) while the gradient
reaches all three logits. The Gumbel noise is scaled down linearly from 1 to 0 over the
steps, so training ends on the noise-free argmax routing that inference runs (with full
noise, the sampled sparsity and the argmax sparsity differ a lot). Loss = cross-entropy of the answer tokens
+ sparsity_weight * (sparsity - target)^2, sparsity = mean over governed layers of the
fraction of KV heads not dense (forced-dense layers count 0; every KV head has the same
number of query heads, so this is Omega). Only the router's parameters train (AdamW).

The three outputs are differentiable in q, k, v: dense and the two sparse modes run as
SDPA with token masks built from their block indices (executor.masked_sdpa; selection
itself is discrete and runs without gradient). That computes every causal pair, so
training uses modest lengths (2K-4K); inference runs the block-sparse executor.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stem_cli.elastic.calibrate import CalibrationPrompt, _progress, calibration_prompts
from stem_cli.elastic.config import ElasticConfig
from stem_cli.elastic.modes import PreRopeKeys, _stem_select, hook_pre_rope_keys, pooled_keys, streaming_index
from stem_cli.elastic.router import ElasticRouter
from stem_cli.executor import dense_attention, masked_sdpa
from stem_cli.hook import attention_modules, handling


def relaxed_one_hot(logits: torch.Tensor, *, tau: float, hard: bool, generator: torch.Generator | None,
                    noise_scale: float = 1.0) -> torch.Tensor:
    """Gumbel-softmax (noise times noise_scale when a generator is given), straight-through when hard."""
    z = logits
    if generator is not None:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float32).to(logits.device)
        z = z - noise_scale * torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
    soft = torch.softmax(z / tau, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


@dataclass
class MixedAttention:
    """The training handler (stem_cli.hook): per KV head a relaxed mixture of the three modes."""

    router: ElasticRouter
    config: ElasticConfig
    tau: float = 1.0
    hard: bool = True
    generator: torch.Generator | None = None
    noise_scale: float = 1.0  # annealed by train_router
    sparsity: list = field(default_factory=list)  # per governed layer, this forward
    keys: PreRopeKeys = field(default_factory=PreRopeKeys)  # pre-RoPE keys, hooked by training_attention

    def attend(self, call) -> torch.Tensor | None:
        """The hook handler: the layer's output as the routed mixture of its heads' modes."""
        if call.kind != "prefill":
            return None
        query, key, value, scale, key_valid, layer = call.query, call.key, call.value, call.scale, call.key_valid, call.layer
        batch, hq, n, _ = query.shape
        hkv = key.shape[1]
        dense = dense_attention(query, key, value, scale=scale, key_valid=key_valid)
        if not self.router.routes(layer):
            self.sparsity.append(torch.zeros((), device=query.device))
            return dense
        feats = pooled_keys(self.keys.take(layer), key, key_valid)
        y = relaxed_one_hot(self.router.logits(layer, feats), tau=self.tau, hard=self.hard, generator=self.generator,
                            noise_scale=self.noise_scale)  # (B, Hkv, 3)
        cfg = self.config
        with torch.no_grad():
            stem_index = _stem_select(query.detach(), key.detach(), value.detach(), cfg, scale, key_valid)
        sink_b, window_b = cfg.streaming_blocks
        stream_index = streaming_index(batch, hkv, n, cfg.block_size, sink_b, window_b, key_valid, query.device)
        # masked_sdpa is differentiable: the executor's CPU path serves training on any device.
        outs = (dense, masked_sdpa(query, key, value, stem_index, scale=scale, key_valid=key_valid),
                masked_sdpa(query, key, value, stream_index, scale=scale, key_valid=key_valid))
        w = y.repeat_interleave(hq // hkv, dim=1).to(query.dtype)[..., None, None]  # (B, Hq, 3, 1, 1)
        out = sum(w[:, :, m] * o for m, o in enumerate(outs))
        self.sparsity.append((1 - y[..., 0]).mean())
        return out


def router_loss(model, mixed: MixedAttention, prompt: CalibrationPrompt, *, target_sparsity: float, sparsity_weight: float):
    """(loss, answer cross-entropy, sparsity) of one prompt; call inside training_attention(model, mixed)."""
    device = next(model.parameters()).device
    ids = prompt.input_ids.to(device)
    answer = ids.shape[1] - prompt.answer_start
    mixed.sparsity = []
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=answer + 1).logits[:, :answer].float()
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, prompt.answer_start:].reshape(-1))
    sparsity = torch.stack(mixed.sparsity).mean()
    return lm + sparsity_weight * (sparsity - target_sparsity) ** 2, lm, sparsity


@contextlib.contextmanager
def training_attention(model, mixed: MixedAttention):
    """Run `model` with `mixed` as its attention, the routed layers' pre-RoPE keys hooked into mixed.keys."""
    routed = [m for m in attention_modules(model) if mixed.router.routes(m.layer_idx)]
    handles = hook_pre_rope_keys(routed, mixed.keys)
    try:
        with handling(model, mixed):
            yield
    finally:
        mixed.keys.remove_hooks(handles)


def new_router(model, *, model_name: str, config: ElasticConfig, target_sparsity: float, dense_layers=None, seed: int = 0) -> ElasticRouter:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(seed)
    router = ElasticRouter(
        cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, model=model_name, target_sparsity=target_sparsity,
        dense_layers=config.default_dense_layers if dense_layers is None else dense_layers,
    )
    router.init_prior(target_sparsity)
    return router.to(next(model.parameters()).device)


def train_router(
    model,
    tokenizer,
    *,
    model_name: str,
    config: ElasticConfig,
    steps: int = 200,
    target_sparsity: float = 0.7,
    seq_len: int = 2048,
    samples: int = 16,
    seed: int = 0,
    lr: float = 1e-3,
    sparsity_weight: float = 10.0,
    tau: float = 1.0,
    dense_layers=None,
    source: str | None = None,
    console=None,
) -> tuple[ElasticRouter, list[dict]]:
    """Train a router for `model` (frozen) on `samples` seeded prompts, one per step, cycling."""
    if not 0 <= target_sparsity <= 1:
        raise ValueError(f"target_sparsity must lie in [0, 1], got {target_sparsity}")
    t0 = time.perf_counter()
    prompts = calibration_prompts(tokenizer, seq_len, samples, seed, source)
    router = new_router(model, model_name=model_name, config=config, target_sparsity=target_sparsity, dense_layers=dense_layers, seed=seed)
    router.train().requires_grad_(True)
    model.eval().requires_grad_(False)
    opt = torch.optim.AdamW(router.parameters(), lr=lr)
    mixed = MixedAttention(router, config, tau=tau, hard=True, generator=torch.Generator().manual_seed(seed))
    history = []
    progress = _progress(console, "steps")
    with progress or contextlib.nullcontext(), training_attention(model, mixed):
        task = progress.add_task(f"training the router of {model_name}", total=steps) if progress else None
        for step in range(steps):
            mixed.noise_scale = 1.0 - step / steps  # ends near the noise-free argmax that inference runs
            loss, lm, sparsity = router_loss(model, mixed, prompts[step % len(prompts)], target_sparsity=target_sparsity,
                                             sparsity_weight=sparsity_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": loss.item(), "lm": lm.item(), "sparsity": sparsity.item()})
            if progress:
                h = history[-1]
                progress.update(task, advance=1, description=f"router {model_name}: loss {h['loss']:.3f} lm {h['lm']:.3f} sparsity {h['sparsity']:.2f}")
        # Noise-free argmax (what inference does) on the first prompts.
        router.eval()
        mixed.generator = None
        with torch.no_grad():
            evals = [router_loss(model, mixed, p, target_sparsity=target_sparsity, sparsity_weight=sparsity_weight) for p in prompts[:4]]
    router.requires_grad_(False)
    last = history[-min(len(history), 10):] if history else []
    router.training_info = {
        "steps": steps, "seq_len": seq_len, "samples": samples, "seed": seed, "lr": lr, "sparsity_weight": sparsity_weight,
        "tau": tau, "source": prompts[0].source if prompts else source, "dense_layers": list(router.dense_layers),
        "parameters": router.num_parameters(),
        "final_loss": _mean(h["loss"] for h in last), "final_lm": _mean(h["lm"] for h in last),
        "final_sparsity": _mean(h["sparsity"] for h in last),
        "eval_lm": _mean(float(e[1]) for e in evals), "eval_sparsity": _mean(float(e[2]) for e in evals),
        "seconds": round(time.perf_counter() - t0, 2),
        "elastic_config": {f: getattr(config, f) for f in ("block_size", "streaming_sink_tokens", "streaming_window_tokens", "mu", "beta", "k_scale")},
    }
    return router, history


def _mean(xs) -> float | None:
    xs = list(xs)
    return None if not xs else float(sum(xs) / len(xs)) if all(math.isfinite(x) for x in xs) else float("nan")
