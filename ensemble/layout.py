"""The run directory's layout, the only interface between stages: every path in it is named here once.

    runs/<name>/
      manifest.json  config.yaml  env.json
      generalist/    model.safetensors  predictions/{val,test}-00000.safetensors ...  metrics.json  metrics.jsonl  checkpoint.pt
      cluster/       subsets.json  covariance.safetensors (or embedding.safetensors)  report.json  covariance.png  coverage.png
      specialists/   subsets.json  report.json  specialists.png
                     m000/ ...      model.safetensors  metrics.json  metrics.jsonl  checkpoint.pt
      baselines/     report.json
                     compute/ wall_clock/ inference/   model.safetensors  predictions.safetensors  metrics.jsonl  checkpoint.pt
      combiner/      eval.json  tables.md  table4.png
      distill_back/  soft_targets/{log_q,ids,log_tail}.npy progress.json  model.safetensors  metrics.jsonl  checkpoint.pt
                     control/ (the same)  report.json  report.md  distill_back.png

Each stage's folder also keeps `.stage.json`, its own copy of its manifest entry (from which an unreadable
manifest is rebuilt), and where it trains on several Ray Train workers `.ray_train/`, their checkpoints
(`TRAIN_STORAGE`; never an output). A folder that holds one trained net is a `NetDir`. Stages take the run directory as a `Path` and read it
through `RunDir`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGE_NAMES = ("generalist", "cluster", "specialists", "baselines", "combiner", "distill_back")
CHECKPOINT = "checkpoint.pt"  # a training's resumable state: never an output, never hashed
HISTORY = "metrics.jsonl"  # the training loop's per-epoch metrics
TRAIN_STORAGE = ".ray_train"  # in a stage's folder: Ray Train's checkpoints of its data-parallel trainings


@dataclass(frozen=True)
class NetDir:
    """A folder holding one trained net: its weights, metrics, per-epoch history and checkpoint."""

    folder: Path

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def history(self) -> Path:
        return self.folder / HISTORY

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT

    @property
    def predictions(self) -> Path:
        return self.folder / "predictions.safetensors"

    @property
    def prediction_folder(self) -> Path:
        """The generalist's chunked validation and test predictions (`ensemble.predictions`)."""
        return self.folder / "predictions"

    @property
    def soft_targets(self) -> Path:
        """A student's soft targets on the transfer set: .npy files filled batch by batch, and progress.json."""
        return self.folder / "soft_targets"


def specialist_name(m: int) -> str:
    """Specialist m's name, also its folder: m000, m001, ..."""
    return f"m{m:03d}"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    def stage(self, name: str) -> Path:
        """A stage's folder: everything below it is that stage's output."""
        if name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; stages: {list(STAGE_NAMES)}")
        return self.root / name

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def stage_record(self, name: str) -> Path:
        """A stage's own copy of its manifest entry, from which a damaged manifest is rebuilt (a dot file:
        not an output)."""
        return self.stage(name) / ".stage.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    # generalist
    @property
    def generalist(self) -> NetDir:
        return NetDir(self.stage("generalist"))

    # cluster
    @property
    def cluster_subsets(self) -> Path:
        return self.stage("cluster") / "subsets.json"

    @property
    def cluster_covariance(self) -> Path:
        return self.stage("cluster") / "covariance.safetensors"

    @property
    def cluster_embedding(self) -> Path:
        return self.stage("cluster") / "embedding.safetensors"

    @property
    def cluster_report(self) -> Path:
        return self.stage("cluster") / "report.json"

    # specialists
    @property
    def specialists_subsets(self) -> Path:
        """The subsets the specialists own, in head order, with the data's shape: the ensemble's definition."""
        return self.stage("specialists") / "subsets.json"

    @property
    def specialists_report(self) -> Path:
        return self.stage("specialists") / "report.json"

    def specialist(self, m: int) -> NetDir:
        return NetDir(self.stage("specialists") / specialist_name(m))

    # baselines
    def baseline(self, budget: str) -> NetDir:
        return NetDir(self.stage("baselines") / budget)

    @property
    def baselines_report(self) -> Path:
        return self.stage("baselines") / "report.json"

    # combiner
    @property
    def evaluation(self) -> Path:
        return self.stage("combiner") / "eval.json"

    @property
    def tables(self) -> Path:
        return self.stage("combiner") / "tables.md"

    # distill_back
    @property
    def student(self) -> NetDir:
        return NetDir(self.stage("distill_back"))

    @property
    def control(self) -> NetDir:
        return NetDir(self.stage("distill_back") / "control")

    @property
    def distill_report(self) -> Path:
        return self.stage("distill_back") / "report.json"
