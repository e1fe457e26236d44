"""stem: Stem sparse pre-fill attention for Hugging Face causal LMs.

    import stem_cli
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="stem")   # method defaults
    runtime = stem_cli.apply(model, "uniform", k_scale=0.5)                          # any method, any config
"""

__version__ = "0.1.0"

from stem_cli.integration import apply, register  # noqa: E402

register()  # makes attn_implementation="stem", "stem_uniform", ... valid names

__all__ = ["apply", "register", "__version__"]
