"""Several processes on one run: ranks from the launcher, samples split by length, a shard per rank, one merged store.

Launchers set RANK, WORLD_SIZE and LOCAL_RANK (torchrun, `accelerate launch`, or the
`--num-processes N` shortcut, which starts torchrun); no variables means one process.
Each rank joins torch.distributed (gloo on the CPU, nccl on CUDA, rank r on cuda:LOCAL_RANK).

Data parallel (the default with several processes): the planned (task, length, sample)
units still to compute are dealt to ranks by `split`, heaviest prompt first to the
least-loaded rank, so the split depends on nothing but that list and the world size and
every rank computes the same one. All methods of a sample run on one rank (the prompt
stays hot). A rank appends each result, fsynced, to its own shard
RESULTS.rank{r}-of-{N}.jsonl beside the results file: no file is shared while ranks
write, and a rank that dies loses at most the line it was writing. When every rank is
done, rank 0 folds the shards into the keyed store (`fold_shards`: keys make it
idempotent, so folding twice or after a crash adds nothing twice) and reads the whole
run back from it, so its tables are those of one process. Every run first folds the
shards it finds (any process count's), which is how `--resume` continues across ranks
and across a change in the number of processes. Work that must happen once (budget
solving) runs on rank 0 and is broadcast (`from_primary`).

Tensor parallel (`--tp N`, N = the world size): every rank runs every sample on its
shard of the heads; results are identical on every rank and the recorder sums BUD
over the shards (stem_cli.integration.BudgetRecorder.tp_group).
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stem_cli.errors import UsageError

# A collective waits this long for the slowest rank (budget solving on rank 0, a long last sample) before failing.
TIMEOUT_S = float(os.environ.get("STEM_DIST_TIMEOUT_S", 6 * 3600))
# Test hook: "R:K" makes rank R raise after K new results, as a rank that dies mid-run.
FAIL_HOOK = "STEM_TEST_RANK_FAILS"


@dataclass(frozen=True)
class World:
    """This process's place in a run: rank of size, and its GPU index on this node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    tp: int = 1  # tensor-parallel degree: 1 = data parallel (each rank its own samples), size = heads sharded over every rank

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def data_parallel(self) -> bool:
        return self.size > 1 and self.tp == 1

    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"


def world_from_env(environ=None, tp: int = 1) -> World:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK, checked; one process when they are unset."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
        text = environ.get(name)
        try:
            values[name] = default if text in (None, "") else int(text)
        except ValueError:
            raise UsageError(f"{name}={text!r} in the environment is not an integer (set by torchrun or accelerate launch)") from None
    rank, size = values["RANK"], values["WORLD_SIZE"]
    local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
    if size < 1 or not 0 <= rank < size:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={size} in the environment are inconsistent: need 0 <= RANK < WORLD_SIZE")
    if tp < 1:
        raise UsageError(f"--tp {tp} is not allowed: use 1 (no tensor parallelism) or the number of processes")
    if tp > 1 and tp != size:
        raise UsageError(f"--tp {tp} needs exactly {tp} processes (torchrun --nproc-per-node {tp}, or --num-processes {tp}); "
                         f"this run has {size}. Tensor and data parallelism together are not supported")
    return World(rank, size, local, tp)


def start(world: World, device):
    """Join the process group (gloo on the CPU, nccl on CUDA) and return this rank's device: cuda:LOCAL_RANK on a GPU."""
    import torch

    if not world.parallel:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"--device {device} with {world.size} processes would put every rank on one GPU: "
                             "use --device cuda (each rank takes cuda:LOCAL_RANK)")
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"{world.label()} has LOCAL_RANK {world.local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                             "start at most one process per GPU")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return device


