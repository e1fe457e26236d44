"""Solved budget knobs, stored like results and reused; solving shown per method as it goes.

Solving a method's knob for a target BUD costs two dense pre-fills per probe prompt at
every length: minutes per method on a CPU. A solved knob is appended (and fsynced) to
OUTPUT/budgets-MODEL.jsonl as soon as it is found, keyed by what decides it: the
weights' content, dtype, method and its config before solving, length, the target, the
probe prompts' token ids (a hash: they carry the tasks, seed, generator versions and
prompt format), and the solver's version and grid. A later run with the same settings
solves nothing, and Ctrl-C during solving keeps the knobs already found.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from stem_cli.runs import budget as solver
from stem_cli.runs import keys
from stem_cli.runs.store import ResultStore, config_key


class Knobs:
    """Solved knobs of one model: `solve` takes a stored one when its key is there, else solves and stores it.
    `path` None keeps nothing on disk; `reuse` False solves again (and stores the new knob)."""

    def __init__(self, path: Path | None, weights: str, dtype: str, *, reuse: bool = True):
        self.store = ResultStore(path) if path is not None else None
        self.weights, self.dtype, self.reuse = weights, dtype, reuse
        self.solved = 0
        self.reused = 0

    @property
    def path(self) -> Path | None:
        return self.store.path if self.store is not None else None

    def key_parts(self, method: str, config, seq_len: int, target: float, probes: list) -> dict[str, Any]:
        return {"weights": self.weights, "dtype": self.dtype, "method": method, "config": config_key(config), "seq_len": seq_len,
                "target": target, "probes": keys.ids_digest([p.tolist() for p in probes]),
                "solver": {"version": solver.SOLVER_VERSION, "grid": solver.GRID, "tolerance": solver.TOLERANCE},
                **({"files": files} if (files := keys.config_files(config)) else {})}

    def solve(self, model, method: str, config, seq_len: int, target: float, probes: list,
              progress: solver.Progress | None = None) -> tuple[Any, dict, bool]:
        """(config with the knob set, the knob's info, whether it was stored already)."""
        from stem_cli.config import replace

        parts = self.key_parts(method, config, seq_len, target, probes)
        key = keys.key_of(parts)
        if self.reuse and self.store is not None and key in self.store:
            info = self.store.get(key)["knob"]
            self.reused += 1
            return replace(config, {info["name"]: info["value"]}, method), info, True
        solved, info = solver.solve_budget(model, method, config, probes, target, progress=progress)
        if self.store is not None:
            self.store.add({"key": key, "key_parts": parts, "method": method, "seq_len": seq_len, "target": target, "knob": info})
        self.solved += 1
        return solved, info, False


@contextmanager
def solving_display(console) -> Iterator[Callable[[str], solver.Progress]]:
    """`for_method(label)` -> a solver progress callback. On a terminal, a bar per method with the values being tried;
    elsewhere (a log file, a pipe) a plain line per step, since a live bar shows nothing there."""
    from rich.markup import escape

    if not console.is_terminal:
        def for_method(label: str) -> solver.Progress:
            def line(text: str, done: int, total: int) -> None:
                console.print(f"[dim]{escape(f'solving {label}: {text} [{done}/{total}]')}[/]", highlight=False)

            return line

        yield for_method
        return

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bars:
        def for_method(label: str) -> solver.Progress:
            bar = None

            def update(text: str, done: int, total: int) -> None:
                nonlocal bar
                description = f"solving {escape(label)}: {escape(text)}"
                if bar is None:
                    bar = bars.add_task(description, total=total)
                bars.update(bar, description=description, completed=done, total=total)

            return update

        yield for_method
