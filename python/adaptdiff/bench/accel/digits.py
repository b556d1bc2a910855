"""The ``digits`` model: the demo's digits DiT, trained once into a cache folder and reused,
sampled with guidance and scored by the digits-FD and the classifier's accuracy, from
``--seeds`` noise seeds (the benchmark's quality rows: mean ± std over them)."""

from __future__ import annotations

from pathlib import Path

import torch

from adaptdiff.accel.evaluate import evaluate

from .methods import autodiffusion_methods, guidance_methods, methods
from .report import progress
from .seeds import aggregate_results


def cached_model(
    directory: Path, marker: str, what: str, load, train, *, cached: bool, errors: tuple = ()
):
    """``load(directory)`` when ``directory/marker`` exists, else ``train()``. A ``cached`` one
    that no longer loads (written by an older version: ``ValueError``, ``CheckpointError`` or
    one of ``errors``) is trained again; a user's raises."""
    import shutil

    from adaptdiff.train.checkpoint import CheckpointError

    if (directory / marker).exists():
        try:
            return load(directory)
        except (ValueError, CheckpointError, *errors) as e:
            if not cached:
                raise
            print(f"bench accel: the cached {what} model does not load ({e}); training it again")
            shutil.rmtree(directory)
    return train()


def digits_model(directory: Path, train_steps: int, *, cached: bool = False):
    """The demo's digits DiT, trained once into ``directory`` and reused (:func:`cached_model`)."""
    from adaptdiff.recipes.digits import DigitsTrainConfig, load_digits_model, train_digits

    def train():
        cfg = DigitsTrainConfig(out_dir=str(directory), steps=train_steps, preview_every=0)
        return train_digits(cfg)[0]

    return cached_model(directory, "model.json", "digits", load_digits_model, train, cached=cached)


def run_digits(args, steps: int) -> list:
    from adaptdiff.metrics.digits import DigitsEvaluator

    model = digits_model(
        Path(args.digits_dir),
        300 if args.quick else args.train_steps,
        cached=getattr(args, "digits_cached", False),
    )
    return run_trained(args, steps, model, "digits DiT-demo/4", DigitsEvaluator(16))


def run_trained(args, steps: int, model, model_name: str, evaluator, decode=None) -> list:
    """Every method on a trained class-conditional model from ``--seeds`` noise seeds, scored
    by ``evaluator`` (a :class:`~adaptdiff.metrics.digits.DigitsEvaluator` of the images'
    size) on the samples, after ``decode`` for a latent model."""
    from adaptdiff.recipes.digits import balanced_labels

    num = 40 if args.quick else 300
    labels = balanced_labels(num)
    side = model.config.input_size
    images = decode or (lambda x: x)

    def score(x):
        return {"fd": evaluator.fd(x), "accuracy": evaluator.accuracy(x, labels)}

    sampler = dict(method="euler", steps=steps, prediction="flow", guidance_scale=1.5,
                   cond={"y": labels}, uncond={"y": torch.full_like(labels, 10)})  # fmt: skip
    wanted = getattr(args, "methods", None)  # method families (``--methods``); None: all

    def keep(found: list) -> list:
        return [m for m in found if wanted is None or m.name in wanted]

    chosen = keep(methods(steps, args.quick))
    extra = []
    if wanted is None or wanted & {"AG", "LinearAG"}:
        extra += keep(guidance_methods(model, steps, args.quick))
    if not args.quick and (wanted is None or "AutoDiffusion" in wanted):  # its search is costly
        extra += keep(autodiffusion_methods(model, lambda x: evaluator.fd(images(x))))
    # The methods (LinearAG's calibration, AutoDiffusion's search: other noise) are made once;
    # every noise seed then runs the exact sampler and each method from its own noise.
    seeds = list(range(getattr(args, "seeds", 1)))
    log = getattr(args, "row_log", None)  # each seed's rows saved as they finish (provisional)
    per_seed = []
    for seed in seeds:
        progress(f"{model_name}: noise seed {seed} ({len(per_seed) + 1} of {len(seeds)})")
        per_seed.append(evaluate(
            model, chosen + extra, model_name=model_name,
            shape=(num, model.in_channels, side, side), sampler=sampler, data_range=2.0,
            clamp=(-1.0, 1.0), score=score, repeats=args.repeats, clock=args.clock, seed=seed,
            progress=progress, decode=decode,
        ))  # fmt: skip
        for result in per_seed[-1] if log is not None else ():
            log.add(result, noise_seed=seed)
    return aggregate_results(per_seed, seeds)
