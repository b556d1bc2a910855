"""Runs the expert-parallel MoE layer on 2 CPU processes (gloo); test_expert_parallel.py launches
it under torchrun and compares what rank 0 saves with the single-process layer."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from adaptdiff.nn import ExpertParallelMoE, MoEFeedForward, moe_swiglu_ep

# name: (tokens per rank, D, H, E, K, shared width, renormalize, router, through the module)
CASES = {
    "softmax-shared": ((13, 9), 8, 12, 4, 2, 6, False, "softmax", False),
    "sigmoid-renorm-empty-rank": ((11, 0), 8, 10, 2, 1, 0, True, "sigmoid", False),
    "k3-of-6": ((5, 17), 6, 8, 6, 3, 0, False, "softmax", False),
    "module": ((10, 7), 8, 16, 4, 2, 16, False, "softmax", True),
}


def make_case(name: str):
    """The full problem every rank builds alike: tokens, upstream gradient and dense weights."""
    splits, D, H, E, K, Hs, renormalize, router, _ = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    T = sum(splits)
    weights = dict(
        router_weight=randn(E, D, scale=0.5),
        w_gate=randn(E, H, D, scale=D**-0.5),
        w_up=randn(E, H, D, scale=D**-0.5),
        w_down=randn(E, D, H, scale=H**-0.5),
    )
    shared = (randn(Hs, D), randn(Hs, D), randn(D, Hs)) if Hs else None
    kwargs = dict(top_k=K, renormalize=renormalize, router=router)
    return randn(T, D), randn(T, D), weights, shared, kwargs, splits


def run_case(name: str, rank: int, world: int) -> dict:
    x_full, grad_full, weights, shared, kwargs, splits = make_case(name)
    lo = sum(splits[:rank])
    x = x_full[lo : lo + splits[rank]].clone().requires_grad_()
    local = weights["w_gate"].shape[0] // world
    mine = slice(rank * local, (rank + 1) * local)
    if CASES[name][-1]:  # through ExpertParallelMoE.from_dense
        E, H, D = weights["w_gate"].shape
        dense = MoEFeedForward(D, H, E, kwargs["top_k"], num_shared_experts=1,
                               shared_hidden=shared[0].shape[0], dtype=torch.float64)  # fmt: skip
        with torch.no_grad():
            for key, w in weights.items():
                getattr(dense, key).copy_(w)
            for p, w in zip(dense.shared_weights(), shared, strict=True):
                p.copy_(w)
        layer = ExpertParallelMoE.from_dense(dense)
        y = layer(x)
        aux = layer.aux
        params = dict(layer.named_parameters())
        shared_params = list(layer.shared_weights())
    else:
        params = {k: (w[mine] if k != "router_weight" else w).clone().requires_grad_()
                  for k, w in weights.items()}  # fmt: skip
        shared_params = [w.clone().requires_grad_() for w in shared] if shared else []
        y, aux = moe_swiglu_ep(x, *params.values(), shared=shared_params or None, **kwargs)
    (y * grad_full[lo : lo + splits[rank]]).sum().backward()

    def gather_rows(t):  # ranks hold different row counts, which gloo's all_gather rejects
        parts = [None] * world
        dist.all_gather_object(parts, t)
        return torch.cat(parts)

    def summed(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    counts = summed(aux.counts)
    return dict(
        y=gather_rows(y.detach()),
        grad_x=gather_rows(x.grad),
        grad_router_weight=summed(params["router_weight"].grad),
        **{f"grad_{k}": gather_rows(params[k].grad) for k in ("w_gate", "w_up", "w_down")},
        grad_shared=[summed(p.grad) for p in shared_params],
        counts=counts,
    )


def seeded_construction_matches_dense(rank: int, world: int) -> bool:
    torch.manual_seed(3)
    layer = ExpertParallelMoE(8, 16, 4, 2, num_shared_experts=1)
    torch.manual_seed(3)
    dense = MoEFeedForward(8, 16, 4, 2, num_shared_experts=1)
    mine = slice(rank * 2, rank * 2 + 2)
    return all(
        torch.equal(
            p, dense.get_parameter(k)[mine] if k.startswith("w_") else dense.get_parameter(k)
        )
        for k, p in layer.named_parameters()
    )


def construction_error(*args, **kwargs) -> str:
    try:
        ExpertParallelMoE(*args, **kwargs)
    except ValueError as e:
        return str(e)
    return ""


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {name: run_case(name, rank, world) for name in CASES}
    results["seeded"] = seeded_construction_matches_dense(rank, world)
    results["indivisible"] = construction_error(8, 16, 3, 2)
    results["gelu"] = construction_error(8, 16, 4, 2, activation="gelu_tanh")
    if rank == 0:
        results["world_size"] = world
        torch.save(results, out / "result.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
