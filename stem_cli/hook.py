"""The one function registered with transformers' AttentionInterface (transitional: integration's)."""

from stem_cli.integration import register  # noqa: F401