def from_primary(world: World, make: Callable[[], Any]) -> Any:
    """`make()` on rank 0 only, its value (or its error) given to every rank: work that must happen once."""
    if not world.parallel:
        return make()
    import torch.distributed as dist

    box: list = [None]
    if world.primary:
        try:
            box[0] = ("ok", make())
        except BaseException as e:
            box[0] = ("error", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":  # rank 0 reports it; the others leave quietly with the same outcome
        raise FollowerExit(2 if value.startswith(("UsageError", "ModelError", "ConfigError", "TaskError")) else 1)
    return value


def gather(world: World, value: Any) -> list:
    """Every rank's `value`, in rank order (also a barrier)."""
    if not world.parallel:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world.size
    dist.all_gather_object(out, value)
    return out


class FollowerExit(SystemExit):
    """A rank other than 0 leaves with rank 0's outcome; rank 0 says what happened."""


class RankFailed(RuntimeError):
    """A rank's run raised: names the rank, keeps every rank's results in their shards."""

    def __init__(self, world: World, computed: int, shard: Path, error: BaseException):
        super().__init__(f"{world.label()} failed after {computed} new result(s): {type(error).__name__}: {error}. Its results are "
                         f"in {shard}, the other ranks' in their shards beside it; run the same command with --resume "
                         "(any number of processes) to continue from all of them")


# ------------------------------------------------------------------ splitting the work


def split(weights: list[int], size: int) -> list[int]:
    """The rank of each unit: heaviest first (ties by position), each to the least-loaded rank (ties: lowest rank).

    Greedy longest-processing-time: the heaviest rank ends at most one unit above the
    mean load. Depends only on the weights and `size`, so every rank computes the same."""
    load = [0] * size
    owner = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += weights[i]
    return owner


def assign(runner, jobs: list, refs: list, world: World) -> tuple[Callable, dict[int, int]]:
    """(runner.mine for this rank, results each rank will compute). A unit is one (task, length, sample) with every
    job at that length whose result is not stored; weighted by prompt tokens x those jobs."""
    from stem_cli.runs import keys

    units, weights, pending = [], [], []
    for seq_len in dict.fromkeys(j.seq_len for j in jobs):
        at_length = [j for j in jobs if j.seq_len == seq_len]
        for ref in refs:
            if ref.kind == "lm-eval":
                continue
            for sample in runner.samples(ref, seq_len):
                todo = sum(not (runner.reuse and keys.key_of(runner.key_parts(j, ref, sample)) in runner.store) for j in at_length)
                if todo:
                    units.append((ref.name, seq_len, str(sample.id)))
                    weights.append(len(sample.input_ids) * todo)
                    pending.append(todo)
    owner = split(weights, world.size)
    mine = {u for u, r in zip(units, owner) if r == world.rank}
    per_rank = {r: 0 for r in range(world.size)}
    for r, todo in zip(owner, pending):
        per_rank[r] += todo

    def owns(ref, seq_len: int, sample) -> bool:
        if sample is None:  # an lm-eval task: rank 0 (see lm_eval_notice)
            return world.primary
        return (ref.name, seq_len, str(sample.id)) in mine

    return owns, per_rank


def lm_eval_notice(refs: list, world: World) -> str | None:
    names = [r.name for r in refs if r.kind == "lm-eval"]
    if not names or not world.data_parallel:
        return None
    return (f"notice: lm-eval task(s) {', '.join(names)} run on rank 0 only, the other ranks wait: stem hands lm-eval the "
            "already patched model, and lm-eval's data-parallel path (accelerate) needs to load the model itself")


# ------------------------------------------------------------------ shards


def shard_path(store_path: Path, world: World) -> Path:
    return store_path.with_name(f"{store_path.stem}.rank{world.rank}-of-{world.size}.jsonl")


def shard_paths(store_path: Path) -> list[Path]:
    """Every shard beside the results file, whatever process count wrote it (rank order within a count)."""
    import re

    pattern = re.compile(re.escape(store_path.stem) + r"\.rank(\d+)-of-(\d+)\.jsonl$")
    found = [(int(m.group(2)), int(m.group(1)), p) for p in store_path.parent.glob(f"{store_path.stem}.rank*-of-*.jsonl")
             if (m := pattern.match(p.name))]
    return [p for _, _, p in sorted(found)]


def fold_shards(store) -> int:
    """Append every shard's records whose key the store lacks, then remove the shard; the number added.
    Idempotent (keys): a fold cut short leaves its shard, and the next fold adds only what is still missing."""
    from stem_cli.runs.store import ResultStore

    added = 0
    for path in shard_paths(store.path):
        for key, record in ResultStore(path).records.items():  # a torn last line (a rank killed mid-write) is dropped
            if key not in store:
                store.add(record)
                added += 1
        path.unlink()
    return added


def shard_lines(paths: list[Path]) -> int:
    """Complete lines written so far to these shards (the total progress of the ranks)."""
    total = 0
    for p in paths:
        try:
            total += p.read_bytes().count(b"\n")
        except FileNotFoundError:
            pass
    return total


# ------------------------------------------------------------------ progress


def rank_progress(world: World, runner, progress: Callable[[str, int, int], None]) -> Callable[[str, int, int], None]:
    """Rank 0: its own bars. Other ranks: one plain line per result on stderr (several live bars would garble a terminal).
    Carries the test hook FAIL_HOOK."""
    hook = os.environ.get(FAIL_HOOK, "")
    fail_rank, _, fail_after = hook.partition(":")

    def update(what: str, done: int, total: int) -> None:
        if world.primary:
            progress(f"rank 0: {what}", done, total)
        elif done:
            print(f"{world.label()}: {what} {done}/{total}", file=sys.stderr, flush=True)
        if hook and int(fail_rank) == world.rank and runner.computed >= int(fail_after):
            raise RuntimeError(f"{FAIL_HOOK}={hook}: rank {world.rank} stops after {runner.computed} new results (test hook)")

    return update


class TotalBar:
    """Rank 0's bar over all ranks, advanced by a thread that counts the lines in every rank's shard (also while
    rank 0 waits for the others in a collective, which releases the GIL)."""

    def __init__(self, progress: Callable[[str, int, int], None], paths: list[Path], total: int, every_s: float = 0.5):
        self.progress, self.paths, self.total, self.every_s = progress, paths, total, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.progress("all ranks", min(shard_lines(self.paths), self.total), self.total)
            if self._stop.wait(self.every_s):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.progress("all ranks", self.total, self.total)


# ------------------------------------------------------------------ the --num-processes shortcut


def launch_command(processes: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs `stem ARGV` (without --num-processes) as `processes` ranks on this machine;
    --standalone picks a free rendezvous port, so two runs on one machine do not collide."""
    args, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            args.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "stem_cli", *args]


def relaunch(processes: int, argv: list[str]) -> int | None:
    """Start `processes` ranks through torchrun and wait (their exit code), or None when this process runs the work itself:
    one process asked for, or already a rank of a launcher with that many processes."""
    import subprocess

    launched = os.environ.get("WORLD_SIZE")
    if launched:
        if int(launched) != processes and processes != 1:
            raise UsageError(f"--num-processes {processes} inside a launcher that started WORLD_SIZE={launched} processes: "
                             "drop --num-processes (the launcher decides)")
        return None
    if processes < 1:
        raise UsageError(f"--num-processes {processes} is not allowed: use 1 or more")
    if processes == 1:
        return None
    command = launch_command(processes, argv)
    print("starting " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.call(command)
