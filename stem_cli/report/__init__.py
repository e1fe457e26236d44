"""Rendering results: `tables` (rich tables; Markdown, CSV, JSON exports) and `plots` (PNG figures).

Nothing is imported here, so loading one renderer does not load the other (plots needs matplotlib).
"""
