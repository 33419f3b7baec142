"""Attention pictures in the style of SCAN's Figure 1: one image, one caption, one tile per word.

``explain_pair`` scores the pair with the model's own scorer (``scan.scorers``: SCAN's cross
attention, or DVSA's word-to-best-region alignment) and draws, for every word of the caption, the image with that word's attention
over the regions as a heat map. A region's weight is spread over its box (grid features: their
cell; detector features: their box) and overlapping boxes add up. Every tile of a picture shares
ONE colour scale, from 0 to the largest weight of any word (shown by the colour bar in the header),
so near-uniform attention (max 0.04 over 49 cells) looks cool beside peaked attention (0.36); the
map is drawn over the picture with the "jet" colours, more opaque where the weight is higher, and
each tile's title gives its own maximum.

Which weights are drawn:
- t2i models (words attend to regions): ``α[w, r]``, the softmax over regions of word w; exactly
  the attention the score used.
- i2t models (regions attend to words): ``α[r, w]`` read column-wise, i.e. for word w how strongly
  each region r attended to w (each region's weights sum to 1 over the words). These are again the
  weights the score used, rather than a t2i softmax the model never computed.
- DVSA models: 1 on the region each word is aligned to (its best, when that product is positive),
  the only region the score takes from. VSE++ models pool each side first: no picture (an error).

Special tokens (``<start>``/``<end>`` of the word vocabulary, ``[CLS]``/``[SEP]`` of transformers
tokenizers) take part in the score like every other position but get no tile. One tile per WORD:
the word pieces of a transformers tokenizer are merged into the word they belong to
(``word_groups``; t2i: the mean of the pieces' distributions, i2t: the sum of the regions' weights
on the pieces), and punctuation gets no tile.

PNG size (exact, in pixels): with T = 1 + number of drawn words (the first tile is the plain image),
``cols = min(columns, T)``, ``rows = ceil(T / cols)``:
``width = cols * tile_px``, ``height = rows * tile_px + HEADER_PX``. See ``figure_size``.
"""
from __future__ import annotations

import logging
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dataio import storage  # noqa: E402
from dataio.text import HFTokenizer, TextEncoder, Vocab, tokenize  # noqa: E402
from scan.scorers import Scorer, as_scorer  # noqa: E402
from scan.xattn import XAttnConfig  # noqa: E402

log = logging.getLogger(__name__)

HEADER_PX = 56  # figure title: caption (up to two lines) and score
TITLE_PX = 22  # above each tile's picture: the word
_DPI = 100
_CANVAS_GREY = 0.92  # background when the original image is not available


def figure_size(n_words: int, columns: int = 5, tile_px: int = 224) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for ``n_words`` drawn words (see the module doc)."""
    tiles = 1 + n_words
    cols = min(columns, tiles)
    rows = math.ceil(tiles / cols)
    return cols * tile_px, rows * tile_px + HEADER_PX


def layout_boxes(k: int) -> np.ndarray:
    """(k, 4) normalised boxes for regions that come without any: cells of a near-square grid in
    region order, row-major (exactly the feature grid when k is a square such as Lite2's 81)."""
    rows = math.ceil(math.sqrt(k))
    cols = math.ceil(k / rows)
    r, c = np.divmod(np.arange(k), cols)
    return np.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], axis=1).astype(np.float32)


