"""Next-layer expert predictors (installed as `offload.predictors`): small
objects that guess which experts the coming MoE layers will need, so the
engine can fetch them while the current layer computes.

    none      no prefetching
    gate      the next layers' routers applied to this layer's router input (training-free)
    learned   per-layer linear maps trained on a trace's hidden states (`offload train-predictor`)
    affinity  inter-layer co-activation counts with a token-id prior, from a trace or learned online
    routing   routing only: the whole top-k set and its path over earlier layers, the request's own
              recent experts, combined into calibrated probabilities (from a trace, or online)

Traces (`trace.py`) record routing in the `offload-trace/1` format; `evaluate.py`
scores predictors and cache policies on them without the model; `calibrate.py`
turns scores into probabilities, for prefetching by expected gain (offload/prefetch.py).
"""

# Every predictor by name: what offload.load(predictor=...), `offload simulate --predictor` and
# `offload eval-predictor` take (the runtime builds them in api._prefetcher, trace tools through
# evaluate.predictor_factory).
NAMES = ("none", "gate", "learned", "affinity", "routing")
