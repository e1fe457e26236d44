"""The PNGs: the pre-fill profile (time per stage, speed-up), compare (accuracy vs BUD), fidelity by query position."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from stem_cli.units import format_length

PARTS = (("attention_ms", "attention", "#4c72b0"), ("estimation_ms", "estimation", "#dd8452"), ("other_ms", "other", "#a0a0a0"))


def _failed(row: dict) -> str | None:
    """The row's failure label ("OOM", "error"), or None when it has numbers to draw."""
    status = row.get("status")
    if not status or str(status).lower() == "ok":
        return None
    return str(status).split(":")[0]  # "error: CUDA ..." -> "error", short enough for a bar


def _save(fig, path: Path) -> Path:
    """Lay out, write the PNG (making its folder) and close the figure: one process can draw many plots."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _ordered(values) -> list:
    return list(dict.fromkeys(values))  # first-seen order, duplicates dropped


def plot_profile(rows: list[dict], path: str | Path, title: str) -> Path:
    """Write the two-panel profile plot of `rows` to `path` (PNG) and return the path."""
    if not rows:
        raise ValueError("plot_profile: no result rows to plot (the profile produced no rows)")
    path = Path(path)
    methods = _ordered(row["method"] for row in rows)
    lengths = sorted(_ordered(int(row["seq_len"]) for row in rows))
    by_key = {(int(row["seq_len"]), row["method"]): row for row in rows}

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), dpi=120, gridspec_kw={"width_ratios": [1.4, 1]})
    fig.suptitle(title)

    totals = [sum(row.get(key) or 0.0 for key, _, _ in PARTS) for row in rows if not _failed(row)]
    nonzero = [t for t in totals if t > 0]
    top = max(nonzero, default=1.0)
    log_y = bool(nonzero) and top > 50 * min(nonzero)

    width = 0.8 / len(methods)
    bar_x, bar_names = [], []
    for group, n in enumerate(lengths):
        for slot, method in enumerate(methods):
            row = by_key.get((n, method))
            if row is None:
                continue  # this method was not run at this length
            x = group - 0.4 + width * (slot + 0.5)
            bar_x.append(x)
            bar_names.append(method)
            failure = _failed(row)
            if failure:
                # Full height, so a failed run stands out instead of looking fast.
                left.bar(x, top, width * 0.9, fill=False, hatch="///", edgecolor="#c44e52", linewidth=1)
                left.text(x, top ** 0.5 if log_y else top / 2, failure, ha="center", va="center", rotation=90,
                          fontsize=8, color="#c44e52", fontweight="bold", bbox={"fc": "white", "ec": "none", "pad": 1})
                continue
            bottom = 0.0
            for key, _, color in PARTS:
                value = row.get(key) or 0.0
                left.bar(x, value, width * 0.9, bottom=bottom, color=color, edgecolor="white", linewidth=0.5)
                bottom += value

    # Method names as minor ticks under each bar, lengths as major ticks padded below them.
    rotate = len(bar_x) > 8 or max(len(m) for m in methods) * len(methods) > 24
    left.xaxis.remove_overlapping_locs = False  # else a bar at a group centre loses its name
    left.set_xticks(bar_x, bar_names, minor=True, rotation=90 if rotate else 0, fontsize=8)
    left.set_xticks(range(len(lengths)), [format_length(n) for n in lengths], fontweight="bold")
    left.tick_params(axis="x", which="minor", length=0)
    left.set_xlim(-0.5, len(lengths) - 0.5)
    if log_y:
        left.set_yscale("log")
    left.set_ylabel("pre-fill time (ms)")
    left.set_xlabel("sequence length / method")
    left.set_title("time breakdown")
    left.grid(axis="y", alpha=0.3)
    left.set_axisbelow(True)
    handles = [Patch(color=color, label=label) for _, label, color in PARTS]
    if len(totals) < len(rows):
        handles.append(Patch(fill=False, hatch="///", edgecolor="#c44e52", label="failed (OOM, error)"))
    left.legend(handles=handles, fontsize=8, loc="best")

    best = 0.0  # highest speed-up drawn, for the y range
    for index, method in enumerate(methods):
        if method == "dense":  # the baseline is the dashed line at 1.0
            continue
        points = [(n, by_key[(n, method)].get("speedup")) for n in lengths if (n, method) in by_key]
        points = [(n, s) for n, s in points if isinstance(s, (int, float))]  # dense rows and OOMs have none
        for n in lengths:  # say why a point is missing rather than leave a silent gap
            failure = _failed(by_key.get((n, method), {}))
            if failure:
                right.annotate(f"{method}: {failure}", (n, 0), xytext=(0, 4 + 11 * index), textcoords="offset points",
                               xycoords=("data", "axes fraction"), ha="center", fontsize=7, color=f"C{index % 10}")
        if not points:
            continue
        xs, ys = zip(*points)
        right.plot(xs, ys, marker="os^Dvp<>"[index % 8], label=method, color=f"C{index % 10}")
        best = max(best, *ys)
    right.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense")
    right.set_xscale("log", base=2)
    right.set_xticks(lengths, [format_length(n) for n in lengths])
    right.xaxis.set_minor_locator(NullLocator())  # log-scale minor ticks would add unlabelled clutter
    right.set_xlim(lengths[0] / 1.5, lengths[-1] * 1.5)  # room for end markers and notes
    right.set_xlabel("sequence length")
    right.set_ylabel("speed-up vs dense (x)")
    right.set_title("speed-up vs dense")
    right.grid(alpha=0.3)
    right.set_ylim(0, max(1.0, best) * 1.15)  # from zero, with room above the 1.0 line and the best point
    right.legend(fontsize=8)

    # Push the length labels just below the method names, measured once they are laid out.
    fig.canvas.draw()
    name_depth = max(label.get_window_extent().height for label in left.get_xticklabels(minor=True)) * 72 / fig.dpi
    left.tick_params(axis="x", which="major", length=0, pad=name_depth + 8)
    return _save(fig, path)


def plot_compare(flat: list[dict], path: str | Path, title: str) -> Path:
    """Accuracy against BUD per method (one point per length), and speed-up against length when profiled."""
    if not flat:
        raise ValueError("plot_compare: no rows to plot")
    path = Path(path)
    methods = _ordered(row["method"] for row in flat)
    profiled = any(row.get("speedup") is not None for row in flat)
    fig, axes = plt.subplots(1, 2 if profiled else 1, figsize=(12 if profiled else 7, 5.5), dpi=120, squeeze=False)
    fig.suptitle(textwrap.fill(title, 110 if profiled else 64), fontsize=10)
    acc = axes[0][0]
    for index, method in enumerate(methods):
        rows = [row for row in flat if row["method"] == method and row.get("bud") is not None and row.get("average") is not None]
        if not rows:
            continue
        xs = [100 * row["bud"] for row in rows]
        ys = [100 * row["average"] for row in rows]
        acc.plot(xs, ys, marker="os^Dvp<>"[index % 8], linestyle="-" if len(xs) > 1 else "none", label=method,
                 color=f"C{index % 10}")
        with_ci = [(x, y, row) for x, y, row in zip(xs, ys, rows) if row.get("ci_low") is not None]
        if with_ci:  # the 95% interval of each average (stem_cli/report/stats.py)
            acc.errorbar([x for x, _, _ in with_ci], [y for _, y, _ in with_ci],
                         yerr=[[y - 100 * r["ci_low"] for _, y, r in with_ci], [100 * r["ci_high"] - y for _, y, r in with_ci]],
                         fmt="none", ecolor=f"C{index % 10}", alpha=0.5, capsize=3)
        for x, y, row in zip(xs, ys, rows):
            label = format_length(row["seq_len"]) + (f", n={row['n']}" if row.get("n") is not None else "")
            acc.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    acc.set_xlabel("BUD (% of dense attention's token pairs)")
    acc.set_ylabel("average accuracy (%), 95% interval" if any(row.get("ci_low") is not None for row in flat)
                   else "average accuracy (%)")
    acc.set_title("accuracy vs budget")
    acc.set_xlim(0, 105)
    acc.grid(alpha=0.3)
    acc.legend(fontsize=8)
    if profiled:
        speed = axes[0][1]
        for index, method in enumerate(methods):
            points = sorted((row["seq_len"], row["speedup"]) for row in flat if row["method"] == method and row.get("speedup") is not None)
            if points and method != "dense":
                xs, ys = zip(*points)
                speed.plot(xs, ys, marker="os^Dvp<>"[index % 8], label=method, color=f"C{index % 10}")
        lengths = sorted({row["seq_len"] for row in flat})
        speed.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense")
        speed.set_xscale("log", base=2)
        speed.set_xticks(lengths, [format_length(n) for n in lengths])
        speed.xaxis.set_minor_locator(NullLocator())
        speed.set_xlabel("sequence length")
        speed.set_ylabel("pre-fill speed-up vs dense (x)")
        speed.set_title("speed-up vs dense")
        speed.grid(alpha=0.3)
        speed.legend(fontsize=8)
    return _save(fig, path)


def plot_fidelity_positions(rows: list[dict], path: str | Path, title: str) -> Path:
    """The fidelity task by query position (tasks/fidelity.py): relative output error and dropped softmax
    mass per slice of the prompt, one line per method and length, and the last rows (the question) apart."""
    rows = [r for r in rows if r.get("position_rel_error")]
    if not rows:
        raise ValueError("plot_fidelity_positions: no fidelity rows with position curves")
    path = Path(path)
    methods = _ordered(r["method"] for r in rows if r["method"] != "dense")
    lengths = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    panels = (("position_rel_error", "relative output error vs dense"), ("position_delta", "dropped softmax mass (delta)"))
    for ax, (key, label) in zip(axes, panels):
        for index, method in enumerate(methods):
            for style, seq_len in zip(("-", "--", ":", "-."), lengths):
                row = next((r for r in rows if r["method"] == method and r["seq_len"] == seq_len), None)
                if row is None:
                    continue
                curve = row[key][:-1]  # the bins; the last value is the tail
                xs = [(i + 0.5) / len(curve) for i in range(len(curve))]
                points = [(x, y) for x, y in zip(xs, curve) if y is not None]
                name = method + (f" @ {format_length(seq_len)}" if len(lengths) > 1 else "")
                if points:
                    ax.plot(*zip(*points), linestyle=style, marker=".", color=f"C{index % 10}", label=name)
                if row[key][-1] is not None:
                    ax.plot([1.04], [row[key][-1]], marker="*", markersize=10, color=f"C{index % 10}", linestyle="none")
        ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.5)
        ax.set_xlabel("query position (fraction of the prompt); ★ = last 64 rows (the question)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1.08)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("output error by query position (mean over layers and heads)")
    axes[1].set_title("dropped mass by query position")
    return _save(fig, path)


def plot_router_curve(curve: list[dict], path: str | Path, title: str, target: float, threshold: dict | None = None) -> Path:
    """Router training: loss and answer cross-entropy per step (left); Omega per step against its target (right), and
    with `threshold` (training_info["threshold"]) the mean Omega of its prompts before and after the final threshold."""
    if not curve:
        raise ValueError("plot_router_curve: no training steps to plot")
    path = Path(path)
    steps = [h["step"] for h in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    left.plot(steps, [h["loss"] for h in curve], color="C0", linewidth=0.8, label="loss (CE + multiplier term + penalty)")
    left.plot(steps, [h["lm"] for h in curve], color="C1", linewidth=0.8, alpha=0.8, label="answer cross-entropy")
    rms = [h.get("logit_rms") for h in curve]
    if any(r is not None for r in rms):  # curves from before the logit penalty have none
        left.plot(steps, [float("nan") if r is None else r for r in rms], color="C4", linewidth=0.8, linestyle="--",
                  label="RMS centred mode logit")
    losses = [h["loss"] for h in curve] + [h["lm"] for h in curve]
    if min(losses) > 0 and max(losses) > 100 * min(losses):  # a spike would flatten the rest of the curve
        left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("nats (logit: units)")
    left.set_title("loss")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.plot(steps, [100 * h["omega"] for h in curve], color="C2", linewidth=1, label="Omega (argmax routing)")
    right.plot(steps, [100 * h["sparsity"] for h in curve], color="C2", linewidth=0.6, alpha=0.4, linestyle=":",
               label="sampled sparsity (with Gumbel noise)")
    window = max(1, len({h.get("task") for h in curve}))  # one pass over the task families: what the constraint averages
    omegas = [h["omega"] for h in curve]
    running = [100 * sum(omegas[max(0, i - window + 1): i + 1]) / len(omegas[max(0, i - window + 1): i + 1]) for i in range(len(omegas))]
    right.plot(steps, running, color="C0", linewidth=1.6, label=f"Omega, mean of the last {window} steps (the constraint's)")
    right.axhline(100 * target, color="black", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    right.axhspan(100 * (target - 0.05), 100 * (target + 0.05), color="black", alpha=0.07, label="target +-5 points")
    noise_end = next((h["step"] for h in curve if h.get("noise", 1) == 0), None)
    if noise_end is not None:
        right.axvline(noise_end, color="#a0a0a0", linewidth=1, linestyle="-.", label="Gumbel noise off")
    if threshold and steps:
        after = steps[-1] + 1
        right.plot([after, after], [100 * threshold["omega_before"], 100 * threshold["omega"]], color="C3", linewidth=1)
        right.plot([after], [100 * threshold["omega"]], "o", color="C3", markersize=4,
                   label=f"final threshold: {threshold['omega_before']:.1%} -> {threshold['omega']:.1%} ({threshold['prompts']} prompts)")
    right.set_xlabel("step")
    right.set_ylabel("heads not dense (%)")
    right.set_ylim(0, 100)
    right.set_title("model sparsity Omega")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return _save(fig, path)
