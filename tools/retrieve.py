"""Retrieval over an evaluated gallery: text → top-K images, image → top-K captions, and an HTML page.

A ``Gallery`` is one split encoded once (``scan.eval.encode.Embeddings``, per model of an ensemble)
with the raw caption texts and the full (N, M) score matrix, computed in tiles by each model's scorer (``scan.scorers``)
(through ``scan.eval.sharded.score_tile``, so an ensemble averages its members' scores exactly
as the evaluator does) or taken from the evaluator's saved matrix (``sharded_eval.load_sims``).

Queries:
- ``ImageQuery(key)``: an image of the gallery → its row of the matrix; the relevant hits are the
  image's own captions.
- ``TextQuery(text)``: any text → encoded with each member's model (``Gallery.query_encoders``) and
  scored against every gallery image; the relevant hits are the images having a caption equal to
  the text (after tokenisation), so a gallery caption finds its own image.

Ties are broken by index (a stable sort), so results are deterministic.
"""
from __future__ import annotations

import hashlib
import html
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Sequence
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dataio import storage
from dataio.text import tokenize
from scan.eval.encode import EncodeText, encode_records
from scan.eval.tiles import Member, score_tile
from scan.precision import Precision, autocast, precision_name
from scan.scorers import Scorer
from scan.xattn import XAttnConfig

log = logging.getLogger(__name__)

# Raw text → ((1, n, d) word embeddings, (1,) length) of one model.
QueryEncoder = Callable[[str], tuple[Tensor, Tensor]]
THUMB_PX = 160  # longest side of the thumbnails on the HTML page


@dataclass
class Gallery:
    members: list[Member]  # the split encoded by each model (one model: one member)
    captions: list[str]  # (M,) raw texts; caption c belongs to image c // caps_per_image
    sims: Tensor  # (N, M) float32 scores (the ensemble mean for several members)
    # image key -> meta["file"] (the extraction job's source image path), for write_html
    image_files: dict[str, str] = field(default_factory=dict)
    query_encoders: list[QueryEncoder] = field(default_factory=list)  # one per member; [] = no text

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a gallery needs at least one encoded member")
        emb = self.members[0].emb
        shape = (emb.num_images, emb.captions.shape[0])
        if tuple(self.sims.shape) != shape or len(self.captions) != shape[1]:
            raise ValueError(f"gallery of {shape[0]} images and {shape[1]} captions: sims has shape "
                             f"{tuple(self.sims.shape)} and {len(self.captions)} caption texts were given")
        if any(m.emb.image_keys != emb.image_keys for m in self.members[1:]):
            raise ValueError("ensemble members encode different images (image_keys differ)")
        if self.query_encoders and len(self.query_encoders) != len(self.members):
            raise ValueError(f"{len(self.query_encoders)} query encoders for {len(self.members)} members")
        self._index = {key: i for i, key in enumerate(emb.image_keys)}

    @property
    def image_keys(self) -> list[str]:
        return self.members[0].emb.image_keys

    @property
    def caps_per_image(self) -> int:
        return self.members[0].emb.caps_per_image

    def image_index(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"image {key!r} is not in the gallery of {len(self._index)} images "
                           f"(e.g. {self.image_keys[:3]})") from None


@dataclass(frozen=True)
class TextQuery:
    text: str


@dataclass(frozen=True)
class ImageQuery:
    key: str


@dataclass
class Hit:
    rank: int  # 1-based
    index: int  # image index (t2i) or caption index (i2t) in the gallery
    image_key: str  # the image shown: the hit itself (t2i) or the caption's image (i2t)
    text: str | None  # the caption (i2t), None for image hits
    score: float
    relevant: bool  # ground truth: the query's own image / own caption


@dataclass
class Retrieval:
    direction: Literal["t2i", "i2t"]
    query: str  # the text, or the image key
    hits: list[Hit]
    first_relevant: int | None  # 1-based rank of the best relevant item over the WHOLE gallery

    def to_dict(self) -> dict:
        return asdict(self)


def _query_encoder(model: torch.nn.Module, encode_text: EncodeText, device: torch.device,
                   dtype: torch.dtype) -> QueryEncoder:
    @torch.no_grad()
    def encode(text: str) -> tuple[Tensor, Tensor]:
        ids = encode_text(tokenize(text), text)
        if not ids:
            raise ValueError(f"text query {text!r} has no words")
        was_training = model.training
        model.eval()
        try:
            # The same autocast as encode_records, so a gallery caption scores as in ``sims``.
            with autocast(device, precision_name(dtype)):
                words = model.encode_captions(torch.tensor([ids], device=device),
                                              torch.tensor([len(ids)], device=device))
        finally:
            model.train(was_training)
        return words.to("cpu", dtype), torch.tensor([words.shape[1]])  # pooled models: 1

    return encode


