"""The lm-eval bridge: any lm-evaluation-harness task on a model whose attention stem has patched.

`run_lm_eval` wraps the already patched model object in lm-eval's `HFLM` (the weights are
not loaded again and the patch stays in place), runs `lm_eval.simple_evaluate`, returns
`{task: {metric: value}}` and hands every per-sample record to a callback.

Resume: lm-eval's request cache (an SQLite file, `use_cache`) stores each answered
request as soon as the model has answered it, so a rerun after an interruption only
computes what is missing. lm-eval keys a cached answer by the request alone (prompt and
generation arguments), not by the model, so one cache file must never serve two
methods: the file also records who wrote it (method and config read off the patched
model, model, tokenizer, max_length, chat template) and a run that does not match is
refused with a TaskError. The caller passes one cache path per method.

lm-eval is optional (`pip install 'stem-cli[lmeval]'`); it is imported only here, only
when a run is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stem_cli.errors import UsageError

INSTALL_HINT = "pip install 'stem-cli[lmeval]'"

# lm-eval lines that say nothing to a stem user: the model instance is passed on purpose.
_NOISE = (
    "`pretrained` model kwarg is not of type",
    "Passed an already-initialized model",
    "--limit SHOULD ONLY BE USED FOR TESTING",
    "model_args not specified",
    "Custom kwargs can be passed",
)


class TaskError(UsageError):
    """An lm-eval task cannot run (not installed, unknown task, data unreachable); the message says what to do."""


def require_lm_eval():
    """The lm_eval module, or a TaskError that says how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        if e.name is None or e.name == "lm_eval":
            raise TaskError(f"lm-eval is not installed: {INSTALL_HINT}") from None
        # lm_eval is there but one of its own imports fails: say which
        raise TaskError(f"lm-eval is installed but cannot be imported ({e}); reinstall it: {INSTALL_HINT}") from e
    except Exception as e:  # e.g. an lm-eval older than the installed transformers
        raise TaskError(f"lm-eval {lm_eval_version()} cannot be imported ({type(e).__name__}: {e}); it may not support "
                        f"this transformers version: pip install -U 'stem-cli[lmeval]'") from e
    return lm_eval


def lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - not installed, or broken metadata: no version to show
        return None


GENERATOR_VERSION = f"lm_eval {lm_eval_version()}"  # what makes an lm-eval task's result: results are keyed by it


# ------------------------------------------------------------------ the request cache


def cache_file(cache_path: str | os.PathLike) -> Path:
    """The SQLite file lm-eval writes for `cache_path` (it appends '_rank{N}.db' to what it is given)."""
    prefix = _cache_prefix(cache_path)
    return Path(f"{prefix}_rank{int(os.environ.get('LOCAL_RANK', '0'))}.db")


def _cache_prefix(cache_path: str | os.PathLike) -> str:
    path = str(cache_path)
    for suffix in (".sqlite3", ".sqlite", ".db"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def cache_identity(model, tokenizer, *, max_length: int | None, apply_chat_template: bool | str = False,
                   extra: Any = None) -> dict[str, Any]:
    """Everything besides the request that decides an answer: who may reuse a cache file."""
    runtime = _runtime_of(model)
    attn = getattr(model.config, "_attn_implementation", None)
    if runtime is not None and attn == runtime.method.attn_implementation:
        method, config = runtime.name, _jsonable(runtime.config)
    else:  # not patched by stem (or switched back by hand): the model's own attention
        method, config = f"unpatched:{attn}", None
    return {
        "method": method,
        "config": config,
        "model": f"{type(model).__name__}:{getattr(model.config, '_name_or_path', '') or ''}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(getattr(model, "dtype", "")),
        "tokenizer": f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}",
        "max_length": max_length,
        "apply_chat_template": apply_chat_template,
        "extra": extra,
    }


def _runtime_of(model):
    from stem_cli.hook import HANDLER_ATTR, attention_modules

    for module in attention_modules(model):
        runtime = getattr(module, HANDLER_ATTR, None)
        if runtime is not None:
            return runtime
    return None


def _jsonable(config) -> Any:
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _claim_cache(path: Path, identity: dict[str, Any]) -> None:
    """Record `identity` in the cache file, or refuse when another identity wrote it."""
    from sqlitedict import SqliteDict

    path.parent.mkdir(parents=True, exist_ok=True)
    with SqliteDict(str(path), tablename="stem_identity", autocommit=True) as table:
        found = table.get("identity")
        if found is None:
            table["identity"] = identity
            table.commit()
        elif found != identity:
            differ = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
            raise TaskError(
                f"the lm-eval cache {path} holds answers for another run ({', '.join(f'{k}: {found.get(k)!r} there, {identity.get(k)!r} now' for k in differ)}).\n"
                "Use one cache path per method and config, or delete the file to start afresh."
            )


