"""Next-layer expert predictors (installed as `offload.predictors`): small
objects that guess which experts the coming MoE layers will need, so the
engine can fetch them while the current layer computes.

    none      no prefetching
    gate      the next layers' routers applied to this layer's router input (training-free)
    learned   per-layer linear maps trained on a trace's hidden states (`offload train-predictor`)
    affinity  inter-layer co-activation counts with a token-id prior, from a trace or learned online

Traces (`trace.py`) record routing in the `offload-trace/1` format; `evaluate.py`
scores predictors and cache policies on them without the model.
"""

NAMES = ("none", "gate", "learned", "affinity")
