"""Token-level methods: region-adaptive sampling (:mod:`.ras`, with :mod:`.ras_joint` for
SD3/Flux joint attention, :mod:`.ras_sana` for Sana and :mod:`.ras_graph` for CUDA-graph replay
of its steps) and attention entropy scaling (:mod:`.entropy_scaling`)."""
