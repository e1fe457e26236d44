"""`stem train-router`: train the Elastic Attention router with the backbone frozen.

Each step runs one synthetic prompt (RULER tasks of several families, the answer appended;
`training_prompts`) through the model with a mixed-mode attention in every governed layer:
each KV head's output is the straight-through Gumbel-softmax mixture

    y = onehot(argmax(z)) - stopgrad(softmax(z)) + softmax(z),   z = (logits + a g) / tau,  g ~ Gumbel
    O_h = y_dense O_dense + y_stem O_stem + y_streaming O_streaming

so the forward computes exactly one mode per head (as at inference) while the gradient
reaches all three logits. Schedules over the steps t = 0 .. T-1:

    noise a(t)   = max(0, 1 - t / (noise_fraction T))       1 -> 0: the last (1 - noise_fraction) of the
                                                             steps run the noise-free argmax inference runs
    tau(t)       = tau_start (tau_end / tau_start)^(t / (T-1))   geometric
    lr(t)        = lr (0.1 + 0.45 (1 + cos(pi t / (T-1))))       cosine to lr / 10, times each weight
                                                             matrix's min(1, lr_width / fan_in) (below)

The sparsity s of a forward = mean over governed layers of the fraction of KV heads whose
sampled mode is not dense (forced-dense layers count 0; every KV head has the same number
of query heads, so once a = 0 this is exactly the Omega inference reports).

The task loss of a prompt (task_loss = "distill", the default) is the KL divergence of the
routed model's next-token distribution from the dense model's at the answer positions
(the dense teacher is the same frozen model with dense attention, one no-grad forward per
step): a per-prompt price for every head made sparse, large where the input needs the head
dense. task_loss = "ce" uses the answer's cross-entropy instead (a 135M model that fails
a task gains nothing from dense heads on it; the teacher still says what sparsity changes).

The constraint is on the AVERAGE sparsity over prompts, not on each prompt's: with W =
len(tasks) (one pass over the task families) and s_bar the running mean of s,

    s_bar_t = (1 - 1/W) s_bar_{t-1} + s_t / W                   (s_t with its gradient)
    L = task + W [lambda (s_bar_t - target) + (rho / 2) (s_bar_t - target)^2]
    lambda <- lambda + eta (rho / W) (s_bar_t - target)         after every step (eta = dual_rate),

an augmented Lagrangian of "the mean s over a pass equals the target" (method of
multipliers). A logit penalty is added to L:

    + zeta mean_{layers, heads} mean_modes (z_m - mean_modes z)^2      z: a head's mode logits (zeta = logit_penalty)

Without it the logits ran away (Gemma-3-270M, hidden 512, 22 Adam steps at lr 0.01: logits
of 1e3-1e4, a final threshold shift of -12385): Adam moves every weight by about lr a step
whatever its gradient's size, and the two MLPs' widths multiply those moves, so the margins
outgrow the Gumbel noise and tau and every decision freezes. The penalty (a z-loss on the
centred logits; softmax ignores their mean) keeps margins at a few units, where noise and
the final threshold still act: about zeta at the neutral prior, it costs little until a margin
passes ~1/sqrt(zeta). The penalty acts only once the margins are large, though: on Gemma it still let
the logits' RMS reach 891 by step 7 before pulling it down to 8. So each weight matrix also learns
at lr min(1, lr_width / fan_in) (biases and the head embeddings at lr): a step of Adam moves an
output by about lr times the fan-in over which its coherent weight moves add up, so scaling by
1 / fan_in (as muP does for Adam) makes the first steps move the logits as far whatever the
router's width (SmolLM2's d = 64 router, fan-ins 128-256, keeps almost its old rates; Gemma's
d = 256 one, fan-ins 512-1024, learns 4-8x slower per weight). The Lagrangian's gradient in s_t is lambda + rho (s_bar_t - target): the same price for
every prompt of a pass, up to the prompt's own share rho s_t / W, so the router spends
sparsity where the task loss is cheapest and keeps heads dense where it is not. The
earlier loss put the Lagrangian on each prompt's own s (W = 1, the needle-only case):
its minimum is s = target for every input, i.e. an input-independent router (measured:
Omega 0.678 on retrieval, multi-hop and aggregation alike).

The final threshold. Dual ascent moves the multiplier by at most eta (rho / W) |gap| per step,
so in the step counts a run can afford (40-60 on a CPU, ~200 on a GPU) the noise-free mean
Omega can still be off its target (measured: 31-37% against 50% after 40 CPU steps). So
after the last step the dense logit of every routed head is shifted by one number b (added
to each routed layer's dense output bias, so the file and inference stay as they are):

    margin m = logit_dense - max(logit_stem, logit_streaming)      dense iff m + b >= 0
    Omega(b) = #{routed heads and prompts with m + b < 0} / (prompts x governed layers x KV heads)

over the first calibrate_prompts training prompts, each run noise-free through the routed
model as inference runs it (prompt only, the chosen mode per head). With the margins sorted,
b is the midpoint between the k-th and (k+1)-th, k = round(target x all heads): the mean
Omega of those prompts is the target, up to one head. Shifting b changes the earlier layers'
modes and so the later layers' inputs: the prompts are run again with the new b and b is
re-solved from their margins, up to CALIBRATION_ROUNDS times, keeping the b whose measured
Omega is nearest the target. A global b keeps the router's ranking of heads and inputs (the
ones it prices highest stay dense): Omega per input still varies. It is a deterministic
function of the trained router and the prompts, so a resumed run ends with the same b.
calibrate_prompts = 0 leaves the router as trained.

The router's input is pooled over the prompt only (not the appended answer): inference
sees the prompt alone, and the answer must not leak into the routing decision.

Resumable and deterministic: the router is initialised from `seed` (its own RNG), the
Gumbel noise comes from a generator seeded by `seed`, prompt t is prompts[t % len]; a
checkpoint (router, optimizer, lambda, noise generator, step, curve) is written atomically
every `checkpoint_every` steps, and resuming from it continues the same sequence: on the
CPU an interrupted-then-resumed run ends with the same router, bit for bit.

The three outputs are differentiable in q, k, v: dense and the two sparse modes run as
SDPA with token masks built from their block indices (executor.masked_sdpa; selection
itself is discrete and runs without gradient). That computes every causal pair, so
training uses modest lengths; inference runs the block-sparse executor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from stem_cli.config import ConfigError
from stem_cli.elastic.calibrate import _progress, calibration_prompts
from stem_cli.elastic.config import DENSE, ElasticConfig
from stem_cli.elastic.modes import PreRopeKeys, _stem_select, hook_pre_rope_keys, pooled_keys, streaming_index
from stem_cli.elastic.router import ElasticRouter, architecture
from stem_cli.executor import dense_attention, masked_sdpa
from stem_cli.hook import attention_modules, handling

CHECKPOINT_FORMAT = "stem-elastic-router-checkpoint"
# RULER tasks the router trains on by default: retrieval (single and multi-key needles),
# multi-hop tracing, aggregation (common and frequent words): inputs that want different heads dense.
TRAINING_TASKS = ("niah_single_2", "niah_multikey_1", "vt", "cwe", "fwe")
ANSWER_MARGIN = 64  # tokens left free for the appended answer (cwe's ten words)
CALIBRATION_ROUNDS = 4  # runs of the calibration prompts while solving the final threshold (module docstring)
CALIBRATION_TOLERANCE = 0.01  # stop once the measured mean Omega is this close to the target (or half a head's step)


# ------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class TrainingPrompt:
    input_ids: torch.LongTensor  # (1, N): prompt + answer tokens
    answer_start: int  # first answer token; positions answer_start-1 .. N-2 predict the answer
    task: str


def training_prompts(tokenizer, lengths, samples: int, seed: int, tasks=TRAINING_TASKS) -> list[TrainingPrompt]:
    """`samples` prompts per (length, task), interleaved (task fastest, then length, then sample index),
    each at most its length with the answer appended. tasks: RULER task names, or ('needle',) for the
    built-in needle (any tokenizer, tiny models)."""
    lengths = [int(n) for n in lengths]
    if tuple(tasks) == ("needle",):
        per_length = {n: calibration_prompts(tokenizer, n, samples, seed, "needle") for n in lengths}
        return [TrainingPrompt(per_length[n][i].input_ids, per_length[n][i].answer_start, "needle")
                for i in range(samples) for n in lengths]
    from stem_cli.tasks import ruler

    unknown = [t for t in tasks if t not in ruler.TASKS]
    if unknown:
        raise ValueError(f"router training task(s) {', '.join(map(repr, unknown))} unknown: use RULER tasks ({', '.join(ruler.TASKS)}) or 'needle'")
    out = []
    for i in range(samples):
        for n in lengths:
            for task in tasks:
                sample = ruler.build_sample(task, tokenizer, n - ANSWER_MARGIN, seed=seed, index=i)
                out.append(answered(tokenizer, sample.input_ids, sample.references, task))
    return out


def answered(tokenizer, ids, references, task: str) -> TrainingPrompt:
    """The prompt with its references appended as the answer (", "-joined, as RULER's answers read)."""
    answer_ids = tokenizer(" " + ", ".join(references), add_special_tokens=False)["input_ids"]
    return TrainingPrompt(torch.tensor([list(ids) + list(answer_ids)], dtype=torch.long), len(ids), task)


# ------------------------------------------------------------------ the mixed-mode attention (a stem_cli.hook handler)


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
    teacher: bool = False  # a dense forward: the distillation target (no routing)
    pool_end: int | None = None  # tokens the router pools over (the prompt without its answer)
    sparsity: list = field(default_factory=list)  # per governed layer, this forward: sampled fraction not dense
    argmax_sparsity: list = field(default_factory=list)  # per governed layer: fraction not dense under noise-free argmax
    keys: PreRopeKeys = field(default_factory=PreRopeKeys)  # pre-RoPE keys, hooked by training_attention
    margins: list | None = None  # a list: per governed layer this forward, (Hkv,) dense margins (None: layer not routed)
    logit_power: list = field(default_factory=list)  # per routed layer, this forward: mean squared centred logit

    def attend(self, call) -> torch.Tensor | None:
        """The hook handler: the layer's output as the routed mixture of its heads' modes."""
        if call.kind != "prefill" or self.teacher:
            return None  # SDPA (the hook drops the hooked keys when the layer's forward ends)
        query, key, value, scale, key_valid, layer = call.query, call.key, call.value, call.scale, call.key_valid, call.layer
        batch, hq, n, _ = query.shape
        hkv = key.shape[1]
        dense = dense_attention(query, key, value, scale=scale, key_valid=key_valid)
        if not self.router.routes(layer):
            self.sparsity.append(torch.zeros((), device=query.device))
            self.argmax_sparsity.append(0.0)
            if self.margins is not None:
                self.margins.append(None)
            return dense
        feats = prompt_features(self.keys.take(layer), key, key_valid, self.pool_end)
        logits = self.router.logits(layer, feats)
        if self.margins is not None:
            self.margins.append(dense_margins(logits.detach())[0].float().cpu())
        self.logit_power.append((logits - logits.mean(-1, keepdim=True)).pow(2).mean())
        y = relaxed_one_hot(logits, tau=self.tau, hard=self.hard, generator=self.generator, noise_scale=self.noise_scale)  # (B, Hkv, 3)
        # Without gradients and noise (the final threshold's runs) only the modes some head chose are computed.
        needed = set(y.argmax(-1).unique().tolist()) if self.generator is None and not torch.is_grad_enabled() else {0, 1, 2}
        cfg = self.config
        with torch.no_grad():
            stem_index = _stem_select(query.detach(), key.detach(), value.detach(), cfg, scale, key_valid) if 1 in needed else None
        sink_b, window_b = cfg.streaming_blocks
        stream_index = streaming_index(batch, hkv, n, cfg.block_size, sink_b, window_b, key_valid, query.device) if 2 in needed else None
        outs = (dense, None if stem_index is None else sparse_mode_output(query, key, value, stem_index, scale, key_valid),
                None if stream_index is None else sparse_mode_output(query, key, value, stream_index, scale, key_valid))
        w = y.repeat_interleave(hq // hkv, dim=1).to(query.dtype)[..., None, None]  # (B, Hq, 3, 1, 1)
        out = sum(w[:, :, m] * o for m, o in enumerate(outs) if o is not None)
        self.sparsity.append((1 - y[..., DENSE]).mean())
        self.argmax_sparsity.append(float((logits.detach().argmax(-1) != DENSE).float().mean()))
        return out


def sparse_mode_output(query, key, value, index, scale: float, key_valid) -> torch.Tensor:
    """A sparse mode's output by masked SDPA (differentiable: the executor's CPU path serves training on any
    device), its activations recomputed in the backward pass rather than kept. Kept, the masked SDPA's saved
    tensors (its token masks, and on the CPU the attention probabilities of the math path) grow as N^2 per
    layer and mode: SmolLM2-135M at 2K peaked at 12 GB of host memory and was killed at 4K on a 24 GB
    machine; recomputed, each layer holds only its inputs and output. Same values and gradients."""
    def run(q, k, v):
        return masked_sdpa(q, k, v, index, scale=scale, key_valid=key_valid)

    if not torch.is_grad_enabled():
        return run(query, key, value)
    return torch.utils.checkpoint.checkpoint(run, query, key, value, use_reentrant=False)


def dense_margins(logits: torch.Tensor) -> torch.Tensor:
    """(..., 3) mode logits -> (...) logit_dense - max(logit_stem, logit_streaming): the head is dense iff >= 0
    (argmax takes the first of equal logits, and dense is mode 0)."""
    return logits[..., DENSE] - logits[..., DENSE + 1:].max(-1).values


def prompt_features(pre_rope, key, key_valid, end: int | None) -> torch.Tensor:
    """The router's input pooled over the first `end` tokens (the prompt without its answer; None: all)."""
    if end is None or end >= key.shape[2]:
        return pooled_keys(pre_rope, key, key_valid)
    return pooled_keys(None if pre_rope is None else pre_rope[:, :end], key[:, :, :end],
                       None if key_valid is None else key_valid[:, :end])


def answer_logits(model, prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (1, A, V) float32 at the positions predicting the answer, answer ids (1, A))."""
    ids = prompt.input_ids.to(next(model.parameters()).device)
    answer = ids.shape[1] - prompt.answer_start
    return model(input_ids=ids, use_cache=False, logits_to_keep=answer + 1).logits[:, :answer].float(), ids[:, prompt.answer_start:]


def dense_teacher(model, mixed: MixedAttention, prompt) -> torch.Tensor:
    """The dense model's log-probabilities at the answer positions (call inside training_attention)."""
    mixed.teacher = True
    try:
        with torch.no_grad():
            return torch.log_softmax(answer_logits(model, prompt)[0], -1)
    finally:
        mixed.teacher = False


def router_loss(model, mixed: MixedAttention, prompt, *, target_sparsity: float, sparsity_weight: float, multiplier: float = 0.0,
                average: float | None = None, window: int = 1, task_loss: str = "distill", teacher: torch.Tensor | None = None,
                logit_penalty: float = 0.0):
    """(loss, task loss, answer cross-entropy, sparsity, running mean s_bar_t) of one prompt; call inside
    training_attention(model, mixed). `average`: s_bar_{t-1} (None: the first step, s_bar = s).

    loss = task + W [lambda (s_bar - target) + (rho / 2) (s_bar - target)^2] + zeta * mean centred logit^2
    (module docstring); task = KL(teacher || routed) per answer token ("distill", `teacher` from dense_teacher)
    or the answer's CE ("ce")."""
    mixed.sparsity, mixed.argmax_sparsity, mixed.logit_power = [], [], []
    mixed.pool_end = prompt.answer_start
    logits, answer = answer_logits(model, prompt)
    mixed.pool_end = None
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer.reshape(-1))
    if task_loss == "distill":
        student = torch.log_softmax(logits, -1)
        task = (teacher.exp() * (teacher - student)).sum(-1).mean()
    else:
        task = lm
    sparsity = torch.stack(mixed.sparsity).mean()
    mean = sparsity if average is None else (1 - 1 / window) * average + sparsity / window
    gap = mean - target_sparsity
    loss = task + window * (multiplier * gap + 0.5 * sparsity_weight * gap ** 2)
    if logit_penalty and mixed.logit_power:
        loss = loss + logit_penalty * torch.stack(mixed.logit_power).mean()
    return loss, task, lm, sparsity, mean


def feature_statistics(model, mixed: MixedAttention, prompts) -> dict[int, torch.Tensor]:
    """layer -> (P, Hkv, 2d) the router's input on `prompts` (dense forwards; call inside training_attention)."""
    seen: dict[int, list] = {}
    router = mixed.router
    captured = PreRopeKeys()
    routed = [m for m in attention_modules(model) if router.routes(m.layer_idx)]

    class Collect:
        def attend(self, call):
            if call.kind == "prefill" and router.routes(call.layer):
                seen.setdefault(call.layer, []).append(
                    prompt_features(captured.take(call.layer), call.key, call.key_valid, collect_end[0]))
            return None

    collect_end = [None]
    handles = hook_pre_rope_keys(routed, captured)
    try:
        with handling(model, Collect()), torch.no_grad():
            for p in prompts:
                collect_end[0] = p.answer_start
                model(input_ids=p.input_ids[:, :p.answer_start].to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    finally:
        captured.remove_hooks(handles)
    return {layer: torch.cat(xs) for layer, xs in seen.items()}


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


# ------------------------------------------------------------------ the final threshold


def routed_margins(model, mixed: MixedAttention, prompts) -> tuple[list[list], list[float]]:
    """Per prompt: its governed layers' dense margins (None: not routed) and its Omega, from noise-free routed
    forwards of the prompt alone (as inference pools it); call inside training_attention(model, mixed)."""
    saved = mixed.generator, mixed.margins
    mixed.generator = None
    margins, omegas = [], []
    try:
        with torch.no_grad():
            for p in prompts:
                mixed.sparsity, mixed.argmax_sparsity, mixed.margins = [], [], []
                model(input_ids=p.input_ids[:, :p.answer_start].to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
                margins.append(mixed.margins)
                omegas.append(sum(mixed.argmax_sparsity) / len(mixed.argmax_sparsity))
    finally:
        mixed.generator, mixed.margins = saved
    return margins, omegas


def threshold_shift(margins: list[list], target: float) -> float:
    """The shift d of every dense margin that leaves round(target x all heads) of these forwards' routed heads sparse
    (m + d < 0): the midpoint between the k-th and (k+1)-th smallest margin, so no margin sits on the boundary.
    All heads = forwards x governed layers x KV heads: forced-dense layers count, and cap what is reachable."""
    routed = [m for forward in margins for m in forward if m is not None]
    if not routed:
        return 0.0
    every = torch.cat(routed).double().sort().values
    heads = routed[0].numel() * sum(len(forward) for forward in margins)
    k = min(max(int(round(target * heads)), 0), every.numel())
    if k == 0:
        return float(1.0 - every[0])  # every head dense, the nearest by a logit of 1
    if k == every.numel():
        return float(-1.0 - every[-1])
    return float(-(every[k - 1] + every[k]) / 2)


def calibrate_threshold(model, mixed: MixedAttention, prompts, target: float) -> dict:
    """Shift the router's dense logit so the mean Omega over `prompts` is the target (module docstring); the
    router is left with the best shift found, bit for bit the biases that were measured. Returns what was done."""
    router = mixed.router

    def biases() -> dict:
        return {name: r.mode[-1].bias.detach().clone() for name, r in router.layers.items()}

    total, rounds = 0.0, []
    margins, omegas = routed_margins(model, mixed, prompts)
    heads = sum(len(forward) for forward in margins) * router.num_kv_heads
    tolerance = max(CALIBRATION_TOLERANCE, 0.5 / max(1, heads))  # Omega moves in steps of one head of one prompt
    for i in range(CALIBRATION_ROUNDS + 1):
        rounds.append({"shift": total, "omega": sum(omegas) / len(omegas), "biases": biases()})
        if abs(rounds[-1]["omega"] - target) <= tolerance or i == CALIBRATION_ROUNDS:
            break
        step = threshold_shift(margins, target)
        total += step
        with torch.no_grad():
            for r in router.layers.values():
                r.mode[-1].bias[DENSE] += step
        margins, omegas = routed_margins(model, mixed, prompts)
    best = min(rounds, key=lambda r: (abs(r["omega"] - target), abs(r["shift"])))
    with torch.no_grad():
        for name, r in router.layers.items():
            r.mode[-1].bias.copy_(best["biases"][name])
    return {"prompts": len(prompts), "target": target, "dense_logit_shift": best["shift"], "omega": best["omega"],
            "omega_before": rounds[0]["omega"], "rounds": [{"shift": r["shift"], "omega": r["omega"]} for r in rounds]}


# ------------------------------------------------------------------ settings, router, checkpoints


@dataclass(frozen=True)
class TrainSettings:
    """What decides a trained router (with the model and the elastic config): a checkpoint resumes only with equal settings."""

    steps: int = 300
    target_sparsity: float = 0.7
    lengths: tuple = (2048,)
    samples: int = 8  # per (length, task); cycled
    tasks: tuple = TRAINING_TASKS
    seed: int = 0
    lr: float = 1e-2
    sparsity_weight: float = 10.0  # rho
    tau_start: float = 1.0
    tau_end: float = 0.3
    noise_fraction: float = 0.6
    dense_layers: tuple | None = None  # None: the elastic config's default_dense_layers
    dual_rate: float = 0.1  # eta: the multiplier's step relative to rho / W (1 overshoots: one router step per dual step)
    logit_penalty: float = 1e-2  # zeta: the centred logits' z-loss (module docstring); 0 lets the logits run away
    lr_width: int = 128  # a weight matrix learns at lr min(1, lr_width / fan_in) (module docstring); 0: lr for all
    task_loss: str = "distill"  # "distill": KL to the dense model at the answer; "ce": the answer's cross-entropy
    feature_prompts: int = 4  # per task: prompts whose pooled keys give the router's input statistics (mu, sigma)
    calibrate_prompts: int = 20  # training prompts the final threshold is solved on (module docstring); 0: none

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.dense_layers is not None:
            object.__setattr__(self, "dense_layers", tuple(sorted(int(x) for x in self.dense_layers)))
        if not 0 <= self.target_sparsity <= 1:
            raise ValueError(f"target_sparsity must lie in [0, 1], got {self.target_sparsity}")
        if self.steps < 1 or self.samples < 1 or not self.lengths:
            raise ValueError(f"steps={self.steps}, samples={self.samples} and lengths={self.lengths} must be >= 1 / non-empty")
        if self.task_loss not in ("distill", "ce"):
            raise ValueError(f"task_loss must be 'distill' or 'ce', got {self.task_loss!r}")
        if self.calibrate_prompts < 0:
            raise ValueError(f"calibrate_prompts must be >= 0, got {self.calibrate_prompts}")
        if not self.logit_penalty >= 0:
            raise ValueError(f"logit_penalty must be >= 0, got {self.logit_penalty}")
        if self.lr_width < 0:
            raise ValueError(f"lr_width must be >= 0 (0: one learning rate for every weight), got {self.lr_width}")
        if self.feature_prompts < 1:
            raise ValueError(f"feature_prompts must be >= 1, got {self.feature_prompts}")
        if not (0 < self.tau_end and 0 < self.tau_start) or not 0 < self.noise_fraction <= 1:
            raise ValueError(f"tau_start={self.tau_start}, tau_end={self.tau_end} must be > 0 and noise_fraction={self.noise_fraction} in (0, 1]")

    def noise(self, step: int) -> float:
        return max(0.0, 1.0 - step / (self.noise_fraction * self.steps))

    def learning_rate(self, step: int) -> float:
        """Cosine from lr down to lr / 10: late steps settle instead of flipping every head at once."""
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, self.steps - 1))))

    def tau(self, step: int) -> float:
        return self.tau_start * (self.tau_end / self.tau_start) ** (step / max(1, self.steps - 1))

    @property
    def window(self) -> int:
        """Steps the running mean of the sparsity covers: one pass over the task families."""
        return max(1, len(self.tasks))

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def router_optimizer(router: torch.nn.Module, lr: float, lr_width: int) -> torch.optim.Optimizer:
    """AdamW with each nn.Linear weight at lr min(1, lr_width / in_features) and every other parameter (biases,
    head embeddings) at lr; lr_width 0: all at lr. Each group keeps its factor as "lr_scale" for the schedule."""
    scale_of = {}
    if lr_width > 0:
        for module in router.modules():
            if isinstance(module, torch.nn.Linear):
                scale_of[id(module.weight)] = min(1.0, lr_width / module.in_features)
    groups: dict[float, list] = {}
    for param in router.parameters():
        groups.setdefault(scale_of.get(id(param), 1.0), []).append(param)
    return torch.optim.AdamW([{"params": ps, "lr": lr * scale, "lr_scale": scale} for scale, ps in sorted(groups.items())], lr=lr)


