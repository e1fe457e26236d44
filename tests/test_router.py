"""Elastic Attention's router (issue 15): training reaches its Omega target, resumes bit for bit,
records its model and refuses another, routes deterministically, and is probed as it runs.

CPU only, tiny random models, the built-in needle prompts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import stem_cli
from stem_cli.cli import app
from stem_cli.config import ConfigError
from stem_cli.elastic import modes as modes_module
from stem_cli.elastic import train as train_module
from stem_cli.elastic.config import DENSE, ElasticConfig
from stem_cli.elastic.router import FORMAT, VERSION, architecture, load_router
from stem_cli.elastic.train import TrainSettings, train_router, training_prompts
from stem_cli.models import load_model

SMALL = dict(block_size=16, k_start=3, sink_blocks=1, window_blocks=1, streaming_sink_tokens=16, streaming_window_tokens=32,
             default_dense_layers=(0,))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", device="cpu")  # 4 layers, 4 query / 2 KV heads, head dim 16, byte tokenizer


@pytest.fixture(scope="module")
def prompts(tiny):
    return training_prompts(tiny.tokenizer, (512,), 2, 0, ("needle",))


def _train(tiny, prompts, **kw):
    settings = TrainSettings(**{"steps": 6, "target_sparsity": 0.5, "lengths": (512,), "samples": 2, "tasks": ("needle",),
                                **kw.pop("settings", {})})
    return train_router(tiny.model, tiny.tokenizer, model_name="tiny-llama", config=ElasticConfig(**SMALL), settings=settings,
                        weights=kw.pop("weights", "sha256:tiny"), prompts=prompts, **kw)


def _omega_by_hand(router, model, ids, runtime=None) -> float:
    """Omega of the router's argmax routing, recomputed from each layer's k_proj output (pre-RoPE keys)
    of a forward of `model` as it runs (dense, or under `runtime`: the keys the elastic run itself sees)."""
    captured = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, l=l: captured.__setitem__(l, o))
             for l, layer in enumerate(model.model.layers)]
    if runtime is not None:
        runtime.recorder.reset()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    not_dense = []
    for layer in range(router.num_layers):
        if not router.routes(layer):
            not_dense += [0.0] * router.num_kv_heads
            continue
        keys = captured[layer].reshape(1, ids.shape[1], router.num_kv_heads, router.head_dim).double()
        feats = torch.cat([keys[0, :100].mean(0), keys[0, -100:].mean(0)], -1)[None].float()
        not_dense += (router.logits(layer, feats)[0].argmax(-1) != DENSE).float().tolist()
    return sum(not_dense) / len(not_dense)


def test_training_reaches_a_toy_omega_target(tiny, prompts, tmp_path):
    """The multiplier drives argmax Omega (what inference runs), averaged over prompts, to the target once the
    Gumbel noise is off (the constraint is on the mean: single prompts may route differently)."""
    router, curve = _train(tiny, prompts, settings={"steps": 36, "target_sparsity": 0.5, "noise_fraction": 0.5})
    last = curve[-6:]
    assert all(h["noise"] == 0 for h in last)
    # 8 routed KV heads: Omega moves in steps of 1/8; the mean is asked within half a step.
    assert sum(h["omega"] for h in last) / len(last) == pytest.approx(0.5, abs=1 / 16 + 1e-9), [h["omega"] for h in curve]
    # The routing inference runs, recomputed by hand from the keys of the elastic pre-fill of each prompt
    # (without its appended answer: the router pools the prompt) equals what the method records.
    path = router.save(tmp_path / "router.pt")
    runtime = stem_cli.apply(tiny.model, "elastic", router=str(path), **SMALL)
    try:
        for p in prompts:
            by_hand = _omega_by_hand(router, tiny.model, p.input_ids[:, : p.answer_start], runtime)
            assert by_hand == pytest.approx(runtime.recorder.elastic.omega, abs=1e-9)
    finally:
        stem_cli.apply(tiny.model, "dense")


def test_logit_penalty_keeps_the_mode_logits_from_running_away(tiny, prompts):
    """Adam moves every router weight by about lr a step, so under a steady pressure the margins grow step after
    step without the z-loss on the centred logits (measured on Gemma-3-270M: logits of 1e3-1e4); with it they stay
    at a few units, and the router still holds its Omega target."""
    free = {"steps": 12, "lr": 0.05, "target_sparsity": 0.5, "task_loss": "ce", "calibrate_prompts": 0, "noise_fraction": 0.5}
    _, runaway = _train(tiny, prompts, settings={**free, "logit_penalty": 0.0})
    _, bounded = _train(tiny, prompts, settings={**free, "logit_penalty": 0.1})
    curves = ([round(h["logit_rms"], 2) for h in runaway], [round(h["logit_rms"], 2) for h in bounded])
    assert runaway[-1]["logit_rms"] > 10 and runaway[-1]["logit_rms"] > 5 * bounded[-1]["logit_rms"], curves
    assert max(h["logit_rms"] for h in bounded[-6:]) < 4, curves
    last = [h["omega"] for h in bounded[-4:]]
    assert sum(last) / len(last) == pytest.approx(0.5, abs=1 / 8 + 1e-9), last  # 8 routed KV heads: steps of 1/8


@pytest.mark.parametrize("lr_width,bounded", [(128, True), (0, False)])
def test_width_scaled_learning_rate_moves_wide_and_narrow_routers_logits_alike(lr_width, bounded):
    """Adam moves each weight by about lr a step whatever its gradient, and an output adds those moves up over its
    fan-in, so at one learning rate a wide router's logits move several times further in its first steps than a
    narrow one's (Gemma-3-270M's, d = 256, spiked to an RMS of 891 by step 7). With each weight matrix at
    lr min(1, lr_width / fan_in) the moves are alike (within 2x) from d = 64 (fan-ins 128-256: at the reference
    width) to d = 256; with one rate, far apart (measured: 52 against 3165 after 5 steps)."""
    from stem_cli.elastic.router import LayerRouter
    from stem_cli.elastic.train import router_optimizer

    def logit_move(head_dim: int) -> float:
        torch.manual_seed(head_dim)
        router = LayerRouter(4, head_dim)  # hidden 2d: fan-ins 2d, 2d, 4d, 2d
        x = torch.randn(64, 4, 2 * head_dim)
        opt = router_optimizer(router, 1e-2, lr_width)
        before = router(x).detach()
        for _ in range(5):  # a steady push of the dense logit above the others, as a sparsity price makes
            z = router(x)
            loss = -(z[..., 0] - z[..., 1:].mean(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float((router(x).detach() - before).pow(2).mean().sqrt())

    narrow, wide = logit_move(64), logit_move(256)
    assert narrow > 0.05, narrow  # both routers learn
    ratio = wide / narrow
    assert (ratio < 2.0) if bounded else (ratio > 4.0), (narrow, wide)


def test_final_threshold_puts_a_short_run_on_its_target(tiny, prompts, tmp_path):
    """Two steps leave the router at its prior, whose argmax is dense everywhere (Omega 0 against 0.3); the final
    threshold moves the mean Omega of the training prompts, as the elastic method itself records it, within 0.05."""
    target = 0.3
    bare, _ = _train(tiny, prompts, settings={"steps": 2, "target_sparsity": target, "calibrate_prompts": 0})
    router, _ = _train(tiny, prompts, settings={"steps": 2, "target_sparsity": target})
    info = router.training_info
    assert info["threshold"]["prompts"] == len(prompts) and info["final_omega"] == info["threshold"]["omega"]

    def inference_omega(r) -> float:
        path = r.save(tmp_path / "r.pt")
        runtime = stem_cli.apply(tiny.model, "elastic", router=str(path), **SMALL)
        try:
            seen = []
            for p in prompts:
                runtime.recorder.reset()
                with torch.no_grad():
                    tiny.model(input_ids=p.input_ids[:, : p.answer_start], use_cache=False, logits_to_keep=1)
                seen.append(runtime.recorder.elastic.omega)
            return sum(seen) / len(seen)
        finally:
            stem_cli.apply(tiny.model, "dense")

    assert abs(inference_omega(bare) - target) > 0.05  # without the threshold this run misses its target
    assert inference_omega(router) == pytest.approx(target, abs=0.05)
    assert inference_omega(router) == pytest.approx(info["final_omega"], abs=1e-9)
    # Only the dense output bias moved, by one number in every routed layer.
    shift = info["threshold"]["dense_logit_shift"]
    for name, layer in router.layers.items():
        before = bare.layers[name]
        assert torch.equal(layer.mode[-1].weight, before.mode[-1].weight)
        assert layer.mode[-1].bias[DENSE].item() == pytest.approx(before.mode[-1].bias[DENSE].item() + shift, abs=1e-6)
        assert torch.equal(layer.mode[-1].bias[1:], before.mode[-1].bias[1:])


def test_threshold_shift_leaves_the_asked_number_of_heads_sparse():
    """Against counting by hand: random margins over forwards with a forced-dense layer (None)."""
    gen = torch.Generator().manual_seed(4)
    for target in (0.0, 0.2, 0.37, 0.5, 0.75, 1.0):
        margins = [[None, *[torch.randn(3, generator=gen) for _ in range(3)]] for _ in range(5)]  # 5 forwards, 4 layers, 3 heads
        d = train_module.threshold_shift(margins, target)
        sparse = sum(int((m + d < 0).sum()) for f in margins for m in f if m is not None)
        assert sparse == min(round(target * 5 * 4 * 3), 5 * 3 * 3), (target, sparse)
        assert all(bool((m + d != 0).all()) for f in margins for m in f if m is not None)  # nothing on the boundary


def test_resumed_run_gives_the_same_router_bit_for_bit(tiny, prompts, tmp_path, monkeypatch):
    whole, whole_curve = _train(tiny, prompts)
    calls = {"n": 0}
    real = train_module.router_loss

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # step index 4: the checkpoint holds 4 finished steps
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    ckpt = tmp_path / "r.ckpt"
    monkeypatch.setattr(train_module, "router_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny, prompts, checkpoint=ckpt, checkpoint_every=2)
    monkeypatch.setattr(train_module, "router_loss", real)
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    resumed, resumed_curve = _train(tiny, prompts, checkpoint=ckpt, checkpoint_every=2, resume=True)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    drop = lambda curve: [{k: v for k, v in h.items() if k != "seconds"} for h in curve]  # noqa: E731
    assert drop(whole_curve) == drop(resumed_curve)
    assert resumed.training_info["resumed_at"] == 4
    # Another seed is another run: resuming its checkpoint with other settings is refused.
    with pytest.raises(ConfigError, match="differs in seed"):
        _train(tiny, prompts, settings={"seed": 1}, checkpoint=ckpt, resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        _train(tiny, prompts, checkpoint=tmp_path / "none.ckpt", resume=True)


def test_same_seed_same_router_other_seed_another(tiny, prompts):
    a, _ = _train(tiny, prompts, settings={"steps": 2})
    b, _ = _train(tiny, prompts, settings={"steps": 2})
    c, _ = _train(tiny, prompts, settings={"steps": 2, "seed": 3})
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())


def test_router_file_schema_and_wrong_model(tiny, prompts, tmp_path):
    router, curve = _train(tiny, prompts, settings={"steps": 3})
    path = router.save(tmp_path / "r.pt")
    data = torch.load(path, weights_only=True)
    assert data["format"] == FORMAT and data["version"] == VERSION == 3
    assert data["model"] == {"name": "tiny-llama", "weights": "sha256:tiny", "architecture": architecture(tiny.model)}
    assert data["code"]["stem_version"] == stem_cli.__version__
    info = data["training"]
    assert info["lengths"] == [512] and info["target_sparsity"] == 0.5 and info["steps"] == 3
    assert [h["step"] for h in info["curve"]] == [0, 1, 2] and all({"loss", "omega", "lm"} <= set(h) for h in info["curve"])
    back = load_router(path)
    assert back.model_info["weights"] == "sha256:tiny"
    back.check_weights("sha256:tiny")
    with pytest.raises(ConfigError, match="weights sha256:tiny but this model's weights are sha256:other"):
        back.check_weights("sha256:other")
    # Another model: a clear error at apply time, exit code 2 from the CLI.
    qwen = load_model("tiny-qwen3", device="cpu")
    with pytest.raises(ConfigError, match="does not fit this model"):
        stem_cli.apply(qwen.model, "elastic", router=str(path), **SMALL)
    result = CliRunner().invoke(app, ["generate", "--model", "tiny-qwen3", "--needle", "600", "--method", "elastic",
                                      "--set", f"router={path}", "--set", "block_size=16", "--max-new-tokens", "1"],
                                env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "does not fit this model" in result.output


def test_routing_is_deterministic_and_is_the_router_argmax(tiny, prompts, tmp_path):
    router, _ = _train(tiny, prompts, settings={"steps": 3})
    path = router.save(tmp_path / "r.pt")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 250, (1, 300), generator=gen)
    runtime = stem_cli.apply(tiny.model, "elastic", router=str(path), **SMALL)
    seen = []
    for _ in range(2):
        runtime.recorder.reset()
        with torch.no_grad():
            tiny.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        seen.append((runtime.recorder.elastic.omega, json.dumps(runtime.recorder.elastic.last_modes, sort_keys=True)))
    assert seen[0] == seen[1]
    assert seen[0][0] == pytest.approx(_omega_by_hand(load_router(path), tiny.model, ids, runtime))


def test_budget_probe_routes_on_pre_rope_keys(tiny, prompts, tmp_path):
    """The equal-budget solver probes elastic with its router prepared: no post-RoPE fallback, and the
    BUD it measures at a knob value is the BUD a real run at that value records."""
    from stem_cli.runs.budget import bud_curve

    # No final threshold: this router's modes do not change between the probe's dense hidden states and the run's
    # (with sparse heads in early layers they can, and then the BUDs differ by design: runs/budget.py).
    router, _ = _train(tiny, prompts, settings={"steps": 2, "calibrate_prompts": 0})
    path = router.save(tmp_path / "r.pt")
    config = ElasticConfig(**SMALL, router=str(path))
    ids = torch.randint(3, 250, (1, 320), generator=torch.Generator().manual_seed(11))
    modes_module._noticed.discard("elastic:post-rope")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probed = bud_curve(tiny.model, "elastic", config, [0.5, 2.0], [ids])
    runtime = stem_cli.apply(tiny.model, "elastic", router=str(path), **{**SMALL, "k_scale": 0.5})
    with torch.no_grad():
        tiny.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    assert runtime.recorder.bud == pytest.approx(probed[0], abs=1e-9)


def test_compare_calibrated_map_and_router_at_matched_budget(tiny, prompts, tmp_path):
    """`stem compare dense elastic elastic-router` with a map and a router, each solved to the same BUD."""
    from stem_cli.elastic.headmap import HeadMap, save_head_map

    from stem_cli.runs.keys import weights_identity

    router, _ = _train(tiny, prompts, settings={"steps": 1}, weights=weights_identity(tiny)["weights"])
    with torch.no_grad():  # a router that picks stem for most heads, so the budget is reachable
        for layer in router.layers.values():
            layer.mode[-1].bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    path = router.save(tmp_path / "r.pt")
    head_map = save_head_map(HeadMap("tiny-llama", 4, 2, [["dense", "dense"], ["stem", "dense"], ["stem", "streaming"], ["stem", "stem"]],
                                     target_sparsity=0.5), tmp_path / "map.json")
    small = [f"{k}={v}" for k, v in SMALL.items() if k != "default_dense_layers"]
    common = dict(tasks=["ruler/niah_single_1"], lengths="600", limit=1, max_new_tokens=2, device="cpu", output=tmp_path / "runs")
    with pytest.raises(stem_cli.errors.UsageError, match="elastic-router needs its router"):
        stem_cli.compare("tiny-llama", ["elastic-router"], overrides=small, **common)
    result = stem_cli.compare("tiny-llama", ["elastic", "elastic-router"], budget=0.7,
                              overrides=[*small, f"elastic.head_map={head_map}", f"elastic-router.router={path}"], **common)
    rows = {r["method"]: r for r in result.rows}
    assert set(rows) == {"dense", "elastic", "elastic-router"}
    for name in ("elastic", "elastic-router"):
        assert rows[name]["bud"] == pytest.approx(0.7, abs=0.05)  # matched BUD (the probe routes like the run)
        assert rows[name]["omega"] is not None
    assert rows["elastic"]["omega"] == pytest.approx(5 / 8)  # the map: 3 of 8 KV heads dense
    # A router retrained in place is another router: its results are keyed by the file's content.
    from stem_cli.runs.keys import config_files

    before = config_files(ElasticConfig(**SMALL, router=str(path)))
    _train(tiny, prompts, settings={"steps": 2, "seed": 5})[0].save(path)
    assert config_files(ElasticConfig(**SMALL, router=str(path))) != before


def test_bench_smoke_run_writes_router_curve_and_timings(tmp_path):
    """tests/bench/router.py end to end on the CPU (tiny sizes): router file + JSON + PNG + the bench JSON."""
    from tests.bench import router as bench

    assert bench.main(["--model", "tiny-llama", "--device", "cpu", "--smoke", "--repeat", "1", "--warmup", "0",
                       "--output", str(tmp_path)]) == 0
    out = tmp_path / "elastic"
    (record,) = [json.loads(p.read_text()) for p in out.glob("router-bench-*.json")]
    assert record["checks"]["router_modes_match_the_run"] is True
    assert [r["seq_len"] for r in record["overhead"]] == [512, 1024]
    assert all(r["router_ms"] > 0 and r["prefill_dense_ms"] > 0 for r in record["overhead"])
    router = Path(record["training"]["router"])
    assert router.is_file() and router.with_suffix(".png").stat().st_size > 1000
    assert json.loads(router.with_suffix(".json").read_text())["training"]["steps"] == 4
    assert record["training"]["threshold"]["prompts"] == 1 and record["training"]["final_omega"] == record["training"]["threshold"]["omega"]
    # The comparison stage: matched Omega, then matched BUD at the BUD the router's run reached, paired deltas of the router.
    compare = record["compare"]
    omega_rows = {r["method"]: r for r in compare["matched_omega"]["rows"]}
    assert set(omega_rows) == {"dense", "stem", "elastic", "elastic-router"}
    assert omega_rows["elastic"]["omega"] == pytest.approx(omega_rows["elastic-router"]["omega"], abs=0.13)  # matched, up to one head
    (bud,) = compare["matched_bud"]
    assert bud["budget"] == pytest.approx(omega_rows["elastic-router"]["bud"], abs=1e-3)
    for row in bud["rows"]:
        if row["method"] != "dense":
            assert row["bud"] == pytest.approx(bud["budget"], abs=0.05), row
    assert set(bud["methods"]) | set(bud["dropped"]) == {"dense", "stem", "elastic", "elastic-router"}
    for stage in (compare["matched_omega"], bud):
        deltas = {d["router_vs"] for d in stage["router_deltas"]}
        assert deltas == set(m for m in stage.get("methods", compare["methods"]) if m != "elastic-router")
        assert all(d["head_to_head"] == "inconclusive" for d in stage["router_deltas"])  # one sample cannot carry a verdict
        for kind in ("json", "png"):
            assert Path(stage["files"][kind]).is_file() and Path(stage["files"][kind]).parent == tmp_path / "compare"
    assert Path(compare["json"]).is_file()
    # --router: the same router measured again without training; its knobs and lengths come from the file.
    again = tmp_path / "again"
    assert bench.main(["--model", "tiny-llama", "--device", "cpu", "--smoke", "--repeat", "1", "--warmup", "0",
                       "--router", str(router), "--compare-samples", "0", "--output", str(again)]) == 0
    (reused,) = [json.loads(p.read_text()) for p in (again / "elastic").glob("router-bench-*.json")]
    assert reused["training"]["reused"] is True and reused["training"]["lengths"] == record["training"]["lengths"]
    assert reused["training"]["final_omega"] == record["training"]["final_omega"]
    assert reused["elastic_config"] == record["elastic_config"]  # the smoke knobs, read back from the file
    assert [r["omega"] for r in reused["overhead"]] == [r["omega"] for r in record["overhead"]]  # same router, same routing


def _pooled_by_hand(model, ids) -> dict[int, torch.Tensor]:
    """layer -> (Hkv, 2d) float64 means of the k_proj outputs of the first / last 100 tokens (a dense forward)."""
    captured = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, l=l: captured.__setitem__(l, o))
             for l, layer in enumerate(model.model.layers)]
    stem_cli.apply(model, "dense")
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    return {l: torch.cat([k.double().view(ids.shape[1], hkv, d)[:100].mean(0), k.double().view(ids.shape[1], hkv, d)[-100:].mean(0)], -1)
            for l, k in ((l, k[0]) for l, k in captured.items())}


def test_router_decisions_depend_on_the_input(tiny, tmp_path):
    """Two inputs whose standardised features are opposite must route opposite ways.

    The router is set by hand to be (to first order) linear in its standardised input: small feature and
    mode weights, logits dense = +a u.g, stem = -a u.g, streaming far below (g ~ LN(x') / 4). Its feature
    statistics are those of inputs A and B, so x'_A = -x'_B for every head: each head of the first routed
    layer (its keys come from the dense layer 0, the same as in a dense forward) must be dense on one input
    and Stem on the other. An LN-only input (mu = 0, sigma = 1: the old router) sees two nearly equal
    vectors (the head's constant) and routes both inputs alike."""
    from stem_cli.elastic.router import ElasticRouter

    model = tiny.model
    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(11)
    a, b = (torch.randint(3, 250, (1, 300), generator=gen) for _ in range(2))
    feats_a, feats_b = _pooled_by_hand(model, a), _pooled_by_hand(model, b)
    router = ElasticRouter(cfg.num_hidden_layers, hkv, d, dense_layers=(0,), model={"name": "tiny-llama", "architecture": architecture(model)})
    eps = 1e-2
    u = torch.randn(router.hidden, generator=gen)
    with torch.no_grad():
        for r in router.layers.values():
            for lin in (r.feature[0], r.feature[2]):
                lin.weight.copy_(torch.eye(router.hidden)), lin.bias.zero_()
            r.feature[0].weight.mul_(eps)
            r.head_embedding.zero_()
            r.mode[0].weight.zero_(), r.mode[0].bias.zero_()
            r.mode[0].weight[:, : router.hidden].copy_(torch.eye(router.hidden))
            r.mode[2].weight.zero_()
            r.mode[2].weight[DENSE], r.mode[2].weight[1] = u / eps, -u / eps
            r.mode[2].bias.copy_(torch.tensor([0.0, 0.0, -1e4]))
    router.set_feature_statistics({l: torch.stack([feats_a[l], feats_b[l]]).float() for l in feats_a})
    path = router.save(tmp_path / "hand.pt")
    runtime = stem_cli.apply(model, "elastic", router=str(path), **SMALL)
    try:
        modes = []
        for ids in (a, b):
            runtime.recorder.reset()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            modes.append(runtime.recorder.elastic.last_modes[1][0])
    finally:
        stem_cli.apply(model, "dense")
    flip = {"dense": "stem", "stem": "dense"}
    assert modes[1] == [flip[m] for m in modes[0]], modes


# Host reads: aten ops whose result the host must wait for on a GPU, and the Python calls that copy to the host.
_HOST_READ_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_dim", "unique_consecutive", "equal",
                  "masked_select", "bincount", "is_nonzero"}
# Where an elastic pre-fill may read the host: Stem's budgets (host tensors, methods/stem.py and blocks.py) and the
# hook's valid-key check (once per forward, every method).
_HOST_SIDE = ("methods/stem.py", "methods/blocks.py", "stem_cli/hook.py")


def _innermost_stem_frame() -> str:
    import traceback

    frames = [f.filename for f in traceback.extract_stack() if "/stem_cli/" in f.filename and not f.filename.endswith("test_router.py")]
    return frames[-1] if frames else ""


def test_router_prefill_reads_nothing_back_per_layer(tiny, prompts, tmp_path, monkeypatch):
    """No host read in the router's path (pooling, MLPs, argmax, index from the modes, Omega counts): on a GPU
    each would stall the launch queue once per layer. Counted on the CPU as aten ops that need the device's
    values on the host, and calls of Tensor.tolist / .cpu / .item; Stem's own host-side budget math is allowed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    router, _ = _train(tiny, prompts, settings={"steps": 2})
    path = router.save(tmp_path / "r.pt")
    runtime = stem_cli.apply(tiny.model, "elastic", router=str(path), **SMALL)
    ids = torch.randint(3, 250, (1, 400), generator=torch.Generator().manual_seed(5))
    reads: list[str] = []

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in _HOST_READ_OPS:
                reads.append(f"{func.__name__} in {_innermost_stem_frame()}")
            return func(*args, **(kwargs or {}))

    for name in ("tolist", "cpu", "item"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **kw):
            reads.append(f"Tensor.{_name} in {_innermost_stem_frame()}")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    try:
        with torch.no_grad(), HostReads():
            tiny.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        monkeypatch.undo()
    offending = [r for r in reads if "/stem_cli/" in r and not r.endswith(_HOST_SIDE)]
    assert offending == [], offending
    assert runtime.recorder.elastic.calls == router.num_layers  # every layer went through the selector
    stem_cli.apply(tiny.model, "dense")


def test_router_compare_drops_the_settings_of_a_method_left_out():
    """A method dropped from the matched-BUD run takes its scoped --set items along (compare refuses an item naming a
    method it does not run); bare knobs and the other methods' items stay."""
    from tests.bench.router_compare import for_methods

    items = ["block_size=32", "k_scale=0.5", "elastic.head_map=/m.json", "elastic-router.router=/r.pt"]
    assert for_methods(items, ["dense", "stem", "elastic", "elastic-router"]) == items
    assert for_methods(items, ["dense", "stem", "elastic-router"]) == ["block_size=32", "k_scale=0.5", "elastic-router.router=/r.pt"]


def test_sliding_window_layers_get_no_router(tmp_path):
    """Gemma-3's local layers are never the method's (hook.governed): the router has none for them (a router per
    layer would be dead weight: 13 of Gemma-3-270M's 16 non-dense layers), keeps the list through its file, and
    starts its routed heads at the target (the prior counts governed layers only)."""
    from stem_cli.elastic.train import new_router
    from stem_cli.hook import attention_modules

    gemma = load_model("tiny-gemma3", device="cpu")  # layers 0-2 sliding window, layer 3 global
    local = [m.layer_idx for m in attention_modules(gemma.model) if getattr(m, "sliding_window", None) is not None]
    assert local == [0, 1, 2]
    router = new_router(gemma.model, model_name="tiny-gemma3", config=ElasticConfig(**SMALL), target_sparsity=0.6)
    assert [layer for layer in range(4) if router.routes(layer)] == [3]
    assert router.unrouted_layers == (0, 1, 2)
    feats = torch.randn(1, 2, 32)
    p_dense = torch.softmax(router.logits(3, feats), -1)[..., DENSE]
    torch.testing.assert_close(p_dense, torch.full_like(p_dense, 0.4), rtol=0.05, atol=0.05)  # ~ 1 - target
    again = load_router(router.save(tmp_path / "g.pt"))
    assert again.unrouted_layers == (0, 1, 2) and [layer for layer in range(4) if again.routes(layer)] == [3]
    torch.testing.assert_close(again.logits(3, feats), router.logits(3, feats))


@pytest.mark.parametrize("heads,head_dim,batch", [(3, 32, 2), (1, 64, 1), (8, 16, 3), (20, 8, 1)])
def test_fused_router_kernel_equals_the_module_in_float64(heads, head_dim, batch):
    """kernels/router_mlp.py (one launch per layer, run here in the interpreter) against LayerRouter.forward in
    float64 on random weights, feature statistics and pooled keys: logits within float32 rounding, and the modes
    its argmax, wherever the float64 logits' top two are not within that rounding of each other. 20 heads: more
    than the 16 padded rows."""
    pytest.importorskip("triton")
    from stem_cli.elastic.router import LayerRouter
    from stem_cli.kernels.router_mlp import router_modes

    torch.manual_seed(heads * 100 + head_dim)
    router = LayerRouter(heads, head_dim)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn_like(p) * (1.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.3))
        router.feature_mean.copy_(torch.randn_like(router.feature_mean))
        router.feature_std.copy_(torch.rand_like(router.feature_std) + 0.5)
    x = torch.randn(batch, heads, 2 * head_dim) * 3 + 1
    modes, logits = router_modes(router, x)
    with torch.no_grad():
        want = router.double()(x.double())
    assert logits.shape == (batch, heads, 3) and modes.dtype == torch.int64
    torch.testing.assert_close(logits.double(), want, rtol=1e-4, atol=1e-4)
    top2 = want.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert clear.any()
    assert torch.equal(modes[clear], want.argmax(-1)[clear]), (modes, want.argmax(-1))


def test_sparse_mode_outputs_are_recomputed_in_backward_with_the_same_gradients():
    """Training's sparse modes (masked SDPA) keep only their inputs for the backward pass, not their N^2 masks and
    probabilities (which ran a 24 GB machine out of memory at 4K), and give the same values and gradients."""
    from stem_cli.elastic.modes import streaming_index
    from stem_cli.elastic.train import sparse_mode_output
    from stem_cli.executor import masked_sdpa

    torch.manual_seed(5)
    b, hq, hkv, n, d = 1, 4, 2, 256, 16
    index = streaming_index(b, hkv, n, 16, 1, 2, None, torch.device("cpu"))
    base = [torch.randn(b, h, n, d, dtype=torch.float64) for h in (hq, hkv, hkv)]

    def run(fn):
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            out = fn(q, k, v)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * weight).sum().backward()
        return out.detach(), [x.grad for x in (q, k, v)], sum(saved)

    want, want_grads, kept_bytes = run(lambda q, k, v: masked_sdpa(q, k, v, index, scale=0.25))
    got, got_grads, recompute_bytes = run(lambda q, k, v: sparse_mode_output(q, k, v, index, 0.25, None))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    inputs = sum(x.numel() * x.element_size() for x in base)
    assert recompute_bytes <= inputs < kept_bytes / 4, (recompute_bytes, inputs, kept_bytes)