def heat_map(weights: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Region weights (k,) over normalised boxes (k, 4) → (height, width) map, each weight added
    to every pixel of its box (a box always covers at least one pixel)."""
    heat = np.zeros((height, width), dtype=np.float64)
    # Round both edges the same way, so that adjacent cells share an edge and never overlap.
    x0 = np.clip(np.round(boxes[:, 0] * width), 0, width - 1).astype(int)
    y0 = np.clip(np.round(boxes[:, 1] * height), 0, height - 1).astype(int)
    x1 = np.maximum(np.clip(np.round(boxes[:, 2] * width), 0, width).astype(int), x0 + 1)
    y1 = np.maximum(np.clip(np.round(boxes[:, 3] * height), 0, height).astype(int), y0 + 1)
    for w, a, b, c, d in zip(weights, x0, y0, x1, y1):
        heat[b:d, a:c] += w
    return heat


def token_labels(text_encoder: TextEncoder, tokens: list[str], ids: list[int]) -> tuple[list[str], list[bool]]:
    """A display label for every id position and whether the position is a special token."""
    if isinstance(text_encoder, Vocab):
        # Vocab.encode gives <start> w1 … wn <end>; show the caption's own words, also for <unk>.
        if len(ids) != len(tokens) + 2:
            raise ValueError(f"vocabulary encoding has {len(ids)} ids for {len(tokens)} words; "
                             "expected <start> words <end>")
        return ["<start>", *tokens, "<end>"], [True, *([False] * len(tokens)), True]
    if isinstance(text_encoder, HFTokenizer):
        special = set(text_encoder.tok.all_special_ids)
        return text_encoder.tok.convert_ids_to_tokens(ids), [i in special for i in ids]
    return [str(i) for i in ids], [False] * len(ids)


def word_groups(text_encoder: TextEncoder, tokens: list[str], caption: str,
                ids: list[int]) -> list[tuple[str, list[int]]]:
    """(word, its id positions) for every drawn word of the caption.

    A word vocabulary has one position per word. A transformers tokenizer splits words into
    pieces ("skateboarder" → skate ##board ##er): the pieces of one word (the fast tokenizer's
    ``word_ids``) form one group, labelled with the word as written. Special tokens and
    punctuation-only words ("," "-") get no group."""
    labels, special = token_labels(text_encoder, tokens, ids)
    word_ids = None
    if isinstance(text_encoder, HFTokenizer):
        enc = text_encoder.tok(caption, truncation=True, max_length=text_encoder.max_length)
        if list(enc["input_ids"]) == list(ids) and enc.word_ids() is not None:
            word_ids = enc.word_ids()
    if word_ids is None:  # one position per word
        return [(labels[i], [i]) for i in range(len(ids)) if not special[i]]
    groups: dict[int, list[int]] = {}
    for pos, w in enumerate(word_ids):
        if w is not None and not special[pos]:
            groups.setdefault(w, []).append(pos)
    out = []
    for positions in groups.values():
        word = text_encoder.tok.convert_tokens_to_string([labels[p] for p in positions]).strip()
        if any(ch.isalnum() for ch in word):
            out.append((word, positions))
    return out


def word_attention(attention: np.ndarray, groups: list[tuple[str, list[int]]],
                   direction: str) -> np.ndarray:
    """(positions, k) attention → (words, k). t2i: each piece's softmax over the regions,
    averaged over the word's pieces (still a distribution over regions); i2t: each region's
    weight on the word is the sum of its weights on the word's pieces."""
    rows = []
    for _, positions in groups:
        part = attention[positions]
        rows.append(part.mean(0) if direction == "t2i" else part.sum(0))
    return np.stack(rows) if rows else np.zeros((0, attention.shape[1]))


def _load_image(image: str | os.PathLike | Image.Image | None, what: str) -> Image.Image | None:
    if image is None or isinstance(image, Image.Image):
        return None if image is None else image.convert("RGB")
    try:
        with storage.open_url(str(image), "rb") as f, Image.open(f) as img:  # local or s3://
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: cannot read image {str(image)!r}: {exc}") from exc


def _model_placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the weights are and their dtype (a bf16 DeepSpeed module takes bf16 regions)."""
    param = next(model.parameters(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


@torch.no_grad()
def attend(model: torch.nn.Module, regions: torch.Tensor, ids: list[int],
           scorer: Scorer | XAttnConfig, saliency: np.ndarray | torch.Tensor | None = None
           ) -> tuple[float, np.ndarray]:
    """Score of one pair and its word × region attention (n, k) as described in the module doc;
    ``saliency`` (k,): the image's (``ImageSample.saliency``), which ``scan_sal`` needs."""
    scorer = as_scorer(scorer)
    device, dtype = _model_placement(model)
    was_training = model.training
    model.eval()
    try:
        k = regions.shape[0]
        lens = torch.tensor([k], device=device)
        if saliency is None:
            img = model.encode_images(regions[None].to(device, dtype), lens)  # (1, k, d)
        else:
            sal = torch.as_tensor(np.asarray(saliency))[None].to(device, dtype)  # (1, k)
            img = model.encode_images(regions[None].to(device, dtype), lens, sal)
        cap = model.encode_captions(torch.tensor([ids], device=device),
                                    torch.tensor([len(ids)], device=device))  # (1, n, d)
    finally:
        model.train(was_training)
    # the image's output positions: its regions, or a backbone top's final cells
    img_lens, cap_lens = torch.tensor([img.shape[1]], device=device), torch.tensor([len(ids)], device=device)
    pairs = torch.zeros(1, 2, dtype=torch.long, device=device)
    attn = scorer.attention(img.float(), cap.float(), cap_lens, img_lens, pairs)[0]  # (n, k)
    score = scorer(img.float(), cap.float(), cap_lens, img_lens)
    return float(score[0, 0]), attn.cpu().double().numpy()


def _tile_axes(fig: plt.Figure, index: int, cols: int, tile_px: int, size: tuple[int, int]) -> plt.Axes:
    """Axes of tile ``index`` placed in exact pixels: TITLE_PX for the word, 3 px margins."""
    width, height = size
    r, c = divmod(index, cols)
    left = c * tile_px + 3
    top = HEADER_PX + r * tile_px + TITLE_PX
    side = tile_px - 6
    box_h = tile_px - TITLE_PX - 3
    ax = fig.add_axes((left / width, 1 - (top + box_h) / height, side / width, box_h / height))
    ax.set_axis_off()
    return ax


def _draw_tile(ax: plt.Axes, picture: np.ndarray | None, heat: np.ndarray | None,
               boxes: np.ndarray, title: str, aspect: float) -> None:
    # extent (0, 1, 1, 0): normalised image coordinates with y down, as the boxes.
    extent = (0.0, 1.0, 1.0, 0.0)
    if picture is not None:
        ax.imshow(picture, extent=extent, interpolation="bilinear")
    else:
        ax.imshow(np.full((2, 2), _CANVAS_GREY), cmap="gray", vmin=0, vmax=1, extent=extent)
        for x0, y0, x1, y1 in boxes:  # without the picture, at least show where the regions are
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=0.4,
                                       edgecolor="0.6"))
    if heat is not None:
        # Opacity grows with the weight: the picture stays visible where attention is low.
        ax.imshow(heat, cmap="jet", alpha=0.15 + 0.5 * heat, vmin=0.0, vmax=1.0, extent=extent,
                  interpolation="nearest")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_aspect(aspect)  # height / width of the picture: the unit square shows undistorted
    ax.set_title(title, fontsize=10, pad=3)


