"""Decode-time methods: per decode step (one query against a KV cache of T tokens),
per layer and (sequence, KV head), attend only to a selected set of cached positions
(sinks + recent window + salient set) and report the dropped softmax mass delta.

    prhs.py      PrHS (pre-hoc selection: index sharing, progressive window, early-token freezing)
    topk.py      topk-decode: exact top-k every step (the oracle PrHS approximates)
    quest.py     Quest (page-level top-k by a min/max upper bound)
    config.py    their configs;  common.py  what they share;  runtime.py  DecodeRuntime (state, kernel, stats)
    graphs.py    static KV cache, CUDA-graph capture/replay of a decode step, the dense baseline
    prhs_reference.py  PrHS as it was before issue 18 (one host sync per layer-step): the tests' oracle

Names and "PREFILL+DECODE" specs (stem+prhs) are resolved by stem_cli.registry;
stem_cli.apply(model, "stem", decode="prhs") attaches a DecodeRuntime.
"""