def test_stored_comparison_summary_pairs_only_samples_both_methods_have(tmp_path):
    """An interrupted comparison's store read back: accuracy per method and length is the mean over its strata (each
    task at a length weighted equally), and the router's delta pairs only the samples both methods reached."""
    import json
    import random

    from tests.bench.router_compare import summarize_stored

    rng = random.Random()
    records, scores = [], {}
    for method in ("dense", "elastic-router"):
        for task in ("ruler/niah_single_2", "ruler/vt"):
            reached = 4 if method == "dense" else 3  # the router's run stopped one sample short on each task
            for i in range(reached):
                score = float(rng.random() < 0.5)
                scores[(method, task, i)] = score
                records.append({"method": method, "task": task, "seq_len": 8192, "sample": f"{task}/{i}", "score": score,
                                "bud": 0.5 if method != "dense" else 1.0})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize_stored(path)
    rows = {(r["method"], r["seq_len"]): r for r in summary["rows"]}

    def task_mean(method, samples):
        return sum(sum(scores[(method, t, i)] for i in range(samples)) / samples for t in ("ruler/niah_single_2", "ruler/vt")) / 2

    assert rows[("dense", 8192)]["score"] == pytest.approx(task_mean("dense", 4))
    assert rows[("elastic-router", 8192)]["score"] == pytest.approx(task_mean("elastic-router", 3))
    assert rows[("dense", 8192)]["n"] == 8 and rows[("elastic-router", 8192)]["n"] == 6
    delta = next(d for d in summary["router_deltas"] if d["router_vs"] == "dense" and d["seq_len"] == 8192)
    assert delta["n"] == 6  # three pairs per task: dense's fourth samples have no partner
    assert delta["delta"] == pytest.approx(100 * (task_mean("elastic-router", 3) - task_mean("dense", 3)))
    assert summary["strata"] == {"ruler/niah_single_2@8192": 7, "ruler/vt@8192": 7}