# ------------------------------------------------------------------ quiet console


@contextlib.contextmanager
def _quiet(enabled: bool):
    """lm-eval's INFO lines, its progress bars and those of `datasets` off for the run; restored after."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    noise = _NoiseFilter()
    logger.setLevel(max(level, logging.WARNING) if level != logging.NOTSET else logging.WARNING)
    handlers = [logger, *logger.handlers, *logging.getLogger().handlers, logging.lastResort]
    for h in handlers:
        if h is not None:
            h.addFilter(noise)
    patched = _silence_tqdm()
    bars = None
    with contextlib.suppress(Exception):  # datasets missing or its API moved: bars are cosmetic
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        for h in handlers:
            if h is not None:
                h.removeFilter(noise)
        for module, original in patched:
            module.tqdm = original
        if bars:
            import datasets

            datasets.enable_progress_bars()


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("lm_eval"):
            return True
        message = record.getMessage()
        return not any(message.startswith(n) or n in message for n in _NOISE)


def _silence_tqdm() -> list[tuple[Any, Any]]:
    """Every lm_eval module's `tqdm` replaced by one that never draws (some of its bars take no `disable`)."""
    try:
        from tqdm import tqdm as real
    except ImportError:  # pragma: no cover
        return []

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return real(*args, **kwargs)

    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("lm_eval") and module is not None and getattr(module, "tqdm", None) is real:
            patched.append((module, real))
            module.tqdm = silent
    return patched


# ------------------------------------------------------------------ tasks


_task_managers: dict[tuple, Any] = {}


