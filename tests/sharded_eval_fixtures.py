"""Shared fixtures of the sharded-evaluator tests: embeddings with exact ties, the tile matrix."""
from __future__ import annotations

import numpy as np
import torch

from scan.eval.encode import Embeddings
from scan.eval.tiles import Member, TilePlan, score_tile


def tied_embeddings(blocks: int, block: int, *, cpi: int = 5, k: int = 5, n: int = 6, d: int = 8,
                    seed: int = 0) -> Embeddings:
    """Random embeddings whose image block 1 repeats block 0 (images, captions, lengths).

    Tiles (0, b) and (1, b) then get identical inputs, so a caption of block 0 ties EXACTLY with
    the copy of its own image in block 1 (t2i), and an image of block 0 ties with the copies of
    its own captions (i2t): ties at the positive, across ranks and tiles.
    """
    g = torch.Generator().manual_seed(seed)
    n_img = blocks * block
    images = torch.randn(n_img, k, d, generator=g)
    captions = torch.randn(n_img * cpi, n, d, generator=g)
    img_lens = torch.randint(2, k + 1, (n_img,), generator=g)
    cap_lens = torch.randint(2, n + 1, (n_img * cpi,), generator=g)
    for t, per in ((images, 1), (img_lens, 1), (captions, cpi), (cap_lens, cpi)):
        t[block * per:2 * block * per] = t[:block * per]
    return Embeddings(images, img_lens, captions, cap_lens, [f"img{i:04d}" for i in range(n_img)], cpi)


def tile_matrix(members: list[Member], plan: TilePlan) -> np.ndarray:
    """The (N, M) matrix assembled from the evaluator's own tiles, in one process."""
    out = np.zeros((plan.n_images, plan.n_captions), np.float32)
    for a in range(len(plan.blocks)):
        for b in range(len(plan.blocks)):
            out[plan.rows(a), plan.cols(b)] = score_tile(members, plan.rows(a), plan.cols(b)).numpy()
    return out


def stable_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the k best (score, index), ties to the lower index."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order
