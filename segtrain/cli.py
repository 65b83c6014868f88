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
def fit(config_path, overrides, out, resume, overwrite):
    """Train a model from CONFIG and write a run folder."""
    _import_tensorflow_quietly()
    from segtrain.api import fit as fit_run

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
@click.option("--worst", type=click.IntRange(min=0), default=6, show_default=True, metavar="K",
              help="Rows of worst_images.png: the K images of lowest mean foreground IoU (0: no gallery).")
def eval_command(checkpoint, data_root, split, out, decision, threshold, relaxed_rho, worst):
    """Per-class and per-image metrics of a trained model on a labelled split."""
    _import_tensorflow_quietly()
    from segtrain.evaluation import evaluate_checkpoint

    decision = _decision_from_options(decision, threshold)
    evaluate_checkpoint(checkpoint, data_root, split, Path(out) if out else None, decision, threshold, relaxed_rho,
                        worst=worst)


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
def calibrate(run, split):
    """Fit temperature scaling for RUN's model on a labelled split and write RUN/calibration.json."""
    _import_tensorflow_quietly()
    from segtrain.calibration import calibrate_run

    calibrate_run(run, split, log=click.echo)


@cli.command(short_help="Tune the decision (threshold or prior correction, post-processing) on a labelled split.")
@click.argument("run", type=click.Path(exists=True))
@click.option("--split", help="Labelled split to tune on (default: the run's data.val_split; then eval on it is optimistic).")
@click.option("--objective", type=click.Choice(["f1", "iou", "cost"]),
              help="What to maximise: foreground (two classes) or mean F1 / IoU, or least mean cost "
                   "(default: cost when the run has costs, else f1 for two classes, iou for several).")
@click.option("--postprocess/--no-postprocess", default=True, show_default=True,
              help="Also choose per-class post-processing (remove small components, fill small holes).")
def tune(run, split, objective, postprocess):
    """Choose RUN's operating point on a labelled split and write RUN/operating_point.json, which eval and predict
    then apply: the threshold (two classes) or, with predict.prior_correction: tuned, the prior-correction tau (and
    with several classes one bias per class), and per class the post-processing."""
    _import_tensorflow_quietly()
    from segtrain.tuning import tune_run

    tune_run(run, split, objective, postprocess, log=click.echo)


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
