"""Recipes that the demos, studies and benchmarks share: a model config, its training, loading,
sampling and scoring on embedded data (:mod:`.digits`)."""