def test_router_modes_on_the_host_give_the_device_path_s_output_and_key(tiny, prompts, tmp_path):
    """router_modes="host" (modes read back, only the parts used built; an all-dense layer runs dense SDPA) computes
    what the device path computes: the same modes, Omega and logits, and a result made either way has one key."""
    from stem_cli.runs.store import config_key

    router, _ = _train(tiny, prompts, settings={"steps": 3})
    path = router.save(tmp_path / "r.pt")
    ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()))))
    seen = {}
    for where in ("device", "host"):
        runtime = stem_cli.apply(tiny.model, "elastic", router=str(path), router_modes=where, **SMALL)
        runtime.recorder.reset()
        with torch.no_grad():
            logits = tiny.model(input_ids=ids, use_cache=False).logits
        seen[where] = (logits, runtime.recorder.elastic.omega, runtime.recorder.elastic.last_modes, runtime.recorder.bud)
    stem_cli.apply(tiny.model, "dense")
    torch.testing.assert_close(seen["host"][0], seen["device"][0], rtol=1e-5, atol=1e-5)
    assert seen["host"][1:] == seen["device"][1:]
    assert config_key(ElasticConfig(router=str(path), router_modes="host")) == config_key(ElasticConfig(router=str(path)))
    with pytest.raises(ConfigError, match="router_modes='nowhere'"):
        ElasticConfig(router_modes="nowhere")


