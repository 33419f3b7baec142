"""Selective-search boxes and their crops (numpy and OpenCV only; no torch, so the extraction
config can name `ProposalConfig` without loading a model). `scan.features.proposals` encodes them.

OpenCV ranks selective search's regions by level × the C library's `rand()`, whose state is one
per process and shared by every thread. Resetting it per image (`selective_search_boxes`) makes an
image's boxes independent of the images searched before, but not of other threads: Ray's core
worker (`_raylet.so` imports `rand`) draws from it on its own threads, and measured with Ray running
in the process, 1 to 3 of 40 photos got other boxes on each pass. `BoxSearch` therefore runs the
search in a helper process of its own, where nothing else draws from `rand()`.
"""
from __future__ import annotations

import ctypes
import functools
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("grid", "proposals", "grid+proposals")


@dataclass(frozen=True)
class ProposalConfig:
    count: int = 19  # boxes per image (besides the whole image)
    crop_size: int = 128  # pixel size each box is resized to for the backbone
    search_size: int = 112  # selective search runs on a copy of this size (4x faster than 224)
    min_area: float = 0.04  # smallest box, as a fraction of the image
    max_aspect: float = 4.0
    nms_iou: float = 0.5
    seed: int = 0  # of the C library's rand(), reset for every image (see selective_search_boxes)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _fill_boxes() -> list[tuple[float, float, float, float]]:
    """Fixed boxes that top up images with few distinct proposals: quadrants, 3 × 3 cells, centres."""
    boxes = [(i / 2, j / 2, (i + 1) / 2, (j + 1) / 2) for j in range(2) for i in range(2)]
    boxes += [(i / 3, j / 3, (i + 1) / 3, (j + 1) / 3) for j in range(3) for i in range(3)]
    boxes += [(0.1 * i, 0.1 * i, 1 - 0.1 * i, 1 - 0.1 * i) for i in range(1, 5)]
    return boxes


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)  # the process's C library, whose rand() OpenCV's selective search calls


def selective_search_boxes(pixels: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    """(S, S, 3) uint8 RGB -> (cfg.count, 4) float32 normalised x0, y0, x1, y1 boxes."""
    import cv2  # opencv-contrib-python-headless: only this region mode needs it

    side = cfg.search_size
    small = cv2.resize(np.ascontiguousarray(pixels[:, :, ::-1]), (side, side), interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(small)
    search.switchToSelectiveSearchFast()
    # OpenCV ranks the hierarchy's regions by level × rand() (libc's): without a reset, an image's
    # boxes would depend on how many images its process searched before (order, workers, retries).
    _libc().srand(cfg.seed)
    kept: list[tuple[float, float, float, float]] = []
    for x, y, w, h in search.process():
        if w * h < cfg.min_area * side * side or max(w / h, h / w) > cfg.max_aspect:
            continue
        box = (x / side, y / side, (x + w) / side, (y + h) / side)
        if all(_iou(box, k) < cfg.nms_iou for k in kept):
            kept.append(box)
            if len(kept) == cfg.count:
                break
    # topped up with the fixed boxes; counts above their 17 repeat the whole image
    kept += _fill_boxes() + [(0.0, 0.0, 1.0, 1.0)] * cfg.count
    return np.asarray(kept[:cfg.count], dtype=np.float32)


class BoxSearch:
    """`selective_search_boxes` in a one-thread helper process (see the module docstring), started
    on first use; one request per batch, so the caller can encode the grid while it searches."""

    def __init__(self, cfg: ProposalConfig):
        self.cfg = cfg
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            root = str(Path(__file__).resolve().parents[2])  # the folder that holds `scan`
            path = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
            self._proc = subprocess.Popen([sys.executable, "-m", "scan.features.proposal_boxes"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return self._proc

    def submit(self, pixels: np.ndarray) -> None:
        """(B, S, S, 3) uint8: start searching every image; `result` collects the boxes."""
        proc = self._start()
        pickle.dump((self.cfg, np.ascontiguousarray(pixels)), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.flush()

    def result(self) -> list[np.ndarray]:
        """The submitted batch's boxes, one (cfg.count, 4) float32 array per image."""
        try:
            status, value = pickle.load(self._proc.stdout)
        except EOFError:
            raise RuntimeError(f"the selective-search helper process exited (code {self._proc.wait()}); "
                               "its error is on stderr above") from None
        if status != "ok":
            raise RuntimeError(f"selective search failed in its helper process: {value}")
        return value

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        self.submit(pixels)
        return self.result()

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # the helper exits at end of input
            self._proc.wait()
            self._proc = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the helper exits with its closed stdin anyway
            pass


def _serve() -> None:
    """The helper's loop: (cfg, (B, S, S, 3) uint8) requests in, ("ok", boxes) replies out."""
    import cv2

    cv2.setNumThreads(1)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies on the pipe
    while True:
        try:
            cfg, pixels = pickle.load(inp)
        except EOFError:
            return
        try:
            reply = ("ok", [selective_search_boxes(p, cfg) for p in pixels])
        except Exception as err:  # reported to the caller, which names it
            reply = ("error", f"{type(err).__name__}: {err}")
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


def crop_pixels(pixels: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(S, S, 3) uint8 and (n, 4) normalised boxes -> (n, size, size, 3) uint8 crops (bilinear)."""
    s = pixels.shape[0]
    crops = []
    for x0, y0, x1, y1 in boxes:
        left, top = int(round(x0 * s)), int(round(y0 * s))
        right, bottom = max(int(round(x1 * s)), left + 2), max(int(round(y1 * s)), top + 2)
        crop = Image.fromarray(pixels[top:bottom, left:right])
        crops.append(np.asarray(crop.resize((size, size), Image.BILINEAR)))
    return np.stack(crops)


def check_opencv() -> str:
    """The OpenCV version, or ImportError saying what to install."""
    try:
        import cv2
    except ImportError as err:
        raise ImportError("regions=proposals needs OpenCV's selective search: pip install "
                          "opencv-contrib-python-headless (scripts/setup.sh installs it)") from err
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(f"OpenCV {cv2.__version__} has no ximgproc (selective search): install "
                          "opencv-contrib-python-headless, not opencv-python")
    return cv2.__version__


if __name__ == "__main__":
    _serve()
