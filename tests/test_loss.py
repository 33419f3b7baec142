"""The VSE++ hinge: against a plain loop, against the reference's formula, with image ids, across ranks."""
from __future__ import annotations

import pytest
import torch

from scan.loss import directional_hinge, hardest_negative_loss


def loop_hinge(scores, positive_col, margin, max_violation, row_ids=None, col_ids=None):
    """The definition, one row and one column at a time."""
    total = scores.new_zeros(())
    for r in range(scores.shape[0]):
        p = int(positive_col[r])
        costs = [
            torch.clamp(margin - scores[r, p] + scores[r, c], min=0)
            for c in range(scores.shape[1])
            if c != p and (row_ids is None or int(row_ids[r]) != int(col_ids[c]))
        ]
        if not costs:
            continue
        costs = torch.stack(costs)
        total = total + (costs.max() if max_violation else costs.sum())
    return total


def reference_contrastive_loss(scores, margin, max_violation):
    """kuanghuei/SCAN ContrastiveLoss.forward after the score matrix (no id masking)."""
    diagonal = scores.diag().view(scores.size(0), 1)
    d1 = diagonal.expand_as(scores)
    d2 = diagonal.t().expand_as(scores)
    cost_s = (margin + scores - d1).clamp(min=0)
    cost_im = (margin + scores - d2).clamp(min=0)
    mask = torch.eye(scores.size(0)) > 0.5
    cost_s = cost_s.masked_fill(mask, 0)
    cost_im = cost_im.masked_fill(mask, 0)
    if max_violation:
        cost_s = cost_s.max(1)[0]
        cost_im = cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("with_ids", [False, True])
def test_directional_hinge_matches_loop_values_and_gradients(max_violation, with_ids):
    g = torch.Generator().manual_seed(1)
    rows, cols = 6, 10
    scores = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.3
    positive_col = torch.randperm(cols, generator=g)[:rows]
    row_ids = col_ids = None
    if with_ids:
        col_ids = torch.randint(0, 4, (cols,), generator=g)  # several columns share an image
        row_ids = col_ids[positive_col]
    a = scores.clone().requires_grad_(True)
    b = scores.clone().requires_grad_(True)
    fast = directional_hinge(a, positive_col, 0.2, max_violation, row_ids, col_ids)
    slow = loop_hinge(b, positive_col, 0.2, max_violation, row_ids, col_ids)
    assert fast.item() > 0
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_violation", [True, False])
def test_hardest_negative_loss_equals_reference_without_ids(max_violation):
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(16, 16, generator=g)
    scores.diagonal().add_(0.1)  # a realistic mix of satisfied and violated margins
    ours = hardest_negative_loss(scores, margin=0.2, max_violation=max_violation)
    ref = reference_contrastive_loss(scores, 0.2, max_violation)
    assert ours.item() > 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("max_violation", [True, False])
