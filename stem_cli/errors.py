"""The one kind of error a user can fix: a bad name, value, length, path or option combination.

Every such error derives from `UsageError`, whichever floor raises it: method parameters
(`config.ConfigError`), model names and weights (`models.ModelError`), task names and
data (`tasks.harness.TaskError`), and the run options checked in `stem_cli.runs`.
The CLI prints the message and exits with code 2; a Python caller catches `UsageError`.
"""


class UsageError(Exception):
    """Bad input from the user; the message says what is wrong and what is allowed."""


def click_error_line(error, args: list[str]) -> str:
    """One line for a check the option parser (Click, under Typer) made itself: the option, the value as
    typed and what is allowed ("--limit 0 is not allowed: use an integer >= 1"), or the parser's own
    message with where to look. `args`: the command line (after the program name), to quote the value."""
    ctx = getattr(error, "ctx", None)
    where = ctx.command_path if ctx is not None else "stem"
    param = getattr(error, "param", None)
    kind = type(error).__name__
    if kind == "NoSuchOption":
        near = _closest(error.option_name, getattr(error, "possibilities", None) or [])
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        return f"{where} has no option {error.option_name}{hint} (`{where} --help` lists its options)"
    if kind == "BadParameter" and param is not None and getattr(param, "opts", None):
        option = max(param.opts, key=len)
        value = _given(args, [*param.opts, *getattr(param, "secondary_opts", [])])
        shown = f"{option} {_quoted(value)}" if value is not None else option
        return f"{shown} is not allowed: use {_allowed(param)}"
    message = " ".join(error.format_message().split()).rstrip(".")
    return f"{where}: {message[:1].lower()}{message[1:]} (see `{where} --help`)"


def _closest(typed: str, candidates: list[str]) -> list[str]:
    """The parser's near options, only those about as near as the nearest (--limt: --limit, not also --tp)."""
    from difflib import SequenceMatcher

    ratio = {c: SequenceMatcher(None, typed, c).ratio() for c in candidates}
    best = max(ratio.values(), default=0.0)
    return sorted(c for c, r in ratio.items() if r >= best - 0.1)


def _given(args: list[str], opts: list[str]) -> str | None:
    """The value typed after an option (`--limit 0` or `--limit=0`); the last one counts, as in the parser."""
    value = None
    for i, arg in enumerate(args):
        if arg in opts and i + 1 < len(args):
            value = args[i + 1]
        elif "=" in arg and arg.split("=", 1)[0] in opts:
            value = arg.split("=", 1)[1]
    return value


def _quoted(value: str) -> str:
    import shlex

    return shlex.quote(value)


def _allowed(param) -> str:
    """What an option takes, from its declared type and bounds: 'an integer >= 1', 'a number from 0.0 to 1.0'."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    declared = getattr(param, "type", None)  # Click's own type object (Typer before it vendored Click)
    name = getattr(annotation, "__name__", "") or getattr(declared, "name", "") or ""
    what = "an integer" if "int" in name else "a number" if "float" in name else f"a valid {getattr(param, 'name', 'value')}"
    choices = getattr(declared, "choices", None)
    if choices:
        return "one of " + ", ".join(map(str, choices))
    lo = getattr(param, "min", getattr(declared, "min", None))
    hi = getattr(param, "max", getattr(declared, "max", None))
    if lo is not None and hi is not None:
        return f"{what} from {lo} to {hi}"
    if lo is not None:
        return f"{what} >= {lo}"
    if hi is not None:
        return f"{what} <= {hi}"
    return what
