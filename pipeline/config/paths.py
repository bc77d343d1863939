"""Every path, file name and environment variable the stages share, in one place.

Stages receive their input and output directories on the command line from
``dvc.yaml``; the defaults here are what ``dvc.yaml`` passes, so that a notebook
or a test calling a stage's functions directly finds the same files.
"""

from __future__ import annotations

import os
from pathlib import Path

PARAMS_FILE = Path("params.yaml")
# The repository's own params.yaml, wherever the current directory is: the one source of
# every setting's value, which code and tests needing a whole section read
# (``Section.defaults``, ``params.default_params``).
PACKAGE_DIR = Path(__file__).resolve().parents[1]   # the pipeline package
REPO_ROOT = PACKAGE_DIR.parent
REPO_PARAMS_FILE = REPO_ROOT / PARAMS_FILE.name

DATA_DIR = Path("data")
RAW_DIR = DATA_DIR / "raw"                      # versioned by data.dvc
DOWNLOADS_DIR = DATA_DIR / "downloads"          # partial and unextracted archives, not versioned
DOWNLOAD_RECEIPT = DATA_DIR / "download.json"   # output of the download stage
PREPARED_DIR = DATA_DIR / "prepared"            # output of the prepare stage

MODELS_DIR = Path("models")
TRAIN_OUT = MODELS_DIR / "train"                # output of the train stage: best model + metadata
METRICS_DIR = Path("metrics")
EVAL_OUT = Path("evaluation")                   # output of the evaluate stage: overlays + index.json
EVAL_REPORT = EVAL_OUT / "evaluate.json"        # ... its whole report (what the register stage reads)
EVAL_METRICS = METRICS_DIR / "evaluate.json"    # ... its DVC metrics (the headline scores)
PLOTS_DIR = METRICS_DIR / "plots"               # DVC plots data, a folder per stage (files by task):
TRAIN_PLOTS = PLOTS_DIR / "train"               # ... the best epoch's per-class validation scores
EVAL_PLOTS = PLOTS_DIR / "evaluate"             # ... per-class test scores, confusion or precision-recall
TRAIN_METRICS = METRICS_DIR / "train.json"      # the train stage's DVC metrics
REGISTER_OUT = MODELS_DIR / "registry.json"     # output of the register stage: the champion decision
RAY_RESULTS = Path("ray_results")               # Ray Train storage: checkpoints, resume state
PROGRESS_DIR = "progress"                       # in a Ray run's folder: one JSON file per epoch, by rank 0
MLFLOW_DB = Path("mlflow.db")                   # embedded MLflow store (sqlite) ...
MLFLOW_ARTIFACTS = Path("mlruns")               # ... and its artifact folder

# Files inside the prepared dataset directory.
CLASSES_FILE = "classes.json"
CARD_JSON = "card.json"
CARD_MD = "card.md"
PROBLEMS_FILE = "problems.json"
SPLITS = ("train", "val", "test")

# Environment variables. A mirror is a local directory looked at before the network.
ENV_DATA_MIRROR = "SEG_DATA_MIRROR"
# Pretrained encoder weight files, looked at instead of the model hub (see pipeline.models.base).
ENV_WEIGHTS_DIR = "SEG_WEIGHTS_DIR"
# Shared storage of a cluster whose nodes share no disk (pipeline.artifacts.storage): the root,
# s3://bucket/prefix or a local folder (unset: the repository's folders), and the endpoint of an
# S3-compatible store (unset: AWS). Credentials: the usual AWS_* variables.
ENV_STORAGE_URI = "SEG_STORAGE_URI"
ENV_S3_ENDPOINT_URL = "SEG_S3_ENDPOINT_URL"
# Level of Ray's own console logging (Ray Core, Train, Data) in the stages; WARNING when unset.
ENV_RAY_LOG_LEVEL = "SEG_RAY_LOG_LEVEL"


def repo_root() -> Path:
    """The repository the stages run for: ``$DVC_ROOT`` (which DVC sets for stage commands,
    and points at the parent repository for experiments run in a temporary copy), else the
    current directory. Stores shared across experiments (MLflow) live here."""
    return Path(os.environ.get("DVC_ROOT", "").strip() or ".")


def env_dir(name: str) -> Path | None:
    """The directory named by environment variable ``name`` (made absolute), or None
    when it is unset.

    A set but missing directory is an error rather than a silent fall-through to the
    network: a typo in the variable should not start a download of gigabytes.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name}={value!r} is not a directory")
    return path.resolve()


def data_mirror() -> Path | None:
    """The dataset mirror directory, ``$SEG_DATA_MIRROR``."""
    return env_dir(ENV_DATA_MIRROR)


def weights_dir() -> Path | None:
    """The pretrained encoder weights directory, ``$SEG_WEIGHTS_DIR``."""
    return env_dir(ENV_WEIGHTS_DIR)
