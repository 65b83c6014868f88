"""The `segtrain` command line: one function per verb.

Exit codes: 0 success, 2 bad usage, config or data (one message, no traceback),
1 anything else.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe for GPUs with C++ stderr muted (CUDA-probe chatter on CPU-only machines)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="segtrain")
def cli():
    """Train U-Net segmentation models on imbalanced, cost-sensitive data from one YAML config."""


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value by dotted path, e.g. --set train.epochs=2 (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: runs/<config name>).")
@click.option("--resume", is_flag=True, help="Continue the run in the run folder from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--budget", metavar="DURATION",
              help="Train for this wall-clock time instead of train.epochs, e.g. 20m, 1h30m, 90s (same as "
                   "--set train.budget=DURATION): the step time is measured first and the steps planned to fit.")
def fit(config_path, overrides, out, resume, overwrite, budget):
    """Train a model from CONFIG and write a run folder."""
    _import_tensorflow_quietly()
    from segtrain.api import fit as fit_run

    if budget is not None:
        overrides = [*overrides, f"train.budget={budget}"]
    result = fit_run(config_path, overrides, out, resume=resume, overwrite=overwrite, log=click.echo)
    mean_iou = result.metrics.get("mean_iou")
    shown = "n/a" if mean_iou is None else f"{mean_iou:.4f}"
    click.echo(f"Done: {result.run_dir} (best.keras, last.keras, metrics.json, history.csv). "
               f"Mean IoU on {result.val_split}: {shown}")


@cli.command("eval")
@click.option("--checkpoint", type=click.Path(), help="Run folder or .keras file (default: newest run under runs/).")
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Data set root (default: the run's data.root).")
@click.option("--split", help="Split folder to evaluate (default: the run's data.val_split).")
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default: RUN/eval_<split>).")
@click.option("--decision", type=click.Choice(["argmax", "cost", "threshold"]), help="Decision rule (default: the config's).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Foreground probability threshold (two classes); implies --decision threshold.")
@click.option("--relaxed", "relaxed_rho", type=click.FloatRange(min=0), metavar="RHO",
              help="Also report relaxed precision/recall: a hit within RHO pixels counts (thin structures).")
@click.option("--tta/--no-tta", default=None, help="Average over flips (default: the config's predict.tta).")
@click.option("--worst", type=click.IntRange(min=0), default=6, show_default=True, metavar="K",
              help="Rows of worst_images.png: the K images of lowest mean foreground IoU (0: no gallery).")
def eval_command(checkpoint, data_root, split, out, decision, threshold, relaxed_rho, tta, worst):
    """Per-class and per-image metrics of a trained model on a labelled split."""
    _import_tensorflow_quietly()
    from segtrain.evaluation import evaluate_checkpoint

    decision = _decision_from_options(decision, threshold)
    evaluate_checkpoint(checkpoint, data_root, split, Path(out) if out else None, decision, threshold, relaxed_rho,
                        worst=worst, tta=tta)


@cli.command(short_help="Write one mask per image.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--checkpoint", type=click.Path(), help="Run folder or .keras file (default: newest run under runs/).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: RUN/predictions).")
@click.option("--decision", type=click.Choice(["argmax", "cost", "threshold"]), help="Decision rule (default: the config's).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Foreground probability threshold (two classes); implies --decision threshold.")
@click.option("--tta/--no-tta", default=None, help="Average over flips (default: the config's predict.tta).")
@click.option("--probabilities", is_flag=True, help="Also write the class probabilities (see --probabilities-format).")
@click.option("--probabilities-format", type=click.Choice(["png", "npy"]), default=None,
              help="png (default): <stem>_prob_<class>.png, 8-bit 0..255; npy: <stem>.npy, float32 H x W x K, "
                   "exact. Implies --probabilities.")
@click.option("--overlay", is_flag=True, help="Also write a colour overlay of the mask on the image.")
def predict(images, checkpoint, out, decision, threshold, tta, probabilities, probabilities_format, overlay):
    """Write one mask per image in IMAGES (files or folders): same stem, same size, training encoding."""
    _import_tensorflow_quietly()
    from segtrain.predict import collect_images, predict_images

    decision = _decision_from_options(decision, threshold)
    predict_images(collect_images(list(images)), checkpoint, Path(out) if out else None, decision, threshold, tta,
                   probabilities or probabilities_format is not None, overlay,
                   probabilities_format=probabilities_format or "png")


@cli.command(short_help="Check the data set and print class statistics and weights.")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value by dotted path.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def stats(config_path, overrides, as_json):
    """Check the data set and print class pixel counts and the weights of every strategy."""
    from segtrain.atomic import json_text
    from segtrain.class_weights import class_stats_dict, format_stats_table
    from segtrain.config import load_config
    from segtrain.data.scan import scan_training_set

    config = load_config(config_path, list(overrides))
    data = config.data
    pairs, mapping, _, counter = scan_training_set(data, description=None if as_json else "counting")
    result = class_stats_dict(counter, data.classes, config.loss.class_weights, config.loss.max_weight,
                              config.loss.class_weights_from)
    if as_json:
        click.echo(json_text(result))
    else:
        click.echo(f"{data.root}/{data.train_split}: {len(pairs)} pairs checked; masks read as {mapping.describe()}.")
        click.echo(format_stats_table(result))
        for warning in result.get("warnings", []):
            click.echo(f"warning: {warning}")


@cli.command(short_help="Export a run as SavedModel, ONNX or TFLite.")
@click.argument("run", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["saved_model", "onnx", "tflite"]), default="saved_model",
              show_default=True, help="Model format (onnx and tflite need `pip install segtrain[export]`).")
@click.option("--out", type=click.Path(file_okay=False), help="Export folder (default: RUN/export/<format>).")
def export(run, fmt, out):
    """Export RUN (a run folder or .keras file) with its decision rule and metadata.json."""
    _import_tensorflow_quietly()
    from segtrain.export import export_run

    export_run(Path(run), fmt, Path(out) if out else None, log=click.echo)


@cli.command(short_help="Fit the run's temperature (calibration) on a labelled split.")
@click.argument("run", type=click.Path(exists=True))
@click.option("--split", help="Labelled split to fit on (default: the run's data.val_split).")
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Data set root (default: the run's data.root).")
def calibrate(run, split, data_root):
    """Fit temperature scaling (one T, or one per class where that helps on held-out images) for RUN's model on a
    labelled split and store it in RUN/policy.json."""
    _import_tensorflow_quietly()
    from segtrain.policy.calibrate import calibrate_run

    calibrate_run(run, split, data_root, log=click.echo)


@cli.command(short_help="Tune the decision (threshold or prior correction, post-processing) on a labelled split.")
@click.argument("run", type=click.Path(exists=True))
@click.option("--split", help="Labelled split to tune on (default: the run's data.val_split; then eval on it is optimistic).")
@click.option("--objective", type=click.Choice(["f1", "iou", "cost"]),
              help="What to maximise: foreground (two classes) or mean F1 / IoU, or least mean cost "
                   "(default: cost when the run has costs, else f1 for two classes, iou for several).")
@click.option("--postprocess/--no-postprocess", default=True, show_default=True,
              help="Also choose per-class post-processing (remove small components, fill small holes).")
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Data set root (default: the run's data.root).")
def tune(run, split, objective, postprocess, data_root):
    """Choose RUN's operating point on a labelled split, check it on held-out images of that split, and store it in
    RUN/policy.json when it beats the untuned rule there: the threshold (two classes) or, with
    predict.prior_correction: tuned, the prior-correction tau (and with several classes one bias per class), and
    per class the post-processing. eval, predict and export then apply it."""
    _import_tensorflow_quietly()
    from segtrain.policy.tuning import tune_run

    tune_run(run, split, objective, postprocess, data_root, log=click.echo)


@cli.command(short_help="Plan a config from the data set itself.")
@click.argument("data_root", metavar="DATA_ROOT", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False, allow_dash=True), metavar="CONFIG",
              help="Config file to write; never replaced (default: configs/<DATA_ROOT's folder name>.yaml under the "
                   "working directory; - prints it).")
@click.option("--budget", default="20m", show_default=True, metavar="DURATION",
              help="Training time to plan for: 20m, 1h30m, 90s (a bare number is minutes).")
@click.option("--ignore", "ignore", multiple=True, metavar="VALUE",
              help="A raw mask value (or an R,G,B colour) that counts in no loss and no metric, e.g. 255 (repeatable).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), help="Device to plan for (default: gpu when one is visible).")
@click.option("--memory", metavar="SIZE",
              help="Memory training may use, e.g. 16GB (default: on the CPU 25% of the RAM, at most 8GB; on a GPU "
                   "its memory).")
def plan(data_root, out, budget, ignore, device, memory):
    """Read the data set at DATA_ROOT once and write a config whose every value comes with the fact it follows from."""
    from segtrain.errors import ConfigError
    from segtrain.planning.fingerprint import fingerprint
    from segtrain.planning.plan import make_plan
    from segtrain.planning.units import parse_budget, parse_ignore, parse_memory
    from segtrain.planning.writer import render, write_plan

    def parsed(parse, text, option):
        try:
            return parse(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None

    seconds = parsed(parse_budget, budget, "--budget")
    memory_bytes = None if memory is None else parsed(parse_memory, memory, "--memory")
    ignored = [parsed(parse_ignore, value, "--ignore") for value in ignore]
    path = None if out == "-" else Path(out) if out else Path("configs") / f"{Path(data_root).resolve().name}.yaml"
    if path is not None and path.exists():
        raise ConfigError(f"{path}: already exists; `segtrain plan` never replaces a config. Pass another --out "
                          "(or --out - to print it), or move the file away.")
    result = make_plan(fingerprint(Path(data_root), ignore=ignored), device, memory_bytes, seconds)
    if path is None:
        click.echo(render(result), nl=False)
        return
    write_plan(result, path)
    fp = result.fingerprint
    click.echo(f"Wrote {path}: planned from {fp.pairs} pairs in {fp.seconds:.1f} s. Train it: segtrain fit {path}")
    for note in result.notes:
        click.echo(f"note: {note}")


def _decision_from_options(decision, threshold):
    """--threshold implies --decision threshold and makes no sense with another rule."""
    if threshold is None:
        return decision
    if decision not in (None, "threshold"):
        raise click.UsageError(f"--threshold goes with --decision threshold, not --decision {decision}.")
    return "threshold"


def main():
    """Console-script entry point."""
    cli(prog_name="segtrain")


if __name__ == "__main__":
    main()
