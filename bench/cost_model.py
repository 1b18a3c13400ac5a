"""The cost model: disk, memory and multiply-adds of each stage as formulas in the run's shape, checked
against the measured scale runs, then evaluated for shapes this machine cannot run.

    python bench/cost_model.py

Shapes: N_t training, N_v held-out and N_e test images, C classes, M specialists of S classes, k kept
probabilities per example (generalist.top_k), k' kept soft targets (distill_back.top_k), d embedding
dimensions (0: the C×C matrix), a mean active specialists per example, P and W the multiply-adds per
example and the parameters of the generalist (P_s, W_s: a specialist's), p the bytes of an image, E the
epochs of each training. Each stage's formula keeps the terms that dominate at scale (`STAGES` below,
one line each), memory above the process's own (`base_rss`: Python, torch and Ray imported); measured
rows come from bench/results/scale_*.json (`bench/scale.py`), whose `outputs_mb` counts every file of
the stage, checkpoints included, and `peak_rss_gb` the stage process's resident memory. The paper-scale rows take the nets' sizes as arguments (JFT: an Inception-like generalist of
5.7 G multiply-adds and 24 M parameters whose head is 2,048 × C; the paper gives neither exactly).
Results: bench/results/cost_model.{json,md}.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from common import RESULTS, write_results

from ensemble.config import load_config
from ensemble.cost import multiply_adds, parameters
from ensemble.nets import build_net

ROOT = Path(__file__).resolve().parents[1]
GB, MB = 2**30, 2**20
BLOCK = 2**28  # the combiner stage's block of (images × classes) float64 (combiner/stage.py BLOCK_BYTES)
SAMPLE = 4096  # images a specialist's start passes through the generalist (specialists/heads.py DUSTBIN_SAMPLE)


@dataclass(frozen=True)
class Shape:
    name: str
    n_t: float  # training images
    n_v: float  # held-out
    n_e: float  # test
    c: int  # classes
    m: int  # specialists
    s: int  # classes per specialist
    k: int | None  # generalist.top_k (None: dense)
    k_soft: int | None  # distill_back.top_k
    d: int  # embedding dimensions (0: the C×C matrix)
    a: float  # active specialists per example
    p_g: float  # generalist multiply-adds per example
    w_g: float  # generalist parameters
    p_s: float  # specialist multiply-adds per example
    w_s: float  # specialist parameters
    pixels: int  # bytes per image held in memory (0: streamed)
    batch: int = 2048  # the evaluation's batch (eval_batch_size)
    e_g: float = 2
    e_s: float = 1
    e_d: float = 1
    control: bool = False  # distill_back's self-distilled control (a second student)


def kept(k: int | None, c: int) -> int:
    """Values stored per example: k, or C where the dense form is kept (k = None or 2k ≥ C)."""
    return c if k is None or 2 * k >= c else k


def predictions_bytes(sh: Shape) -> float:
    """The generalist's held-out and test predictions: probs + ids (or + logits, dense), rest and label."""
    return (sh.n_v + sh.n_e) * (8 * kept(sh.k, sh.c) + 12)


def soft_bytes(sh: Shape) -> float:
    """A student's soft targets: log q and ids per kept class, and the tail (dense: log q alone)."""
    k = kept(sh.k_soft, sh.c)
    return sh.n_t * (4 * k if k == sh.c else 8 * k + 4)


def stages(sh: Shape, base: float = 0) -> dict[str, dict[str, float]]:
    """Per stage: disk (bytes; weights + checkpoints = 16 bytes per parameter), peak memory (bytes: the
    dominant terms, above `base`, the process before any data) and multiply-adds."""
    images = base + (sh.n_t + sh.n_v + sh.n_e) * sh.pixels
    matrix = 8 * sh.c * (sh.d + 10) * 3 if sh.d else 8 * sh.c**2 * 3  # embedding basis, its image and QR; or C×C
    block = min(BLOCK, 8 * sh.c * 2048)  # one (images × classes) float64 tensor of the combiner's block
    specialist_examples = sh.m * sh.e_s * 2 * sh.s / sh.c * sh.n_t  # half of each batch in the subset
    students = 2 if sh.control else 1
    return {
        "generalist": {"disk": 16 * sh.w_g + predictions_bytes(sh),  # predictions: float32 logits, float64 softmax
                       "memory": images + 16 * sh.w_g + 20 * sh.batch * sh.c,
                       "macs": (3 * sh.e_g * sh.n_t + (sh.e_g + 1) * sh.n_v + sh.n_e) * sh.p_g},
        "cluster": {"disk": 8 * sh.c * (sh.d or sh.c),
                    "memory": images + 12 * sh.n_v * kept(sh.k, sh.c) + matrix,
                    "macs": sh.n_v * kept(sh.k, sh.c) ** 2 if not sh.d else 16 * sh.n_v * kept(sh.k, sh.c) * sh.d},
        "specialists": {"disk": 16 * sh.m * sh.w_s, "memory": images + 16 * sh.w_g + 4 * sh.batch * sh.c,
                        "macs": 3 * specialist_examples * sh.p_s + sh.m * min(SAMPLE, sh.n_t) * sh.p_g + sh.n_e * sh.p_g},
        "combiner": {"disk": 0, "memory": images + 4 * (sh.w_g + sh.m * sh.w_s) + 6 * block,
                     "macs": sh.n_e * (sh.p_g + sh.a * sh.p_s)},
        "distill_back": {"disk": students * (soft_bytes(sh) + 16 * sh.w_g),
                         "memory": images + 4 * (sh.w_g + sh.m * sh.w_s) + 16 * sh.w_g + 6 * block,  # + the
                         #   soft targets, memory-mapped: in the page cache as far as it holds them
                         "macs": sh.n_t * (sh.p_g + sh.a * sh.p_s) + students * 3 * sh.e_d * sh.n_t * sh.p_g
                         + sh.n_e * (3 * sh.p_g + sh.a * sh.p_s)},
    }


