"""The run: jobs x tasks x samples on one loaded model, every result in the store as it is made; summaries.

A job is one method at one length with the config it runs with (a budget-solved one
under an equal-budget comparison). Samples are built once per (task, length) and run
samples-outer, so every method sees a prompt while it is hot in cache. Results go to a
`ResultStore` (stem_cli/runs/store.py) as soon as each is scored, keyed by what makes
them (stem_cli/runs/keys.py); `summarize` and `averages` turn records into the rows the
reports render.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import stem_cli
from stem_cli.runs import keys
from stem_cli.runs.store import ResultStore, config_dict, config_key
from stem_cli.runs.task_names import TaskRef, measure_module
from stem_cli.tasks.harness import TaskError


@dataclass
class Job:
    """One method at one length: its name and the config it runs with (possibly budget-solved)."""

    method: str
    config: Any
    seq_len: int
    knob: dict | None = None  # {"name", "value", "target", "probe_bud"} when solved for a budget


@dataclass
class EvalSettings:
    model_id: str  # loaded.source: where the weights came from
    dtype: str
    seed: int
    limit: int
    use_chat_template: bool | None = None
    data_dir: Path | None = None
    max_new_tokens: int | None = None  # overrides the task's
    include_path: Path | None = None  # a folder of extra lm-eval task YAMLs
    batch_size: int = 1  # generation tasks: samples decoded together (each pre-fill stays alone; runner.Runner._run_batched)


class Runner:
    """Runs jobs x tasks x samples on one loaded model, writing to a ResultStore.

    `reuse`: a result whose key is already in the store is taken from it (resume,
    compare's cache); otherwise it is computed and appended.
    """

    def __init__(self, loaded, store: ResultStore, settings: EvalSettings, *, reuse: bool = True,
                 progress: Callable[[str, int, int], None] | None = None):
        self.loaded = loaded
        self.store = store
        self.settings = settings
        self.reuse = reuse
        self.progress = progress or (lambda what, done, total: None)
        # Which (task, length, sample) this process runs; sample None: an lm-eval task. All, except on a rank of a
        # data-parallel run (stem_cli/runs/distributed.py assigns each rank its share).
        self.mine: Callable[[TaskRef, int, Any], bool] = lambda ref, seq_len, sample: True
        self._samples: dict[tuple[str, int], list] = {}
        self.identity = keys.weights_identity(loaded)  # {"weights", "how"}: the weights by content, never by path
        self._tasks: dict[str, dict] = {}
        self.computed = 0
        self.reused = 0
        self.older = 0  # stored under an older generator version (or the old key format): recomputed

    # ---- samples

    def samples(self, ref: TaskRef, seq_len: int) -> list:
        cache_key = (ref.name, seq_len)
        if cache_key not in self._samples:
            try:
                self._samples[cache_key] = self._build(ref, seq_len)
            except ValueError as e:  # a generator's "too short" / bad input: the user's to fix
                raise TaskError(f"{ref.name} at {seq_len} tokens: {e}") from None
        return self._samples[cache_key]

    def _build(self, ref: TaskRef, seq_len: int) -> list:
        s, tok = self.settings, self.loaded.tokenizer
        if ref.name.startswith("ruler/"):
            from stem_cli.tasks import ruler

            return ruler.build_samples(ref.sub, tok, seq_len, seed=s.seed, limit=s.limit, use_chat_template=s.use_chat_template)
        if ref.name.startswith("longbench/"):
            from stem_cli.tasks import longbench

            return longbench.build_samples(ref.sub, tok, seq_len, data_dir=s.data_dir, limit=s.limit, use_chat_template=s.use_chat_template)
        return measure_module(ref).build_samples(tok, seq_len, seed=s.seed, limit=s.limit, use_chat_template=s.use_chat_template)

    # ---- keys

    def task_components(self, ref: TaskRef) -> dict:
        """What every result of this task shares in the run: generator version, seed, prompt format, data file."""
        if ref.name not in self._tasks:
            s = self.settings
            parts = keys.task_components(ref.name, tokenizer=self.loaded.tokenizer, seed=s.seed, chat_template=s.use_chat_template,
                                         data_dir=s.data_dir)
            if ref.kind == "lm-eval":  # an aggregate over the first `limit` documents, of tasks perhaps defined in YAMLs
                parts.update(limit=s.limit, include=keys.folder_digest(s.include_path))
            self._tasks[ref.name] = parts
        return self._tasks[ref.name]

    def key_parts(self, job: Job, ref: TaskRef, sample=None) -> dict:
        """Everything that makes this result (see stem_cli/runs/keys.py); `sample` None: lm-eval's aggregate."""
        parts = {"weights": self.identity["weights"], "dtype": self.settings.dtype, "method": job.method,
                 "config": config_key(job.config), "task": ref.name, "seq_len": job.seq_len, **self.task_components(ref)}
        if files := keys.config_files(job.config):  # a head map / router by content, not only by path
            parts["files"] = files
        if sample is None:
            return {**parts, "sample": "aggregate"}
        parts.update(sample=sample.id, prompt=keys.ids_digest(sample.input_ids))
        if ref.kind == "generate":
            parts["max_new_tokens"] = self.settings.max_new_tokens or sample.max_new_tokens
        return parts

    def key(self, job: Job, ref: TaskRef, sample=None) -> str:
        return keys.key_of(self.key_parts(job, ref, sample))

    def _older(self, parts: dict) -> bool:
        """A stored record of this result from an older generator (or keyed the old way): recomputed, and counted."""
        s = self.settings
        legacy = {"model": s.model_id, "method": parts["method"], "task": parts["task"], "seq_len": parts["seq_len"], "seed": s.seed,
                  "sample": parts["sample"], "dtype": s.dtype, "config": parts["config"]}
        return self.store.older(parts, legacy)

    def census(self, jobs: list[Job], refs: list[TaskRef]) -> dict[str, int]:
        """Before running: how many results of the built-in tasks are stored, and how many are stored from an older generator."""
        stored = older = 0
        for job in jobs:
            for ref in refs:
                for sample in [None] if ref.kind == "lm-eval" else self.samples(ref, job.seq_len):
                    parts = self.key_parts(job, ref, sample)
                    if keys.key_of(parts) in self.store:
                        stored += ref.kind != "lm-eval"
                    elif self._older(parts):
                        older += 1
        return {"stored": stored, "older": older}

    # ---- running

    def run(self, jobs: list[Job], refs: list[TaskRef]) -> list[dict]:
        """Every (job, task, sample) result, in a fixed order; computed ones are in the store as they finish."""
        results: list[dict] = []
        lengths = list(dict.fromkeys(j.seq_len for j in jobs))
        for seq_len in lengths:
            at_length = [j for j in jobs if j.seq_len == seq_len]
            for ref in refs:
                if ref.kind == "lm-eval":
                    if self.mine(ref, seq_len, None):
                        results += self._run_lm_eval(at_length, ref)
                    continue
                samples = [s for s in self.samples(ref, seq_len) if self.mine(ref, seq_len, s)]
                if not samples:  # all of them another rank's
                    continue
                total, done = len(samples) * len(at_length), 0
                what = f"{ref.name} @ {_length(seq_len)}"
                self.progress(what, 0, total)
                if ref.kind == "generate" and self.settings.batch_size > 1:
                    results += self._run_batched(at_length, ref, samples, what, total)
                    continue
                for sample in samples:  # samples outer: every method sees a prompt while it is hot in cache
                    for job in at_length:
                        results.append(self._one(job, ref, sample))
                        done += 1
                        self.progress(what, done, total)
        return results

    def _one(self, job: Job, ref: TaskRef, sample) -> dict:
        record, stored = self._stored_or_new(job, ref, sample)
        if stored:
            return record
        runtime = stem_cli.apply(self.loaded.model, job.method, job.config)
        runtime.recorder.reset()
        if ref.kind == "measure":
            record.update(measure_module(ref).measure(self.loaded.model, job.method, job.config, sample))
        else:
            record.update(self._generate(runtime, sample))
        return self._keep(record, job)

    def _stored_or_new(self, job: Job, ref: TaskRef, sample) -> tuple[dict, bool]:
        """(the stored record of this result, True), or (the head of a new one, False)."""
        parts = self.key_parts(job, ref, sample)
        key = keys.key_of(parts)
        if self.reuse and key in self.store:
            self.reused += 1
            return self.store.get(key), True
        self.older += self._older(parts)
        record = {
            "key": key, "method": job.method, "task": ref.name, "seq_len": job.seq_len, "seed": self.settings.seed,
            "sample": sample.id, "model": self.settings.model_id, "dtype": self.settings.dtype, "key_parts": parts,
        }
        if job.knob:
            record["knob"] = job.knob
        return record, False

    def _keep(self, record: dict, job: Job) -> dict:
        record["config"] = config_dict(job.config)
        self.store.add(record)
        self.computed += 1
        return record

    def _generate(self, runtime, sample) -> dict:
        from stem_cli.generation import greedy, stop_ids_of

        model, tok = self.loaded.model, self.loaded.tokenizer
        device = next(model.parameters()).device
        ids = torch.tensor([sample.input_ids], device=device)
        budget = self.settings.max_new_tokens or sample.max_new_tokens
        decode = getattr(runtime, "decode", None)
        if decode is not None:
            decode.reset()
        gen = greedy(model, ids, max_new_tokens=budget, stop_ids=stop_ids_of(model, tok))
        return {**self._answer(sample, gen.new_tokens, gen.prefill_seconds, gen.decode_seconds, runtime.recorder.bud),
                **_runtime_stats(runtime)}

    def _answer(self, sample, new_tokens: list[int], prefill_s: float, decode_s: float, bud) -> dict:
        from stem_cli.tasks.base import score

        prediction = self.loaded.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        return {
            "prediction": prediction,
            "references": sample.references,
            "metric": sample.metric,
            "score": score(sample.metric, prediction, sample.references, sample.meta),
            "bud": bud,
            "prompt_tokens": len(sample.input_ids),
            "new_tokens": len(new_tokens),
            "prefill_s": prefill_s,
            "decode_s": decode_s,
        }

    def _run_batched(self, jobs: list[Job], ref: TaskRef, samples: list, what: str, total: int) -> list[dict]:
        """A generation task with `batch_size` samples decoded together, in the samples-outer order of `run`.

        Each sample is pre-filled alone, so its selection and BUD are exactly the unbatched ones
        (the block grid starts at its first token); the filled caches are stacked, left-padded, and
        decoded as one batch (stem_cli/generation.py greedy_batch), which is where a small model's
        time goes. A method with a decode method keeps per-sample decode state: it runs one
        sample at a time (evaluation.run_tasks says so before the run).
        """
        from stem_cli.generation import greedy_batch, prefill, stop_ids_of
        from stem_cli.registry import split_spec

        model, tok = self.loaded.model, self.loaded.tokenizer
        device = next(model.parameters()).device
        stop = stop_ids_of(model, tok)
        made: dict[tuple[int, int], dict] = {}
        done = 0
        size = self.settings.batch_size
        for start in range(0, len(samples), size):
            chunk = [(i, samples[i]) for i in range(start, min(start + size, len(samples)))]
            for j, job in enumerate(jobs):
                if split_spec(job.method)[1] is not None:
                    for i, sample in chunk:
                        made[i, j] = self._one(job, ref, sample)
                    done += len(chunk)
                    self.progress(what, done, total)
                    continue
                pending = []
                for i, sample in chunk:
                    record, stored = self._stored_or_new(job, ref, sample)
                    if stored:
                        made[i, j] = record
                    else:
                        pending.append((i, sample, record))
                if pending:
                    runtime = stem_cli.apply(model, job.method, job.config)
                    filled, heads = [], []
                    for i, sample, record in pending:
                        runtime.recorder.reset()
                        filled.append(prefill(model, torch.tensor([sample.input_ids], device=device)))
                        heads.append((runtime.recorder.bud, _runtime_stats(runtime)))
                    budgets = [self.settings.max_new_tokens or sample.max_new_tokens for _, sample, _ in pending]
                    tokens, decode_s = greedy_batch(model, filled, max_new_tokens=budgets, stop_ids=stop)
                    for (i, sample, record), new, pre, (bud, stats) in zip(pending, tokens, filled, heads):
                        # decode time is the batch's, shared equally by its rows
                        record.update(self._answer(sample, new, pre.seconds, decode_s / len(pending), bud), **stats,
                                      decode_batch=len(pending))
                        made[i, j] = self._keep(record, job)
                    del filled
                done += len(chunk)
                self.progress(what, done, total)
        return [made[i, j] for i in range(len(samples)) for j in range(len(jobs))]

    def _run_lm_eval(self, jobs: list[Job], ref: TaskRef) -> list[dict]:
        from stem_cli.tasks import harness

        results = []
        for job in jobs:
            runtime = stem_cli.apply(self.loaded.model, job.method, job.config)
            parts = self.key_parts(job, ref)
            key = keys.key_of(parts)
            if self.reuse and key in self.store:
                self.reused += 1
                results.append(self.store.get(key))
                continue
            self.older += self._older(parts)
            runtime.recorder.reset()
            cache = self.store.path.parent / "lm-eval-cache" / f"{key}.sqlite"
            cache.parent.mkdir(parents=True, exist_ok=True)
            self.progress(f"{ref.name} @ {_length(job.seq_len)} ({job.method}, lm-eval)", 0, 1)
            samples_path = self.store.path.with_name(f"{self.store.path.stem}.lm-eval-{key}.jsonl")
            with open(samples_path, "w") as f:  # lm-eval hands samples over when its run is complete
                def log(record: dict, f=f):
                    f.write(json.dumps({**record, "method": job.method}, default=str) + "\n")
                    f.flush()

                out = harness.run_lm_eval(self.loaded.model, self.loaded.tokenizer, [ref.sub], limit=self.settings.limit,
                                          seed=self.settings.seed, max_length=job.seq_len, cache_path=str(cache), log_samples_to=log,
                                          include_path=self.settings.include_path)
            metrics = out.get(ref.sub) or next(iter(out.values()), {})
            headline = _headline_metric(metrics)
            record = {
                "key": key, "method": job.method, "task": ref.name, "seq_len": job.seq_len, "seed": self.settings.seed,
                "sample": "aggregate", "model": self.settings.model_id, "dtype": self.settings.dtype, "key_parts": parts,
                "score": headline[1] if headline else None, "metric": headline[0] if headline else None,
                "lm_eval": out, "bud": runtime.recorder.bud, "samples_file": samples_path.name, "config": config_dict(job.config),
            }
            self.store.add(record)
            self.computed += 1
            self.progress(f"{ref.name} @ {_length(job.seq_len)} ({job.method}, lm-eval)", 1, 1)
            results.append(record)
        return results


def _headline_metric(metrics: dict) -> tuple[str, float] | None:
    """lm-eval's first numeric metric that is not a standard error, scaled to [0, 1] as it reports it."""
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and "stderr" not in name and not isinstance(value, bool):
            return name, float(value)
    return None


def _runtime_stats(runtime) -> dict[str, Any]:
    """Per-sample statistics beyond BUD that a method's runtime exposes (decode delta, head modes)."""
    stats = {}
    decode = getattr(runtime, "decode", None)
    if decode is not None and hasattr(decode, "stats"):
        stats["decode"] = decode.stats()
    elastic = getattr(runtime.recorder, "elastic", None)  # Elastic Attention's head modes
    if elastic is not None and elastic.omega is not None:
        stats["omega"] = elastic.omega
    return stats


def _length(n: int) -> str:
    from stem_cli.units import format_length

    return format_length(n)


# ------------------------------------------------------------------ summary


NOT_ACCURACY = ("fidelity", "ppl")  # measure tasks: their rows carry their own metrics, no accuracy interval


def _points(records: list[dict]) -> dict[tuple, dict[str, float]]:
    """(task, length, method) -> {sample id: score in points (0..100)} of the accuracy records."""
    out: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["task"] not in NOT_ACCURACY and r.get("score") is not None:
            out.setdefault((r["task"], r["seq_len"], r["method"]), {})[str(r["sample"])] = 100.0 * r["score"]
    return out


def summarize(records: list[dict]) -> list[dict]:
    """One row per (task, length, method): mean score with n and its 95% interval (ci_low, ci_high, ci_method;
    stem_cli/report/stats.py), mean BUD, pre-fill tokens/s."""
    from stem_cli.report.stats import mean_interval

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["seq_len"], r["method"]), []).append(r)
    rows = []
    for (task, seq_len, method), rs in groups.items():
        row: dict[str, Any] = {"task": task, "seq_len": seq_len, "method": method, "n": len(rs)}
        if task in ("fidelity", "ppl"):
            module = importlib.import_module(f"stem_cli.tasks.{task}")
            row.update(module.aggregate(rs))
            row["higher_is_better"] = module.HIGHER_IS_BETTER
        else:
            scores = [r["score"] for r in rs if r.get("score") is not None]
            row["score"] = sum(scores) / len(scores) if scores else None
            row["higher_is_better"] = True
            if scores:
                ci = mean_interval([100.0 * x for x in scores])
                row.update(n=len(scores), ci_low=ci.low / 100, ci_high=ci.high / 100, ci_method=ci.method)
        buds = [r["bud"] for r in rs if r.get("bud") is not None]
        row["bud"] = sum(buds) / len(buds) if buds else None
        tokens = sum(r.get("prompt_tokens", 0) for r in rs)
        seconds = sum(r.get("prefill_s", 0.0) for r in rs)
        row["prefill_tokens_per_s"] = tokens / seconds if seconds else None
        knobs = [r["knob"] for r in rs if r.get("knob")]
        if knobs:
            row["knob"] = knobs[0]
        for name in ("omega",):
            values = [r[name] for r in rs if r.get(name) is not None]
            if values:
                row[name] = sum(values) / len(values)
        decode = [r["decode"] for r in rs if isinstance(r.get("decode"), dict)]
        for key in ("delta_mean", "delta_max", "reanchor_fraction", "kept_fraction"):  # a decode method's statistics
            values = [d[key] for d in decode if d.get(key) is not None]
            if values:
                row[f"decode_{key}"] = max(values) if key == "delta_max" else sum(values) / len(values)
        rows.append(row)
    return rows


