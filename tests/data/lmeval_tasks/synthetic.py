"""The generator of stem_tiny_synthetic: like lm-eval's RULER, it builds its documents when the
task loads, from what lm-eval hands it as metadata (a tokenizer to load, the lengths to build),
and writes what it was given into each prompt for the test to read back."""

import datasets
from transformers import AutoTokenizer


def build(**metadata):
    tokenizer = AutoTokenizer.from_pretrained(metadata["tokenizer"], local_files_only=True)
    docs = []
    for length in metadata["max_seq_lengths"]:
        text = f"tokenizer={metadata['tokenizer']} vocab={len(tokenizer)} length={length}"
        docs.append({"input": text, "length": str(length)})
    return {"test": datasets.Dataset.from_list(docs)}
