"""Next-layer expert predictors (installed as `offload.predictors`): small
objects that guess which experts the coming layers will need, scored on
routing traces. None is wired in yet; the runtime fetches nothing ahead."""