def averages(rows: list[dict], records: list[dict] | None = None, *, baseline: str = "dense",
             margin: float | None = None) -> dict[tuple[str, int | None], dict]:
    """Per (method, length) and per method over all lengths: mean accuracy over tasks (equal weights), mean BUD,
    tokens/s. With the run's `records`: the average's n and 95% interval, and against `baseline` the paired delta
    (same samples) with its interval and the verdict at `margin` points (stem_cli/report/stats.py)."""
    from stem_cli.report import stats

    margin = stats.MARGIN if margin is None else margin
    points = _points(records) if records is not None else {}
    out: dict[tuple[str, int | None], dict] = {}
    acc = [r for r in rows if r["task"] not in NOT_ACCURACY and r.get("score") is not None]
    for method in dict.fromkeys(r["method"] for r in rows):
        for seq_len in [*dict.fromkeys(r["seq_len"] for r in rows), None]:
            rs = [r for r in acc if r["method"] == method and (seq_len is None or r["seq_len"] == seq_len)]
            if not rs:
                continue
            buds = [r["bud"] for r in rs if r.get("bud") is not None]
            tps = [r["prefill_tokens_per_s"] for r in rs if r.get("prefill_tokens_per_s")]
            avg = out[(method, seq_len)] = {
                "score": sum(r["score"] for r in rs) / len(rs),
                "bud": sum(buds) / len(buds) if buds else None,
                "prefill_tokens_per_s": sum(tps) / len(tps) if tps else None,
                "tasks": len(rs),
            }
            for key in ("omega", "decode_delta_mean", "decode_reanchor_fraction"):
                values = [r[key] for r in rs if r.get(key) is not None]
                if values:
                    avg[key] = sum(values) / len(values)
            strata = [(r["task"], r["seq_len"]) for r in rs]  # a task at a length is one stratum, weighted equally
            mine = {s: points.get((*s, method), {}) for s in strata}
            if not any(mine.values()):
                continue
            ci = stats.task_average({s: list(v.values()) for s, v in mine.items()})
            avg.update(n=ci.n, ci_low=ci.low / 100, ci_high=ci.high / 100, ci_method=ci.method)
            if method == baseline:
                continue
            theirs = {s: points.get((*s, baseline), {}) for s in strata}
            common = {s: sorted(set(mine[s]) & set(theirs[s])) for s in strata}
            delta = stats.paired_task_average({s: [mine[s][k] for k in ids] for s, ids in common.items() if ids},
                                              {s: [theirs[s][k] for k in ids] for s, ids in common.items() if ids})
            kind, text = stats.verdict(delta, margin)
            avg.update(delta=None if delta.n == 0 else delta.mean / 100, delta_n=delta.n,
                       delta_ci_low=None if delta.n == 0 else delta.low / 100,
                       delta_ci_high=None if delta.n == 0 else delta.high / 100, verdict=text, verdict_kind=kind,
                       margin=margin)
    return out