def build_gallery(models: Sequence[tuple[torch.nn.Module, Scorer | XAttnConfig]], records: Iterable, *,
                  encode_text: EncodeText, caps_per_image: int, precision: Precision = "bf16",
                  batch_size: int = 128, memory_budget_mb: int = 1024,
                  device: torch.device | str = "cpu", sims: np.ndarray | Tensor | None = None) -> Gallery:
    """Encode ``records`` (``dataio.shards.ImageSample``, e.g. ``dataio.pipeline.image_records``)
    with every model (an ensemble when several) and score every image against every caption.

    The records are held in memory once (every model reads them). ``sims`` (N, M): reuse a matrix the
    evaluator saved for exactly these models and records instead of scoring again.
    """
    records = list(records)
    if not records:
        raise ValueError("build_gallery: no records (empty split?)")
    device = torch.device(device)
    members, encoders = [], []
    for model, scorer in models:
        emb = encode_records(model, records, encode_text=encode_text, caps_per_image=caps_per_image,
                             precision=precision, batch_size=batch_size, device=device)
        members.append(Member(emb, scorer))
        encoders.append(_query_encoder(model, encode_text, device, emb.images.dtype))
    if sims is None:
        sims = score_tile(members, slice(None), slice(None), memory_budget_mb=memory_budget_mb)
    # A copy: the evaluator's saved matrix is a read-only memory map.
    sims = sims.float() if isinstance(sims, Tensor) else torch.from_numpy(np.array(sims, np.float32))
    captions = [c for r in records for c in r.captions]
    files = {r.key: str(r.meta["file"]) for r in records if r.meta.get("file")}
    log.info("gallery: %d images, %d captions, %d model(s)", len(records), len(captions), len(members))
    return Gallery(members, captions, sims, files, encoders)