def task_manager(include_path: str | os.PathLike | list | tuple | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager, built once per (include_path, include_defaults): indexing lm-eval's own
    ~14,000 task YAMLs takes 5-40 s; with include_defaults=False only include_path is indexed."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = [str(Path(p).expanduser().resolve()) for p in paths]
    for p in paths:
        if not Path(p).exists():
            raise TaskError(f"lm-eval include path {p} does not exist; pass a folder of lm-eval task YAML files")
    if not paths and not include_defaults:
        raise TaskError("include_defaults=False needs an include_path: no lm-eval task would be known")
    key = (*paths, include_defaults)
    if key not in _task_managers:
        try:
            with _quiet(True):
                _task_managers[key] = TaskManager(include_path=paths or None, include_defaults=include_defaults)
        except Exception as e:
            raise TaskError(f"lm-eval could not index its tasks: {type(e).__name__}: {e}\n"
                            "Check the task YAML files under the include path (lm-eval's task configuration format).") from e
    return _task_managers[key]


def _unknown(e: BaseException, tasks: list[str], manager) -> str:
    """For lm-eval's KeyError (some versions say no more than the name): which asked-for names it does not know."""
    if not isinstance(e, KeyError):
        return ""
    try:
        known = set(manager.all_tasks)
    except Exception:  # noqa: BLE001 - only a nicer message is at stake
        return ""
    unknown = [t for t in tasks if isinstance(t, str) and t not in known and not Path(t).suffix]
    return f" (no lm-eval task, group or tag is named {', '.join(map(repr, unknown))})" if unknown else ""


def _advice(e: BaseException, tasks: list[str]) -> str:
    """One line on what to do about lm-eval's exception `e`."""
    text = f"{type(e).__name__}: {e}".lower()
    if isinstance(e, KeyError) or "not a registered task" in text:
        return ("Check the task name (`lm-eval ls tasks` lists them) or pass include_path (--include-path) with a folder "
                "of your own task YAML files.")
    if isinstance(e, ImportError):
        return "The task needs extra packages: install those named above (lm-eval's task extras, e.g. pip install 'lm_eval[longbench]')."
    if isinstance(e, (ConnectionError, TimeoutError)) or any(
        s in text for s in ("couldn't reach", "offline", "connection", "localentrynotfound", "name or service not known")
    ):
        return ("The task's dataset could not be loaded: it needs Hugging Face hub access or a copy in the local HF cache "
                "(then set HF_DATASETS_OFFLINE=1), or a local task YAML that reads files (dataset_path: json + data_files).")
    if isinstance(e, OSError):
        return "The task's data could not be read: check the paths in its YAML (data_files are relative to the working directory)."
    return f"The message above is lm-eval's, raised while running {', '.join(tasks)}; lm-eval's documentation of the task may help."


# ------------------------------------------------------------------ running


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: float | None,
    seed: int,
    max_length: int | None,
    cache_path: str | os.PathLike | None,
    log_samples_to: Callable[[dict], None] | None,
    batch_size: int = 1,
    include_path: str | os.PathLike | list | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    apply_chat_template: bool | str = False,
    gen_kwargs: dict | None = None,
    bootstrap_iters: int = 1000,
    cache_key: Any = None,
    quiet: bool = True,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the already patched `model`; {task or group: {metric: value}}.

    `limit`: documents per task (None: all). `seed` seeds lm-eval's python/numpy/torch and
    few-shot RNGs. `max_length`: the context lm-eval allows the model (it truncates longer
    prompts from the left); None: from the model's config. `cache_path`: lm-eval's request
    cache (see the module doc; one per method) or None for none. `log_samples_to(record)`
    gets one dict per (document, filter): task, doc_id, prompt, arguments, prediction,
    target, metrics, filter and hashes. `include_path`: folder(s) of task YAML files of
    one's own; `include_defaults=False` leaves lm-eval's own tasks out (much faster to
    index, see task_manager). `cache_key`: anything JSON-able the caller wants in the cache's identity too.

    Metric names drop lm-eval's ",none" filter suffix (other filters keep it: "exact_match,flexible-extract").
    Raises TaskError for lm-eval's own failures (not installed, unknown task, data
    unreachable, a cache written by another run), with lm-eval's message and advice;
    errors raised by the model itself propagate unchanged.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise TaskError("no lm-eval task given")

    use_cache = None
    if cache_path is not None:
        identity = cache_identity(model, tokenizer, max_length=max_length, apply_chat_template=apply_chat_template, extra=cache_key)
        _claim_cache(cache_file(cache_path), identity)
        use_cache = _cache_prefix(cache_path)

    manager = task_manager(include_path, include_defaults)
    with _quiet(quiet):
        lm = _tracking_hflm(HFLM)(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)
        try:
            out = simple_evaluate(
                lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                use_cache=use_cache,
                log_samples=log_samples_to is not None,
                apply_chat_template=apply_chat_template,
                gen_kwargs=gen_kwargs,
                bootstrap_iters=bootstrap_iters,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except Exception as e:
            if getattr(e, "_stem_from_model", False):
                raise  # the model's (or stem's) own failure: not lm-eval's, leave it as it is
            raise TaskError(f"lm-eval failed: {type(e).__name__}: {e}{_unknown(e, tasks, manager)}\n{_advice(e, tasks)}") from e
    if out is None:  # lm-eval returns None on non-zero ranks only
        return {}
    if log_samples_to is not None:
        for task, samples in (out.get("samples") or {}).items():
            for sample in samples:
                log_samples_to(sample_record(task, sample))
    return collect_metrics(out.get("results") or {})


def _tracking_hflm(HFLM):
    """HFLM that marks exceptions raised while the model answers, so they are never taken for lm-eval's."""

    class StemHFLM(HFLM):
        stem_requests = 0

        def _answer(self, name, requests, **kwargs):
            self.stem_requests += len(requests)
            try:
                return getattr(super(), name)(requests, **kwargs)
            except Exception as e:
                e._stem_from_model = True
                raise

        def loglikelihood(self, requests, **kwargs):
            return self._answer("loglikelihood", requests, **kwargs)

        def loglikelihood_rolling(self, requests, **kwargs):
            return self._answer("loglikelihood_rolling", requests, **kwargs)

        def generate_until(self, requests, **kwargs):
            return self._answer("generate_until", requests, **kwargs)

    StemHFLM.__name__ = StemHFLM.__qualname__ = "StemHFLM"
    return StemHFLM


def collect_metrics(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """lm-eval's results -> {task: {metric: value}}: numbers only, ",none" dropped, bookkeeping keys left out."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if key in ("alias", "name", "sample_len", "samples") or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue  # "N/A" standard errors
            metrics[key.removesuffix(",none")] = float(value)
        out[task] = metrics
    return out


def sample_record(task: str, sample: dict) -> dict[str, Any]:
    """One lm-eval sample as a JSON-able record; the prompt appears once (arguments keep the rest of each request)."""
    args = [list(a) if isinstance(a, (list, tuple)) else [a] for a in sample.get("arguments") or []]
    prompt = args[0][0] if args and args[0] else None
    filtered = sample.get("filtered_resps")
    prediction = filtered[0] if isinstance(filtered, list) and len(filtered) == 1 else filtered
    record = {
        "task": task,
        "doc_id": sample.get("doc_id"),
        "prompt": prompt,
        "arguments": [a[1:] for a in args],
        "prediction": prediction,
        "target": sample.get("target"),
        "metrics": {m: sample.get(m) for m in sample.get("metrics") or []},
        "filter": sample.get("filter"),
    }
    for key in ("doc_hash", "prompt_hash", "target_hash"):
        if key in sample:
            record[key] = sample[key]
    return json.loads(json.dumps(record, default=str))
