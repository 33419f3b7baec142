"""This rank's rows of the global score matrix without gathering every caption: a ring exchange.

The row-partitioned loss (``scan.loss``, ``loss.partition``) needs S_r (B, G): this rank's B images
against all G captions. Gathering the captions costs G · n · d numbers per rank (and as much again
for their gradients), which stops fitting at large global batches (docs/DESIGN.md §3.4). Here the
caption blocks travel around a ring instead, as SigLIP's neighbour exchange in open_clip: at step
t a rank scores its images against the block of rank (r − t) mod W, then passes that block on to
r + 1 and takes the next from r − 1, so it holds two blocks at a time.

The backward runs the ring again: each block travels with the gradient accumulated for it so far;
every rank recomputes its scores against the block (as the checkpointed tiles do anyway), adds the
block's gradient and passes both on, and after a full turn each rank holds its own block's
gradient from every rank. Memory per rank: O(B_max · n_max · d) for the blocks instead of
O(G · n_max · d), plus the (B, G) scores.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from scan.scorers import Scorer


def _pass_on(tensors: list[Tensor], rank: int, world: int) -> list[Tensor]:
    """Sends ``tensors`` to rank + 1 and returns the same-shaped ones received from rank − 1."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, (rank + 1) % world) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, (rank - 1) % world) for t in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


def _own_block(captions: Tensor, counts: list[int], n_sizes: list[int]) -> tuple[Tensor, list[int]]:
    """This rank's captions padded to the largest block (B_max, n_max, d), the buffer shape every
    rank sends, and every rank's first column in G."""
    block = captions.new_zeros(max(counts), max(n_sizes), captions.shape[-1])
    block[:captions.shape[0], :captions.shape[1]] = captions
    return block, [sum(counts[:r]) for r in range(len(counts))]


class _RingScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images: Tensor, img_lens: Tensor, captions: Tensor, all_cap_lens: Tensor,
                counts: list[int], n_sizes: list[int], scorer: Scorer) -> Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        block, starts = _own_block(captions, counts, n_sizes)
        scores = images.new_empty(images.shape[0], sum(counts), dtype=torch.float32
                                  if images.dtype != torch.float64 else torch.float64)
        for step in range(world):
            src = (rank - step) % world
            cols = slice(starts[src], starts[src] + counts[src])
            scores[:, cols] = scorer(images, block[:counts[src], :n_sizes[src]], all_cap_lens[cols],
                                     img_lens)
            if step + 1 < world:
                (block,) = _pass_on([block], rank, world)
        ctx.save_for_backward(images, img_lens, captions, all_cap_lens)
        ctx.counts, ctx.n_sizes, ctx.scorer = counts, n_sizes, scorer
        return scores

    @staticmethod
    def backward(ctx, grad_scores: Tensor):
        images, img_lens, captions, all_cap_lens = ctx.saved_tensors
        counts, n_sizes, scorer = ctx.counts, ctx.n_sizes, ctx.scorer
        rank, world = dist.get_rank(), dist.get_world_size()
        block, starts = _own_block(captions, counts, n_sizes)
        block_grad = torch.zeros_like(block)  # the gradient travelling with the block
        grad_images = torch.zeros_like(images)
        for step in range(world):
            src = (rank - step) % world
            cols = slice(starts[src], starts[src] + counts[src])
            with torch.enable_grad():
                img = images.detach().requires_grad_(True)
                cap = block[:counts[src], :n_sizes[src]].detach().requires_grad_(True)
                s = scorer(img, cap, all_cap_lens[cols], img_lens)
                g_img, g_cap = torch.autograd.grad(s, (img, cap), grad_scores[:, cols].to(s.dtype))
            grad_images += g_img
            block_grad[:counts[src], :n_sizes[src]] += g_cap
            # The last pass brings each block's gradient home (the block itself is no longer needed).
            block, block_grad = _pass_on([block, block_grad], rank, world)
        grad_captions = block_grad[:captions.shape[0], :captions.shape[1]]
        return grad_images, None, grad_captions, None, None, None, None


def ring_row_scores(images: Tensor, img_lens: Tensor, captions: Tensor, all_cap_lens: Tensor,
                    counts: list[int], n_sizes: list[int], scorer: Scorer) -> Tensor:
    """S_r (B, G): this rank's images (B, k, d) against every rank's captions in rank order, the
    captions exchanged around the ring. ``counts`` / ``n_sizes``: every rank's caption count and
    padded length; ``all_cap_lens`` (G,) every caption's length. Differentiable in ``images`` and
    this rank's ``captions`` (B_r, n_r, d); every rank must call it (and its backward) together."""
    return _RingScores.apply(images, img_lens, captions, all_cap_lens, counts, n_sizes, scorer)
