"""Selectors: one pre-fill method per module, (q, k, v, layer, config) -> BlockIndex.

A selector never runs attention. Each module exports `select`, `DEFAULTS` (a frozen
config), `DESCRIPTION` and, where the method has one, `BUDGET_KNOB` (knob.py), an
`estimate`/`choose` split of `select`, and `prepare(model, config) -> state` for a
method with run state. Names, variants (sam, uniform, stem-tpd) and lookup live in
stem_cli.registry; adding a method is one module here and one line there.
"""
