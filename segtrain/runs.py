"""Run folders: where a fit writes, how an existing one is protected, and how eval/predict find one."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras

from segtrain.atomic import atomic_path
from segtrain.errors import CheckpointError

RUNS_DIR = Path("runs")
RUN_INFO = "run.json"
"""Facts about a run that the config does not hold (input channels, segtrain version)."""


def default_run_dir(config_path: str | Path) -> Path:
    """runs/<config file stem>."""
    return RUNS_DIR / Path(config_path).stem


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, multi_worker: bool = False) -> None:
    """Refuse to write into an existing run folder unless asked to resume or overwrite."""
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite contradict each other; pick one.")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: exists and is not a folder; choose another --out.")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / "checkpoints").is_dir():
            raise CheckpointError(f"{run_dir}: no checkpoints to resume from. Run without --resume to start a new run.")
    elif exists and not overwrite and not (multi_worker and _non_chief_worker()):
        raise CheckpointError(
            f"{run_dir}: run folder already exists. Use --resume to continue it, --overwrite to replace it, "
            "or --out DIR to write elsewhere."
        )


RESUMABLE_CHANGES = ("train.epochs", "train.early_stopping_patience", "train.keep_checkpoints",
                     "train.checkpoint_every_steps", "train.steps_per_execution", "train.jit_compile")
"""Config keys a resumed run may change; any other change would not continue the same run."""


def check_resume_config(config, run_dir: Path) -> None:
    """On --resume, the config must be the run's own config.yaml, except for RESUMABLE_CHANGES and predict.*."""
    from segtrain.config import load_config

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    new, old = _flatten(config.to_dict()), _flatten(load_config(saved_path).to_dict())
    changed = sorted(k for k in set(new) | set(old)
                     if new.get(k) != old.get(k) and k not in RESUMABLE_CHANGES and not k.startswith("predict."))
    if changed:
        shown = ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
        raise CheckpointError(
            f"--resume: this config differs from the run's own ({saved_path}) in {shown}, so the run would not "
            f"continue as it started. Resume with: segtrain fit {saved_path} --resume --out {run_dir} "
            "(add --set train.epochs=N to train longer)."
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "loss" and not (prefix and prefix.startswith("data.mask")):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _non_chief_worker() -> bool:
    """A non-chief worker of a multi-worker run (TF_CONFIG) never writes the run folder, so it need not be new."""
    from segtrain.engine.devices import is_non_chief_process

    return is_non_chief_process()


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create (or, with overwrite, empty) the run folder; call only after every input check passed."""
    if overwrite and run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save a .keras file atomically, so a kill mid-write leaves the previous one usable."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def newest_run_dir() -> Path:
    """The most recently modified run folder under runs/ that holds a model."""
    candidates = [p for p in RUNS_DIR.glob("*") if (p / "best.keras").is_file() or (p / "last.keras").is_file()]
    if not candidates:
        raise CheckpointError(f"no trained run found under {RUNS_DIR}/. Train one with `segtrain fit CONFIG` or pass --checkpoint.")
    return max(candidates, key=lambda p: max((p / n).stat().st_mtime for n in ("best.keras", "last.keras") if (p / n).exists()))


def resolve_checkpoint(checkpoint: str | Path | None) -> tuple[Path, Path]:
    """(model file, run folder) from a run folder or a .keras file; the run folder holds config.yaml."""
    if checkpoint is None:
        run_dir = newest_run_dir()
        model_path = run_dir / "best.keras" if (run_dir / "best.keras").exists() else run_dir / "last.keras"
        return model_path, run_dir
    path = Path(checkpoint)
    if path.is_dir():
        for name in ("best.keras", "last.keras"):
            if (path / name).is_file():
                return path / name, path
        raise CheckpointError(f"{path}: no best.keras or last.keras in this folder. Is it a finished run folder?")
    if path.is_file():
        if path.suffix != ".keras":
            raise CheckpointError(f"{path}: expected a run folder or a .keras model file.")
        return path, path.parent
    raise CheckpointError(f"{path}: checkpoint not found. Pass a run folder (e.g. runs/roads) or a .keras file.")


def run_config(run_dir: Path):
    """The resolved config a run saved (config.yaml beside the model)."""
    from segtrain.config import load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: no config.yaml beside the model; eval and predict need the run's config "
            "(class names, mask encoding). Point --checkpoint at a run folder made by `segtrain fit`."
        )
    return load_config(path)


def load_model(path: Path) -> keras.Model:
    """Load a .keras model with Keras's safe mode on (no arbitrary code)."""
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises several types for a bad file
        raise CheckpointError(f"{path}: cannot load the model ({type(exc).__name__}: {exc}).") from None
