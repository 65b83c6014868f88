"""Run folders: where a fit writes, how an existing one is protected, and how eval/predict find one."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from segtrain.atomic import atomic_path
from segtrain.cluster import is_non_chief_process
from segtrain.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # Keras (TensorFlow) loads only where a model is read or written, not to check a path
    import keras

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
    """On --resume, the config must be the run's own config.yaml, except for RESUMABLE_CHANGES, predict.* and
    tracking.* (tracking may be switched on or pointed elsewhere: the MLflow run id is in RUN/tracking.json)."""
    from segtrain.config import load_config

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    new, old = _flatten(config.to_dict()), _flatten(load_config(saved_path).to_dict())
    free = ("predict.", "tracking.")
    changed = sorted(k for k in set(new) | set(old)
                     if new.get(k) != old.get(k) and k not in RESUMABLE_CHANGES and not k.startswith(free))
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
    return is_non_chief_process()


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create (or, with overwrite, empty) the run folder; call only after every input check passed."""
    if overwrite and run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def save_model_atomic(model: "keras.Model", path: Path) -> None:
    """Save a .keras file atomically, so a kill mid-write leaves the previous one usable."""
    with atomic_path(path) as tmp:
        model.save(tmp)


MODEL_FILES = ("best.keras", "last.keras")
"""The model files of a run folder, in the order a run folder is read."""

RUN_FOLDER_HINT = "Pass a run folder written by `segtrain fit` (it holds best.keras and config.yaml)"


def _model_files(run_dir: Path) -> list[Path]:
    return [run_dir / name for name in MODEL_FILES if (run_dir / name).is_file()]


def newest_run_dir() -> Path:
    """The most recently modified run folder under runs/ that holds a model."""
    candidates = [p for p in RUNS_DIR.glob("*") if _model_files(p)]
    if not candidates:
        raise CheckpointError(f"no trained run found under {RUNS_DIR.absolute()}/. Train one with "
                              "`segtrain fit CONFIG`.")
    return max(candidates, key=lambda p: max(f.stat().st_mtime for f in _model_files(p)))


def newest_run_hint() -> str:
    """Where the newest run is, as a suggestion for a command given none (never chosen silently)."""
    try:
        return f"the newest run under {RUNS_DIR}/ is {newest_run_dir()}"
    except CheckpointError:
        return f"there is no trained run under {RUNS_DIR.absolute()}/; train one with `segtrain fit CONFIG`"


def is_run_path(path: str | Path) -> bool:
    """A run folder (with best.keras or last.keras, or config.yaml) or a .keras file: what RUN may name."""
    path = Path(path)
    if path.is_dir():
        return bool(_model_files(path)) or (path / "config.yaml").is_file()
    return path.suffix == ".keras"


def resolve_checkpoint(checkpoint: str | Path | None) -> tuple[Path, Path]:
    """(model file, run folder) from a run folder or a .keras file; the run folder holds config.yaml.

    None is refused, naming the newest run as a suggestion (`newest_run_hint`): a command never guesses which run
    it reads."""
    if checkpoint is None:
        raise CheckpointError(f"no run named: pass a run folder written by `segtrain fit` (or one of its .keras "
                              f"files); {newest_run_hint()}.")
    path = Path(checkpoint)
    where = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
    if path.is_dir():
        models = _model_files(path)
        if models:
            return models[0], path
        raise CheckpointError(f"{path}: no best.keras or last.keras in this folder{where}. {RUN_FOLDER_HINT}; is "
                              "this run finished?")
    if path.is_file():
        if path.suffix != ".keras":
            raise CheckpointError(f"{path}: a file, but not a .keras model. {RUN_FOLDER_HINT}, or one of its .keras "
                                  "files.")
        return path, path.parent
    kind = "file" if path.suffix == ".keras" else "folder"
    raise CheckpointError(f"{path}: no such {kind}{where}.{_did_you_mean_run(path)} {RUN_FOLDER_HINT}, or one of "
                          f"its .keras files; {newest_run_hint()}.")


def _did_you_mean_run(path: Path) -> str:
    """' Did you mean X?' for a run folder beside `path` whose name is close to it (a typo), else ''."""
    import difflib

    parent = path.parent if str(path.parent) else Path(".")
    try:
        siblings = [p.name for p in parent.iterdir() if p.is_dir() and _model_files(p)]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6) or \
        [s for s in siblings if s.lower() == path.name.lower()]
    return f" Did you mean {parent / close[0]}?" if close else ""


RUN_OVERRIDABLE = "predict."
"""The config keys `--set` may change on a trained run (eval, predict, calibrate, tune, export): every other setting
was fixed by training."""


def check_run_overrides(overrides: Sequence[str]) -> None:
    """Refuse `--set KEY=VALUE` on a run for any key outside predict.* (the model was trained with the others)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set predict.tta=true.")
        key = item.partition("=")[0].strip()
        if not key.startswith(RUN_OVERRIDABLE) or key == RUN_OVERRIDABLE:
            hint = "; pass --data DIR for another data set root" if key == "data.root" else ""
            raise ConfigError(f"--set {item}: {key} is fixed by training (the run's config.yaml); on a trained run "
                              f"only predict.* keys can be set, e.g. --set predict.tta=true{hint}.")


def describe_overrides(run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """One line per override with the run's own value: `--set predict.tta=true (the run's: false)`."""
    saved = run_config(run_dir).to_dict()
    lines = []
    for item in overrides:
        key, _, text = item.partition("=")
        node, found = saved, True
        for step in key.strip().split("."):
            found = isinstance(node, dict) and step in node
            node = node[step] if found else None
            if not found:
                break
        lines.append(f"--set {key.strip()}={text} (the run's: {_yaml_text(node) if found else 'unset'})")
    return lines


def _yaml_text(value) -> str:
    """A config value as YAML would spell it in one line: false, null, 0.5, [1, 2]."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def run_config(run_dir: Path, overrides: Sequence[str] = ()):
    """The resolved config a run saved (config.yaml beside the model), with `predict.*` overrides applied in
    memory (the file is never written)."""
    from segtrain.config import load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: no config.yaml beside the model; eval, predict, calibrate, tune and export need the run's "
            f"config (class names, mask encoding). {RUN_FOLDER_HINT}."
        )
    check_run_overrides(overrides)
    return load_config(path, list(overrides))


@contextmanager
def staged_folder(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of `out_dir` to write a new folder into; renamed to `out_dir` only once the block ends
    without error (with `overwrite`, replacing the existing folder then), so a failure never loses the old folder
    and never leaves a half-written one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists() and (overwrite or (out_dir.is_dir() and not any(out_dir.iterdir()))):
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        staging.rename(out_dir)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        staging.rename(out_dir)


def load_model(path: Path) -> "keras.Model":
    """Load a .keras model with Keras's safe mode on (no arbitrary code)."""
    import keras

    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises several types for a bad file
        raise CheckpointError(f"{path}: cannot load the model ({type(exc).__name__}: {exc}).") from None
