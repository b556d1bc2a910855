"""Token-level methods: region-adaptive sampling (:mod:`.ras`, with :mod:`.ras_joint` for
SD3/Flux joint attention) and attention entropy scaling (:mod:`.entropy_scaling`)."""
