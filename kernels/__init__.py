"""stem's Triton kernels: this folder installs as `stem_cli.kernels` (pyproject's package-dir mapping).

Run from a checkout's root (`python -m ...`, pytest's pythonpath), the folder is also importable under
the bare name `kernels`, which is Hugging Face's kernels package, imported by transformers (5.25 and
newer). Imported under that name, this file hands it to the installed package, so a checkout never
shadows it."""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ folder is stem_cli.kernels)",
                                  name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_module)