def test_hardest_negative_loss_matches_loop_both_directions(max_violation):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(8, 8, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    diag = torch.arange(8)
    expected = (loop_hinge(scores, diag, 0.2, max_violation, ids, ids)
                + loop_hinge(scores.t(), diag, 0.2, max_violation, ids, ids))
    got = hardest_negative_loss(scores, 0.2, max_violation, image_ids=ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_pairs_sharing_an_image_are_never_negatives():
    # Pairs 0 and 1 are two captions of one image: their cross scores are as high as the positives.
    scores = torch.tensor([[0.9, 0.9, 0.1],
                           [0.9, 0.9, 0.2],
                           [0.0, 0.1, 0.8]])
    ids = torch.tensor([7, 7, 8])
    masked = hardest_negative_loss(scores, 0.2, True, image_ids=ids)
    unmasked = hardest_negative_loss(scores, 0.2, True)
    # masked, max violation: rows 0,1 hardest negatives 0.1, 0.2 → 0, 0; row 2: 0.1 → 0.
    # columns 0,1 hardest negatives 0.0, 0.1 → 0, 0; column 2: 0.2 → [0.2 − 0.8 + 0.2]₊ = 0.
    assert masked.item() == 0.0
    # unmasked: rows 0,1 and columns 0,1 each see 0.9 vs 0.9 → 0.2 each.
    assert unmasked.item() == pytest.approx(0.8, abs=1e-6)


def test_row_without_negatives_contributes_zero():
    scores = torch.randn(3, 3, requires_grad=True)
    loss = hardest_negative_loss(scores, 0.2, True, image_ids=torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("max_violation", [True, False])
def test_cross_device_blocks_sum_to_the_global_loss(max_violation):
    """The trainer's decomposition: each rank takes its local images × all captions (rows) and all
    images × its local captions (columns); the sum over ranks is the global loss, gradients included."""
    g = torch.Generator().manual_seed(4)
    batch, world = 12, 3
    scores = torch.randn(batch, batch, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 8, (batch,), generator=g)
    a = scores.clone().requires_grad_(True)
    b = scores.clone().requires_grad_(True)
    total = a.new_zeros(())
    local = batch // world
    for rank in range(world):
        mine = torch.arange(rank * local, (rank + 1) * local)
        total = total + directional_hinge(a[mine], mine, 0.2, max_violation, ids[mine], ids)
        total = total + directional_hinge(a[:, mine].t(), mine, 0.2, max_violation, ids[mine], ids)
    global_loss = hardest_negative_loss(b, 0.2, max_violation, image_ids=ids)
    torch.testing.assert_close(total, global_loss, rtol=0, atol=1e-12)
    total.backward()
    global_loss.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="square"):
        hardest_negative_loss(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="positive_col"):
        directional_hinge(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 0.2, True)
    with pytest.raises(ValueError, match="together"):
        directional_hinge(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), 0.2, True,
                          row_ids=torch.zeros(3))
    with pytest.raises(ValueError, match="row_ids/col_ids"):
        directional_hinge(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), 0.2, True,
                          row_ids=torch.zeros(3), col_ids=torch.zeros(3))


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,direction", [("scan", "t2i"), ("scan", "i2t"), ("dvsa", "t2i")])
@pytest.mark.parametrize("caption_chunk", [0, 2])
def test_length_groups_give_the_same_loss_and_gradients(kind, direction, caption_chunk, device):
    """loss.length_groups sorts the batch's captions by length into groups, each cut to its own
    longest caption: the same loss and gradients as one group padded to the batch's longest
    (float64; shuffled lengths 1..9, garbage in the padding), on the CPU and on CUDA."""
    from scan.config import ExperimentConfig
    from scan.loss import batch_loss
    from scan.builders import scorer_for

    g = torch.Generator().manual_seed(3)
    cfg = ExperimentConfig()
    cfg.model.kind, cfg.xattn.direction = kind, direction
    cfg.loss.caption_chunk = caption_chunk
    images = torch.randn(11, 6, 8, generator=g, dtype=torch.float64)
    captions = torch.randn(11, 9, 8, generator=g, dtype=torch.float64)
    cap_lens = torch.tensor([3, 9, 1, 5, 2, 7, 4, 9, 6, 2, 8])
    img_lens = torch.tensor([6, 4, 6, 1, 5, 6, 3, 6, 2, 6, 6])
    for j, n in enumerate(cap_lens.tolist()):
        captions[j, n:] = 7.0
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0])  # the last caption shares image 0
    images, captions, cap_lens, img_lens, ids = (x.to(device) for x in (images, captions, cap_lens,
                                                                        img_lens, ids))
    results = []
    for groups in (1, 3, 11):
        cfg.loss.length_groups = groups
        img, cap = images.clone().requires_grad_(True), captions.clone().requires_grad_(True)
        loss, _ = batch_loss(img, img_lens, cap, cap_lens, ids, cfg.loss, scorer_for(cfg))
        loss.backward()
        results.append((loss.detach(), img.grad, cap.grad))
    for loss, img_grad, cap_grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(img_grad, results[0][1], rtol=0, atol=1e-12)
        torch.testing.assert_close(cap_grad, results[0][2], rtol=0, atol=1e-12)
    assert float(results[0][0]) > 0
