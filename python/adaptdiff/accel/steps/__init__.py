"""Step-level methods: SADA's stability-guided step skipping (:mod:`.sada`) and AutoDiffusion's
timestep and block-skip search (:mod:`.autodiffusion`)."""