def test_a_routed_pre_fill_does_not_move_a_router_already_in_place(tiny, prompts, tmp_path, monkeypatch):
    """decide_modes asks for the router on the keys' device once per routed layer per pre-fill; nn.Module.to walks
    every parameter (about 1 ms a call for a 16-layer router), so a router already there must not be moved again."""
    from torch import nn

    router, _ = _train(tiny, prompts, settings={"steps": 2})
    path = router.save(tmp_path / "r.pt")
    runtime = stem_cli.apply(tiny.model, "elastic", router=str(path), **SMALL)
    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()))))
    with torch.no_grad():
        tiny.model(input_ids=ids, use_cache=False)  # the first call may place it
    moves = []
    real_to = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **kw: moves.append(type(self).__name__) or real_to(self, *a, **kw))
    runtime.recorder.reset()
    with torch.no_grad():
        tiny.model(input_ids=ids, use_cache=False)
    assert runtime.recorder.elastic.omega is not None  # the router ran
    assert [m for m in moves if "Router" in m] == []
    stem_cli.apply(tiny.model, "dense")
    assert load_router(path).on("cpu") is load_router(path)


def test_bench_reuses_stored_comparison_results_and_survives_an_interrupt(tmp_path, monkeypatch):
    """--compare-results seeds the comparison store with an earlier run's results (no line twice); a SIGINT in the
    comparison leaves a summary of what was stored in the bench JSON and the overhead stage still runs."""
    from stem_cli.runs.evaluation import Interrupted
    from tests.bench import router as bench
    from tests.bench import router_compare

    first = tmp_path / "first"
    common = ["--model", "tiny-llama", "--device", "cpu", "--smoke", "--repeat", "1", "--warmup", "0"]
    assert bench.main([*common, "--output", str(first)]) == 0
    (stored,) = (first / "compare").glob("runs-*/results-*.jsonl")
    lines = stored.read_text().splitlines()
    (router,) = (first / "elastic").glob("router-*.pt")

    def interrupted(**kw):
        store = Path(kw["output"]) / "compare" / f"runs-{kw['name']}" / stored.name
        raise Interrupted(0, store)

    monkeypatch.setattr(router_compare, "run_compare", interrupted)
    second = tmp_path / "second"
    for _ in range(2):  # seeding twice adds nothing the second time
        assert bench.main([*common, "--router", str(router), "--compare-results", str(stored), "--output", str(second)]) == 0
    (seeded,) = (second / "compare").glob("runs-*/results-*.jsonl")
    assert sorted(seeded.read_text().splitlines()) == sorted(lines)
    records = [json.loads(p.read_text()) for p in (second / "elastic").glob("router-bench-*.json")]
    assert records and all(r["compare"]["partial"]["records"] == len(lines) and "interrupted" in r["compare"] for r in records)
    assert all(len(r["overhead"]) == 2 and r["overhead"][0]["router_ms"] > 0 for r in records)
