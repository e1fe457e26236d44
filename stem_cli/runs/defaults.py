"""What a run uses when the caller names no model or lengths: a large model on a GPU, a small one on the CPU.

A leaf (no imports), so the CLI can quote these in its help without loading anything.
"""

EVAL_GPU_MODEL, EVAL_CPU_MODEL = "llama3-8b", "smollm2-135m"  # eval and compare
PROFILE_GPU_DEFAULTS = ("llama3-8b", "8k,32k,128k")  # (model, lengths) of a pre-fill profile
PROFILE_CPU_DEFAULTS = ("smollm2-135m", "1k,4k")

