"""Expert parallelism: the MoE SwiGLU layer with its experts sharded over a process group.

Rank r of W holds experts ``[r*E/W, (r+1)*E/W)`` (E divisible by W) and a replica of the router
(and of the shared expert). Each rank routes its own tokens, then (MegaBlocks' recipe):

1. ``moe_permute`` its token copies by global expert id, so the rows for rank r are contiguous;
2. ``all_to_all_single`` of the per-expert counts, one host sync for the split sizes;
3. ``all_to_all_single`` of the rows; the received rows are grouped by source rank, then local
   expert, and are re-sorted by local expert with a second ``moe_permute`` (K=1);
4. the local experts run on their contiguous groups (:func:`expert_swiglu`);
5. the reverse path: un-sort, the reverse all-to-all, ``moe_unpermute`` with the router weights.

The exchange is an autograd function whose backward is the reverse exchange, so gradients reach
x, the router and the local experts; every rank must run the backward (the exchanges are
collectives). Each rank's local expert gradients are complete (they already include every rank's
tokens); the replicated router and shared weights get per-rank gradients that must be summed
(all-reduced) like data-parallel gradients. Under DDP, keep the expert weights out of its
all-reduce (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``) and let it
average the rest; then scale the expert gradients to match (DDP averages, so divide them by W).
``aux`` covers this rank's tokens.

Running on GPUs (NCCL), one process per GPU::

    torchrun --nproc_per_node=8 train.py

    # train.py
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(0)  # the same seed on every rank: identical router and shared weights
    layer = ExpertParallelMoE(dim, 4 * dim, 16, 2, num_shared_experts=1, device="cuda")
    y = layer(x_local)  # this rank's tokens [..., dim]; the layer holds 16/8 = 2 experts
    # or: ExpertParallelMoE.from_dense(trained_moe_feed_forward) to shard an existing layer

Tokens, counts and weights must be on the rank's current CUDA device for NCCL. Under gloo (CPU),
the same code runs on CPU tensors; the test runs 2 CPU processes that way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from .functional import MoEAux, _check_args, expert_swiglu, route, routing_aux, swiglu
from .moe import MoEFeedForward


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with split sizes; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _exchange(grad.contiguous(), recv_splits, send_splits, ctx.group), None, None, None


def _exchange(x, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(recv_splits), *x.shape[1:])
    dist.all_to_all_single(
        out,
        x.contiguous(),
        output_split_sizes=recv_splits,
        input_split_sizes=send_splits,
        group=group,
    )
    return out


def moe_swiglu_ep(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    *,
    group: dist.ProcessGroup | None = None,
    renormalize: bool = False,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    router: str = "softmax",
) -> tuple[torch.Tensor, MoEAux]:
    """:func:`~adaptdiff.nn.functional.moe_swiglu` with the experts sharded over ``group``.

    Args as ``moe_swiglu``, except that ``router_weight [E, D]`` covers all E experts while
    ``w_gate, w_up [E/W, H, D]`` and ``w_down [E/W, D, H]`` are this rank's experts
    ``[rank*E/W, (rank+1)*E/W)``. A collective: every rank of ``group`` calls it, each with its
    own tokens (any number, 0 included). Returns this rank's ``(y [T, D], aux)``.
    """
    world = dist.get_world_size(group)
    E = _check_args(
        x,
        router_weight,
        w_gate,
        w_up,
        w_down,
        top_k,
        shared,
        router,
        fn="moe_swiglu_ep",
        shards=world,
    )
    local = E // world
    logits, probs, top_p, top_idx = route(x, router_weight, top_k, renormalize, router)
    x_sorted, sorted_src, offsets = ops.moe_permute(x, top_idx, E)
    counts = offsets.diff()  # [E], global expert order: each rank's rows are contiguous

    # recv_counts[r * local + e] = rows that rank r sends to my local expert e.
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    per_rank = torch.stack(
        [counts.view(world, local).sum(1), recv_counts.view(world, local).sum(1)]
    )
    send_splits, recv_splits = per_rank.tolist()  # the one host sync
    received = _AllToAll.apply(x_sorted, send_splits, recv_splits, group)

    # The received rows come grouped by source rank, then local expert: sort by local expert
    # (stable, so each expert's rows stay in source-rank order).
    local_ids = torch.arange(local, device=x.device).repeat(world).repeat_interleave(recv_counts)
    x_local, local_src, local_offsets = ops.moe_permute(received, local_ids.unsqueeze(1), local)
    y_local = expert_swiglu(x_local, local_offsets, w_gate, w_up, w_down)
    ones = y_local.new_ones(y_local.shape[0], 1)
    y_received = ops.moe_unpermute(y_local, local_src, ones)  # back to the received order

    y_sorted = _AllToAll.apply(y_received, recv_splits, send_splits, group)
    y = ops.moe_unpermute(y_sorted, sorted_src, top_p)
    if shared is not None:
        y = y + swiglu(x, *shared)
    return y, routing_aux(logits, probs, counts, top_k)


class ExpertParallelMoE(MoEFeedForward):
    """:class:`~adaptdiff.nn.MoEFeedForward` with its experts sharded over a process group: the
    same parameters, except that ``w_gate, w_up, w_down`` hold this rank's ``E/W`` experts
    ``[rank*E/W, (rank+1)*E/W)`` (``first_expert``, ``local_experts``).

    Built directly, it initialises the dense layer and keeps its shard, so ranks seeded alike
    hold the router and shared weights alike and together hold exactly
    ``MoEFeedForward(same args)`` under that seed; :meth:`from_dense` shards an existing layer.
    The replicated router/shared gradients are per rank: all-reduce them (DDP does).
    """

    def __init__(
        self, dim: int, hidden: int, num_experts: int, top_k: int, *, group=None, **kwargs
    ):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if kwargs.get("activation", "swiglu") != "swiglu":  # moe_swiglu_ep runs SwiGLU experts
            raise ValueError("ExpertParallelMoE: only activation='swiglu' experts can be sharded")
        if num_experts % world:
            raise ValueError(
                f"ExpertParallelMoE: num_experts ({num_experts}) must be divisible by the "
                f"world size ({world})"
            )
        super().__init__(dim, hidden, num_experts, top_k, **kwargs)
        self.group = group
        self.local_experts = num_experts // world
        self.first_expert = rank * self.local_experts
        mine = slice(self.first_expert, self.first_expert + self.local_experts)
        for name in ("w_gate", "w_up", "w_down"):
            setattr(self, name, nn.Parameter(getattr(self, name).detach()[mine].clone()))

    @classmethod
    def from_dense(cls, dense: MoEFeedForward, group=None) -> ExpertParallelMoE:
        """This rank's shard of ``dense`` (the replicated weights and the local experts, copied)."""
        layer = cls(
            dense.dim,
            dense.hidden,
            dense.num_experts,
            dense.top_k,
            group=group,
            num_shared_experts=dense.num_shared_experts,
            shared_hidden=dense.shared_hidden,
            renormalize=dense.renormalize,
            router=dense.router,
            device=dense.router_weight.device,
            dtype=dense.router_weight.dtype,
        )
        mine = slice(layer.first_expert, layer.first_expert + layer.local_experts)
        with torch.no_grad():
            for name, w in dense.named_parameters():
                getattr(layer, name).copy_(w[mine] if name in ("w_gate", "w_up", "w_down") else w)
        return layer

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """:func:`moe_swiglu_ep` on this rank's ``tokens [T, D]``: ``(y, aux)``."""
        return moe_swiglu_ep(
            tokens,
            self.router_weight,
            *self.expert_weights(),
            self.top_k,
            group=self.group,
            **self.routing_options(),
        )

    def extra_repr(self) -> str:
        last = self.first_expert + self.local_experts - 1
        return super().extra_repr() + f", local experts {self.first_expert}..{last}"