def from_config(path: str, active: float) -> Shape:
    """The shape of a synthetic scale config, the nets' sizes counted on the nets themselves."""
    cfg = load_config(ROOT / path, [])
    d = cfg.data
    c, shape = d.num_classes, (1, d.image_size, d.image_size)
    m = round(math.sqrt(c)) if cfg.cluster.num_subsets is None else cfg.cluster.num_subsets
    s = cfg.cluster.subset_size or math.ceil(1.5 * c / m)
    generalist = build_net(cfg.generalist.net, shape, c, "generalist.net")
    specialist = build_net(cfg.generalist.net, shape, s + 1, "generalist.net")
    n = d.train_per_class * c
    return Shape(cfg.name, n * (1 - d.val_fraction), n * d.val_fraction, d.test_per_class * c, c, m, s,
                 cfg.generalist.top_k, cfg.distill_back.top_k, 256 if c > 4096 else 0, active,
                 multiply_adds(generalist, shape), parameters(generalist), multiply_adds(specialist, shape),
                 parameters(specialist), d.image_size**2, cfg.generalist.train.eval_batch_size,
                 cfg.generalist.train.epochs, cfg.specialists.train.epochs, cfg.distill_back.train.epochs,
                 cfg.distill_back.control)


def base_rss() -> float:
    """Bytes a stage's process holds before any data: Python, torch, Ray and the stages imported."""
    code = ("import resource, torch, ensemble.pipeline, combiner, distill_back, cluster, specialists, baselines; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout) * 1024


def paper_scale() -> list[Shape]:
    """JFT's shape (100 M images, 15,000 classes, 61 specialists of 300) and a million classes, with an
    Inception-like net (trunk 5.7 G multiply-adds, 22 M parameters, a 2,048-wide head), 299×299×3 JPEGs
    of ~100 KB streamed (p counts the images held in memory: none), top-k 32, 1% held out."""
    trunk_p, trunk_w, width = 5.7e9, 22e6, 2048
    rows = []
    for name, n, c, m, s in (("JFT (100 M images, 15,000 classes)", 100e6, 15_000, 61, 300),
                             ("1,000,000 classes (100 M images)", 100e6, 1_000_000, 1000, 1500)):
        rows.append(Shape(name, n * 0.99, n * 0.01, 1e6, c, m, s, 32, 32, 256, 1.2,
                          trunk_p + width * c, trunk_w + width * c, trunk_p + width * (s + 1),
                          trunk_w + width * (s + 1), 0, batch=256, e_g=10, e_s=1, e_d=1))
    return rows


def main() -> None:
    measured = {"default": "scale_default", "scale15k": "scale_15k", "scale100k": "scale_100k"}
    base, rows = base_rss(), []
    for config, result in measured.items():
        path = RESULTS / f"{result}.json"
        runs = json.loads(path.read_text()) if path.is_file() else None
        stage_rows = {r["stage"]: r for r in runs["rows"]} if runs else {}
        active = (runs or {}).get("meta", {}).get("inference", {}).get("active", 1.2)
        shape = from_config(f"configs/{config}.yaml", active)
        for stage, cost in stages(shape, base).items():
            got = stage_rows.get(stage, {})
            rows.append({"shape": shape.name, "stage": stage, "disk_mb": round(cost["disk"] / MB, 1),
                         "measured_disk_mb": got.get("outputs_mb"), "memory_gb": round(cost["memory"] / GB, 2),
                         "measured_peak_gb": got.get("peak_rss_gb"), "gmacs": round(cost["macs"] / 1e9, 1),
                         "measured_s": got.get("wall_s")})
    for shape in paper_scale():
        for stage, cost in stages(shape, base).items():
            rows.append({"shape": shape.name, "stage": stage, "disk_mb": round(cost["disk"] / MB),
                         "memory_gb": round(cost["memory"] / GB, 1), "gmacs": round(cost["macs"] / 1e9)})
        dense = replace(shape, k=None, k_soft=None, d=0)
        rows.append({"shape": shape.name, "stage": "dense instead (k = C, C×C)",
                     "disk_mb": round(sum(v["disk"] for v in stages(dense, base).values()) / MB),
                     "memory_gb": round(max(v["memory"] for v in stages(dense, base).values()) / GB, 1)})
    write_results("cost_model", rows, {"base_rss_gb": round(base / GB, 2)})


if __name__ == "__main__":
    main()