def _colour_bar(fig: plt.Figure, size: tuple[int, int], bar_px: float, scale_max: float) -> None:
    """The picture's one colour scale, 0 to ``scale_max`` (the largest weight of any word), as a
    horizontal bar in the header's top right corner."""
    width, height = size
    cax = fig.add_axes(((width - bar_px - 20) / width, 1 - 30 / height, bar_px / width, 9 / height))
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0.0, scale_max or 1.0), cmap="jet"),
                       cax=cax, orientation="horizontal")
    bar.set_ticks([0.0, scale_max or 1.0], labels=["0", f"{scale_max or 1.0:.2f}"])
    bar.ax.tick_params(labelsize=7, length=2, pad=1)
    bar.ax.set_title("attention weight (all words)", fontsize=7, pad=2)


def _save_png(fig: plt.Figure, out_png: Path) -> None:
    try:
        with storage.atomic_path(out_png) as tmp:
            fig.savefig(tmp, dpi=_DPI, format="png")  # no bbox_inches: keeps the exact size
    finally:
        plt.close(fig)


def explain_pair(model: torch.nn.Module, regions: np.ndarray | torch.Tensor, caption: str,
                 text_encoder: TextEncoder, scorer: Scorer | XAttnConfig, out_png: str | os.PathLike, *,
                 boxes: np.ndarray | None = None,
                 image: str | os.PathLike | Image.Image | None = None,
                 columns: int = 5, tile_px: int = 224,
                 saliency: np.ndarray | None = None) -> dict[str, Any]:
    """Draw the attention picture of one image–caption pair into ``out_png``.

    model: has ``encode_images`` / ``encode_captions`` (``scan.model.SCANModel``);
    regions (k, D) raw region features of ONE image (e.g. ``ImageSample.regions``);
    text_encoder: the run's ``dataio.text.Vocab`` or ``HFTokenizer``;
    boxes (k, 4) normalised x0, y0, x1, y1 (``ImageSample.boxes``); None: ``layout_boxes(k)``;
    image: the original picture (local path, s3:// URL or PIL image; the extraction job records
    the path as ``meta["file"]``); None: a blank canvas with the boxes outlined;
    saliency (k,): the image's region saliency (``ImageSample.saliency``), needed by ``scan_sal``.

    Returns {"score": float, "words": [drawn words], "attention": (words, k) float array of the
    drawn words' weights (module doc), "scale_max": the top of the picture's one colour scale,
    "png": path}.
    """
    out_png = Path(out_png)
    scorer = as_scorer(scorer)
    regions = torch.as_tensor(np.asarray(regions)) if not isinstance(regions, torch.Tensor) else regions
    if regions.dim() != 2 or regions.shape[0] < 1:
        raise ValueError(f"regions: expected (k, D) features of one image, got {tuple(regions.shape)}")
    top = getattr(model, "backbone_top", None)  # cut activations in: the top's final cells out
    k = regions.shape[0] if top is None else top.cells
    boxes = layout_boxes(k) if boxes is None else np.asarray(boxes, dtype=np.float32)
    if boxes.shape != (k, 4):
        raise ValueError(f"boxes: expected ({k}, 4) for {k} regions, got {boxes.shape}")
    if columns < 1 or tile_px < 64:
        raise ValueError(f"columns must be >= 1 and tile_px >= 64; got columns={columns}, "
                         f"tile_px={tile_px}")
    tokens = tokenize(caption)
    ids = text_encoder.encode(tokens, caption)
    if not tokens or not ids:
        raise ValueError(f"caption {caption!r} has no words")
    groups = word_groups(text_encoder, tokens, caption, ids)
    score, attention = attend(model, regions, ids, scorer, saliency)  # attention (n, k)
    words = [w for w, _ in groups]
    weights = word_attention(attention, groups, scorer.attention_direction)  # (words, k)

    picture = _load_image(image, "explain_pair")
    # Heat maps at the picture's aspect ratio, at most tile size: boxes map onto it exactly.
    if picture is not None:
        scale = tile_px / max(picture.size)
        hw = (max(1, round(picture.size[1] * scale)), max(1, round(picture.size[0] * scale)))
        pixels = np.asarray(picture.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    else:
        hw, pixels = (tile_px, tile_px), None
    aspect = hw[0] / hw[1]

    size = figure_size(len(words), columns, tile_px)
    cols = min(columns, 1 + len(words))
    fig = plt.figure(figsize=(size[0] / _DPI, size[1] / _DPI), dpi=_DPI)
    head = textwrap.shorten(caption, width=2 * max(20, int(size[0] - min(160, size[0] * 0.3)) // 7),
                            placeholder=" …")
    lines = textwrap.wrap(head, width=max(20, int(size[0] - min(160, size[0] * 0.3)) // 7))[:2]
    bar_px = min(160, size[0] * 0.3)  # the colour bar, right of the caption
    fig.text(6 / size[0], 1 - 6 / size[1], "\n".join(lines + [f"score {score:.4f} ({scorer.label})"]),
             ha="left", va="top", fontsize=9)
    heats = [heat_map(w, boxes, *hw) for w in weights]
    scale_max = max(float(h.max()) for h in heats)
    _colour_bar(fig, size, bar_px, scale_max)
    _draw_tile(_tile_axes(fig, 0, cols, tile_px, size), pixels, None, boxes, "image", aspect)
    for i, (word, w, heat) in enumerate(zip(words, weights, heats), start=1):
        _draw_tile(_tile_axes(fig, i, cols, tile_px, size), pixels,
                   heat / scale_max if scale_max > 0 else heat, boxes, f"{word}  (max {w.max():.2f})",
                   aspect)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, out_png)
    log.info("attention picture of %d words (score %.4f) written to %s", len(words), score, out_png)
    return {"score": score, "words": words, "attention": weights, "scale_max": scale_max, "png": out_png}