def new_router(model, *, model_name: str, config: ElasticConfig, target_sparsity: float, dense_layers=None, seed: int = 0,
               weights: str | None = None) -> ElasticRouter:
    """A fresh router for `model`, initialised from `seed` alone (its own RNG: the global one is left as it was)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # sliding-window layers are never the method's (hook.governed): no router, not in Omega
    unrouted = [m.layer_idx for m in attention_modules(model) if getattr(m, "sliding_window", None) is not None]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = ElasticRouter(
            cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, target_sparsity=target_sparsity,
            model={"name": model_name, "weights": weights, "architecture": architecture(model)},
            dense_layers=config.default_dense_layers if dense_layers is None else dense_layers, unrouted_layers=unrouted,
        )
    governed = router.num_layers - len(router.unrouted_layers)
    router.init_prior(target_sparsity * governed / max(1, len(router.layers)))  # the routed layers carry the target
    return router.to(next(model.parameters()).device)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def _identity(settings: TrainSettings, model_name: str, config: ElasticConfig, weights: str | None) -> dict:
    return {"settings": settings.as_dict(), "model": model_name, "weights": weights, "elastic_config": config_fields(config)}


def config_fields(config: ElasticConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items() if k not in ("head_map", "router")}


def load_checkpoint(path: Path, identity: dict) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a router training checkpoint")
    if data["identity"] != identity:
        theirs, mine = data["identity"], identity
        diff = sorted({k for k in (*theirs.get("settings", {}), *mine["settings"]) if theirs.get("settings", {}).get(k) != mine["settings"].get(k)}
                      | {k for k in ("model", "weights", "elastic_config") if theirs.get(k) != mine[k]})
        raise ConfigError(f"checkpoint {str(path)!r} belongs to another training run (differs in {', '.join(diff)}): "
                          "resume with the same settings, or leave out --resume to start afresh")
    return data


# ------------------------------------------------------------------ training


def train_router(model, tokenizer, *, model_name: str, config: ElasticConfig, settings: TrainSettings = TrainSettings(),
                 weights: str | None = None, checkpoint: str | Path | None = None, checkpoint_every: int = 25,
                 resume: bool = False, console=None, prompts: list | None = None) -> tuple[ElasticRouter, list[dict]]:
    """Train a router for `model` (frozen): one prompt per step, cycling; returns (router, curve).

    `checkpoint`: file written every `checkpoint_every` steps and at the end; with `resume` a
    run continues from it (ConfigError when it belongs to other settings). `prompts`: the
    training prompts (default: training_prompts of the settings)."""
    s = settings
    t0 = time.perf_counter()
    prompts = prompts if prompts is not None else training_prompts(tokenizer, s.lengths, s.samples, s.seed, s.tasks)
    router = new_router(model, model_name=model_name, config=config, target_sparsity=s.target_sparsity,
                        dense_layers=s.dense_layers, seed=s.seed, weights=weights)
    router.train().requires_grad_(True)
    model.eval().requires_grad_(False)
    opt = router_optimizer(router, s.lr, s.lr_width)
    generator = torch.Generator().manual_seed(s.seed)
    mixed = MixedAttention(router, config, tau=s.tau_start, hard=True, generator=generator)
    history: list[dict] = []
    multiplier, average, start, seconds_before = 0.0, None, 0, 0.0
    checkpoint = Path(checkpoint).expanduser() if checkpoint is not None else None
    identity = _identity(s, model_name, config, weights)
    if resume:
        if checkpoint is None or not checkpoint.is_file():
            raise ConfigError(f"--resume: no checkpoint at {str(checkpoint)!r} (a run writes one every {checkpoint_every} steps)")
        state = load_checkpoint(checkpoint, identity)
        router.load_state_dict(state["router"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        multiplier, start, history = float(state["multiplier"]), int(state["step"]), list(state["history"])
        average = state.get("average")
        seconds_before = float(state.get("seconds", 0.0))
        if console is not None:
            console.print(f"[dim]resuming from {checkpoint} at step {start} of {s.steps}[/]")

    def save_checkpoint(step: int) -> None:
        if checkpoint is None:
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save({"format": CHECKPOINT_FORMAT, "identity": identity, "step": step, "multiplier": multiplier, "average": average,
                      "router": {k: v.detach().cpu() for k, v in router.state_dict().items()}, "optimizer": opt.state_dict(),
                      "generator": generator.get_state(), "history": history,
                      "seconds": seconds_before + time.perf_counter() - t0}, checkpoint)

    progress = _progress(console, "steps")
    with progress or contextlib.nullcontext(), training_attention(model, mixed):
        if not resume:  # the statistics are router buffers: a resumed run has them from its checkpoint
            router.set_feature_statistics(feature_statistics(model, mixed, prompts[: s.feature_prompts * s.window]))
        task = progress.add_task(f"training the router of {model_name}", total=s.steps, completed=start) if progress else None
        for step in range(start, s.steps):
            tic = time.perf_counter()
            mixed.noise_scale, mixed.tau = s.noise(step), s.tau(step)
            for group in opt.param_groups:
                group["lr"] = s.learning_rate(step) * group["lr_scale"]
            prompt = prompts[step % len(prompts)]
            teacher = dense_teacher(model, mixed, prompt) if s.task_loss == "distill" else None
            loss, task_value, lm, sparsity, mean = router_loss(
                model, mixed, prompt, target_sparsity=s.target_sparsity, sparsity_weight=s.sparsity_weight, multiplier=multiplier,
                average=average, window=s.window, task_loss=s.task_loss, teacher=teacher, logit_penalty=s.logit_penalty)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now, average = float(sparsity.detach()), float(mean.detach())
            history.append({"step": step, "loss": loss.item(), "task_loss": task_value.item(), "lm": lm.item(), "sparsity": now,
                            "average_sparsity": average, "omega": sum(mixed.argmax_sparsity) / len(mixed.argmax_sparsity),
                            "multiplier": multiplier, "logit_rms": _logit_rms(mixed), "tau": mixed.tau, "noise": mixed.noise_scale, "task": prompt.task,
                            "tokens": int(prompt.input_ids.shape[1]), "seconds": round(time.perf_counter() - tic, 4)})
            multiplier += s.dual_rate * s.sparsity_weight / s.window * (average - s.target_sparsity)  # dual ascent on mean s = target
            if (step + 1) % checkpoint_every == 0 or step + 1 == s.steps:
                save_checkpoint(step + 1)
            if progress:
                h = history[-1]
                progress.update(task, advance=1, description=f"router {model_name}: loss {h['loss']:.3f} CE {h['lm']:.3f} "
                                f"Omega {h['omega']:.2f} (target {s.target_sparsity:.2f})")
        threshold = None
        if s.calibrate_prompts:  # the final threshold: the mean Omega of the training prompts on its target
            if progress:
                progress.update(task, description=f"router {model_name}: solving the final threshold on "
                                f"{min(s.calibrate_prompts, len(prompts))} training prompts")
            threshold = calibrate_threshold(model, mixed, prompts[: s.calibrate_prompts], s.target_sparsity)
    router.eval().requires_grad_(False)
    tail = history[-max(1, min(len(history), max(10, s.steps // 10))):]
    router.target_sparsity = s.target_sparsity
    router.training_info = {
        **s.as_dict(), "dense_layers": list(router.dense_layers), "parameters": router.num_parameters(),
        "prompts": len(prompts), "prompt_tokens": sorted({int(p.input_ids.shape[1]) for p in prompts}),
        "final_loss": _mean(h["loss"] for h in tail), "final_lm": _mean(h["lm"] for h in tail),
        "final_task_loss": _mean(h["task_loss"] for h in tail),
        # final_omega: the saved router's (after the final threshold, on its prompts); training_final_omega: the curve's tail
        "final_omega": threshold["omega"] if threshold else _mean(h["omega"] for h in tail),
        "training_final_omega": _mean(h["omega"] for h in tail), "threshold": threshold, "final_steps": len(tail),
        "seconds": round(seconds_before + time.perf_counter() - t0, 2), "resumed_at": start if resume else None,
        "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "elastic_config": config_fields(config), "curve": history,
    }
    return router, history


def _logit_rms(mixed: MixedAttention) -> float | None:
    """Root mean squared centred mode logit of the step's routed layers: the curve shows whether they run away."""
    if not mixed.logit_power:
        return None
    return float(torch.stack([p.detach() for p in mixed.logit_power]).mean().sqrt())


def _mean(xs) -> float | None:
    xs = list(xs)
    return None if not xs else float(sum(xs) / len(xs)) if all(math.isfinite(x) for x in xs) else float("nan")