def _top(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Highest first, ties by lower index (stable sort): (values (k,), indices (k,))."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return scores[order], order


def _first_relevant(scores: Tensor, relevant: Tensor) -> int | None:
    """1-based rank of the best relevant item: 1 + the other (irrelevant) items scoring at least as
    high, as the evaluator counts ranks (ties count against the query)."""
    if not bool(relevant.any()):
        return None
    best = scores[relevant].max()
    return int(((scores >= best) & ~relevant).sum()) + 1


def _text_scores(gallery: Gallery, text: str) -> Tensor:
    if not gallery.query_encoders:
        raise ValueError("this gallery has no query encoders (built without models), so it cannot "
                         "score a free-text query; build it with build_gallery")
    total = None
    for member, encode in zip(gallery.members, gallery.query_encoders):
        words, lens = encode(text)  # (1, n, d), (1,)
        emb = member.emb
        s = member.scorer(emb.images, words.to(emb.images.dtype), lens, emb.img_lens)[:, 0].float()  # (N,)
        total = s if total is None else total + s
    assert total is not None
    return total / len(gallery.members)


def retrieve(gallery: Gallery, query: TextQuery | ImageQuery, k: int = 5) -> Retrieval:
    """Top-``k`` images of a text query or top-``k`` captions of a gallery image."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keys, cpi = gallery.image_keys, gallery.caps_per_image
    if isinstance(query, ImageQuery):
        i = gallery.image_index(query.key)
        scores = gallery.sims[i]  # (M,)
        relevant = torch.arange(scores.shape[0]) // cpi == i
        values, order = _top(scores, k)
        hits = [Hit(r + 1, int(j), keys[int(j) // cpi], gallery.captions[int(j)], float(v),
                    bool(relevant[j])) for r, (v, j) in enumerate(zip(values, order))]
        return Retrieval("i2t", query.key, hits, _first_relevant(scores, relevant))
    if isinstance(query, TextQuery):
        scores = _text_scores(gallery, query.text)  # (N,)
        words = tokenize(query.text)
        own = {c // cpi for c, caption in enumerate(gallery.captions) if tokenize(caption) == words}
        relevant = torch.tensor([i in own for i in range(len(keys))])
        values, order = _top(scores, k)
        hits = [Hit(r + 1, int(i), keys[int(i)], None, float(v), bool(relevant[i]))
                for r, (v, i) in enumerate(zip(values, order))]
        return Retrieval("t2i", query.text, hits, _first_relevant(scores, relevant))
    raise TypeError(f"query must be a TextQuery or an ImageQuery, got {type(query).__name__}")


def format_results(results: Sequence[Retrieval]) -> str:
    """Plain-text listing for the terminal; ``*`` marks the ground truth."""
    lines = []
    for res in results:
        where = f"ground truth at rank {res.first_relevant}" if res.first_relevant else "no ground truth"
        lines.append(f"{res.direction}  query: {res.query}  ({where})")
        for h in res.hits:
            what = h.image_key if h.text is None else f"{h.text}  [{h.image_key}]"
            lines.append(f"  {h.rank:>3}{'*' if h.relevant else ' '} {h.score:8.4f}  {what}")
    return "\n".join(lines)


def _thumbnail(src: Path, thumbs: Path) -> str:
    """A JPEG thumbnail of ``src`` in ``thumbs`` (name from the source path, so reruns reuse it);
    returns its file name. Written through a temporary name."""
    name = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:16] + ".jpg"
    target = thumbs / name
    if not target.exists():
        with Image.open(src) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            with storage.atomic_path(target) as tmp:
                img.save(tmp, format="JPEG", quality=85)
    return name


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
section{margin-bottom:2em}h2{font-size:1.05em;margin:.2em 0}.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:.8em}figure.rel{outline:3px solid #2a2}
img,.missing{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.missing{display:flex;align-items:center;justify-content:center;text-align:center;word-break:break-all}
ol{margin:.3em 0}li.rel{font-weight:bold;color:#171}.score{color:#777}"""


def write_html(results: Sequence[Retrieval], out_html: str | os.PathLike,
               image_paths: Mapping[str, str | os.PathLike]) -> Path:
    """A static page of the results. ``image_paths`` maps image keys to local image files (e.g.
    ``Gallery.image_files``); each is copied as a thumbnail into ``<page name>_files/`` next to
    the page and referenced relatively, so the folder can be moved or served as is. Keys without a
    readable file (precomputed features, generated scenes) show as a grey box with the key. Every
    text on the page is HTML-escaped.
    """
    out_html = Path(out_html)
    thumbs = out_html.parent / f"{out_html.stem}_files"
    thumbs.mkdir(parents=True, exist_ok=True)
    cache: dict[str, str | None] = {}

    def picture(key: str) -> str:
        if key not in cache:
            path = image_paths.get(key)
            cache[key] = None
            if path is not None and Path(path).is_file():
                try:
                    cache[key] = f"{quote(thumbs.name)}/{quote(_thumbnail(Path(path), thumbs))}"
                except OSError as exc:
                    log.warning("image %s of %r cannot be read for the page: %s", path, key, exc)
        src = cache[key]
        if src is None:
            return f'<div class="missing">{html.escape(key)}</div>'
        return f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(key, quote=True)}">'

    parts = []
    for res in results:
        found = f"ground truth at rank {res.first_relevant}" if res.first_relevant else "no ground truth"
        if res.direction == "t2i":
            head = f"text → images: “{html.escape(res.query)}”"
            body = "".join(
                f'<figure class="{"rel" if h.relevant else ""}">{picture(h.image_key)}'
                f'<figcaption>{h.rank}. {html.escape(h.image_key)} '
                f'<span class="score">{h.score:.4f}</span></figcaption></figure>' for h in res.hits)
            body = f'<div class="row">{body}</div>'
        else:
            head = f"image → captions: {html.escape(res.query)}"
            items = "".join(
                f'<li class="{"rel" if h.relevant else ""}">{html.escape(h.text or "")} '
                f'<span class="score">{h.score:.4f} · {html.escape(h.image_key)}</span></li>'
                for h in res.hits)
            body = f'<div class="row"><figure>{picture(res.query)}</figure><ol>{items}</ol></div>'
        parts.append(f"<section><h2>{head}</h2><p class=\"score\">{found}</p>{body}</section>")
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>SCAN retrieval</title>"
            f"<style>{_STYLE}</style></head><body><h1>SCAN retrieval</h1>"
            "<p>Green: ground truth (the query's own image or caption).</p>"
            + "\n".join(parts) + "</body></html>\n")
    storage.write_text_atomic(out_html, page)
    log.info("retrieval page with %d queries written to %s", len(results), out_html)
    return out_html
