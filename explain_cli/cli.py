"""The command line: parses arguments and calls the pipeline; nothing else lives here.

torch and the pipeline are imported inside the commands, so ``--help`` and ``--version``
answer without loading torch.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from explain_cli import __version__
from explain_cli.errors import EXIT_IMAGES_FAILED, EXIT_UNEXPECTED, EXIT_USAGE, UserError

EXIT_CODES_HELP = (
    "Exit codes: 0 every selected image explained (or already done); 2 usage or config error; "
    "3 the run (or merge) finished but at least one image failed (see errors.csv); 4 nothing selected (no file "
    "matches input.include/exclude); 1 a full disk, an unwritable --log-file or anything unexpected; "
    "129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM (rerun the same command to resume)."
)

app = typer.Typer(
    name="explain-cli",
    help="Batch SHAP explanations for PyTorch image classifiers.\n\n" + EXIT_CODES_HELP,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("explain_cli")


class _LogFile(logging.FileHandler):
    """--log-file: the first failed write (a full disk) detaches the handler and is kept in
    ``failure`` instead of logging's "--- Logging error ---" traceback on every later line; the
    run goes on (its outputs do not depend on the log) and ``run`` exits 1 saying why."""

    failure: Optional[str] = None

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if _LogFile.failure is None:
            why = getattr(exc, "strerror", None) or exc
            _LogFile.failure = f"cannot write the log file {self.baseFilename}: {why}"
            print(f"error: {_LogFile.failure}; the run goes on without it", file=sys.stderr)
        logging.getLogger("explain_cli").removeHandler(self)
        try:
            self.close()
        except OSError:
            pass


def _setup_logging(verbose: int, quiet: bool, log_file: Optional[Path]) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger("explain_cli")
    root.handlers.clear()
    _LogFile.failure = None
    root.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(lambda record: not getattr(record, "summary_line", False))  # printed plainly instead
    root.addHandler(handler)
    if log_file is not None:
        from explain_cli.config import check_log_file, check_output_dir

        try:
            check_log_file(log_file)
            check_output_dir(log_file.absolute().parent, key="--log-file")
            if log_file.exists() and not os.access(log_file, os.W_OK):
                raise UserError(f"--log-file: cannot open {log_file}: permission denied")
        except OSError as exc:  # a name too long, a parent we may not stat
            raise UserError(f"--log-file: cannot use {log_file}: {exc.strerror or exc}") from None
        # opened at the first record: a usage error found before the run logs anything leaves no file
        fh = _LogFile(log_file, encoding="utf-8", errors="backslashreplace", delay=True)
        fh.setLevel(logging.DEBUG if verbose else logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
        root.addHandler(fh)
    root.propagate = False


def _usable_paths(**paths: Optional[Path]) -> None:
    """Command-line paths the system cannot even look up (a name too long, a symlink loop, a folder
    we may not search) are usage errors naming the option, not an OSError deep inside a command."""
    for key, path in paths.items():
        option = "--" + key[2:] if key.startswith("__") else key  # __input: --input; CONFIG: the argument
        if path is None:
            continue
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            pass  # the command says what it expected there
        except OSError as exc:
            raise UserError(f"{option}: cannot use {path}: {exc.strerror or exc}") from None
        except ValueError as exc:  # an embedded NUL
            raise UserError(f"{option}: cannot use {path!r}: {exc}") from None


def _fail(exc: BaseException | str, code: int) -> "typer.Exit":
    print(f"error: {exc}", file=sys.stderr)
    return typer.Exit(code)


def _unexpected(exc: BaseException, verbose: int) -> "typer.Exit":
    """Exit 1 for anything unexpected (a bug): one line, and the traceback with ``-v``."""
    if verbose:
        log.error("traceback of the unexpected error:", exc_info=exc)
    hint = "" if verbose else " (run with -v for the traceback)"
    return _fail(f"unexpected {type(exc).__name__}: {exc}{hint}", EXIT_UNEXPECTED)


_VERBOSE_HELP = "More log output; -v also prints the traceback of an unexpected error."
_EXPLAINER_HELP = ("gradient | deep | partition | kernel | amortized: use this explainer instead of the config's (its "
                   "explainer.* keys the new one lacks are dropped, with a note; add its own with --set).")


class _PipeSafe:
    """A text stream that outlives its reader: when the pipe behind it breaks (``| head -1``, a
    log collector that died), output is silently dropped (the fd is pointed at /dev/null), so
    the run goes on and the exit code still reports the run, not the pipe."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _silence(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def _guard(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.EBADF):
                raise
            self._silence()
            try:
                self._stream.flush()
            except (OSError, ValueError):
                pass
            return len(args[0]) if args else None

    def write(self, text: str):
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _protect_std_streams() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:  # started with the fd closed (>&-)
            setattr(sys, name, open(os.devnull, "w"))
        elif not isinstance(stream, _PipeSafe):
            setattr(sys, name, _PipeSafe(stream))


def _version_callback(value: bool) -> None:
    if value:
        print(f"explain-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Batch SHAP explanations for PyTorch image classifiers."""


def _int_or_text(value: Optional[str]):
    """A command-line number as an int (so the config check sees `-1`, not `'-1'`)."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return value


def _classes(values: List[str]) -> list | None:
    """--class values as targets.classes entries (None: keep the config's); a name or an index
    (digits), resolved against the labels like the config's entries."""
    return list(values) or None


def _load(config: Path, overrides: List[str], extra: dict | None = None):
    from explain_cli.config import load_config

    cfg = load_config(config, overrides, extra)
    _lookable_config_paths(cfg)
    return cfg


def _lookable_config_paths(cfg) -> None:
    """The config's file and folder paths the system cannot even look up (a name too long, a symlink
    loop) are a ConfigError naming the key, before a command trips over them as an OSError."""
    from explain_cli.errors import ConfigError

    from_csv = cfg.targets.from_csv
    paths = {"input.dir": cfg.input.dir, "background.dir": cfg.background.dir, "labels": cfg.labels,
             "model.checkpoint": cfg.model.checkpoint, "output.dir": cfg.output.dir,
             "targets.from_csv.path": None if from_csv is None else from_csv.path,
             "explainer.checkpoint": getattr(cfg.explainer_settings, "checkpoint", None)}
    for key, value in paths.items():
        if not isinstance(value, str) or value.startswith("pkg:"):
            continue
        try:
            os.stat(cfg.resolve(value))
        except (FileNotFoundError, NotADirectoryError):
            pass  # the command says what it expected there
        except OSError as exc:
            raise ConfigError(key, f"cannot use {value}: {exc.strerror or exc}", cfg._source) from None


@app.command(epilog="Examples:\n\n  explain-cli run configs/demo.yaml\n\n"
             "  explain-cli run cfg.yaml --input crops/ --output out/ --set explainer.nsamples=50 "
             "--set output.format=png\n\n  explain-cli run cfg.yaml --shard 0/4 --device cuda\n\n"
             + EXIT_CODES_HELP)
def run(
    config: Path = typer.Argument(..., help="YAML config file."),
    input_dir: Optional[Path] = typer.Option(None, "--input", help="Override input.dir."),
    output_dir: Optional[Path] = typer.Option(None, "--output", help="Override output.dir."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: KEY=VALUE (dotted, YAML value). Repeatable."),
    explainer: Optional[str] = typer.Option(None, "--explainer", help=_EXPLAINER_HELP),
    classes: List[str] = typer.Option([], "--class", help="Explain this class (a name from the label file, an index, 'label' or 'top_k'); repeatable, in order. Same as --set targets.classes=[...]."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Explain at most N images (after sharding)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides the config)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar or progress lines."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo images whose outputs already exist."),
    relabel: bool = typer.Option(False, "--relabel", help="Redo the done images whose label in the truth CSV (targets.from_csv) changed; without it such a change is refused. Rows added for images without one are always explained."),
    workers: Optional[str] = typer.Option(None, "--workers", help="auto | N: processes that write overlays while the next images are explained (overrides the config's workers; 0: in the main process)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: explain every N-th image starting at I (0-based). Default: from SLURM_ARRAY_TASK_* when set."),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="Also write the log to this file."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_VERBOSE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors: no progress, and the "
                               "summary line only when an image failed or the run was stopped."),
) -> None:
    """Explain every image of the input folder and write overlays, topk.csv, errors.csv, run.json
    and report.html."""
    try:
        _usable_paths(CONFIG=config, __input=input_dir, __output=output_dir)
        _setup_logging(verbose, quiet, log_file)
        from explain_cli.api import run_config
        from explain_cli.config import check_slurm_env
        from explain_cli.pipeline import RunOptions, Shard

        cfg = _load(config, set_, {
            "input.dir": str(input_dir.resolve()) if input_dir else None,
            "output.dir": str(output_dir.resolve()) if output_dir else None,
            "device": device,
            "workers": _int_or_text(workers),
            "explainer.name": explainer,
            "targets.classes": _classes(classes),
        })
        if not shard:
            check_slurm_env()
        chosen = Shard.parse(shard) if shard else Shard.from_slurm()
        summary = run_config(cfg, RunOptions(limit=limit, progress=not (no_progress or quiet),
                                             overwrite=overwrite, shard=chosen, relabel=relabel))
    except UserError as exc:
        raise _fail(exc, exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: no raw traceback unless -v
        from explain_cli.write import is_fatal_os_error

        if is_fatal_os_error(exc):
            raise _fail(f"{exc}; the run stopped (complete images are kept): free space or fix the "
                        f"folder, then rerun the same command to resume", EXIT_UNEXPECTED)
        raise _unexpected(exc, verbose)
    done = summary.skipped + summary.explained
    excluded = f" ({summary.excluded} more skipped by input.exclude)" if summary.excluded else ""
    line = (f"explained {summary.explained}, already done {summary.skipped}, failed {summary.failed} "
            f"of {summary.selected} images{excluded} in {summary.seconds:.1f} s; outputs in {summary.output_dir}")
    if summary.interrupted:
        line = (f"stopped by {summary.interrupted} after {done} of {summary.selected} images; "
                f"rerun the same command to resume. {line}")
    if summary.failed:
        line += " (see errors.csv)"
    if not quiet or summary.failed or summary.interrupted:
        print(line, file=sys.stderr)
    # the --log-file gets it too, so a cron log says what happened
    log.log(logging.WARNING if summary.failed or summary.interrupted else logging.INFO, "%s", line,
            extra={"summary_line": True})
    if _LogFile.failure and summary.exit_code == 0:
        raise _fail(f"{_LogFile.failure}; the run itself finished (its outputs are complete)", EXIT_UNEXPECTED)
    raise typer.Exit(summary.exit_code)


@app.command(epilog="Example:\n\n  explain-cli train configs/amortized.yaml --input photos/ --output explainer.pt\n\n"
             "Rerun the same command after an interruption to resume from OUTPUT.train.\n\n" + EXIT_CODES_HELP)
def train(
    config: Path = typer.Argument(..., help="YAML config file with explainer.name: amortized."),
    input_dir: Optional[Path] = typer.Option(None, "--input", help="Folder of training images (overrides input.dir)."),
    output: Optional[Path] = typer.Option(None, "--output", help="The explainer file to write (default: explainer.checkpoint)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: KEY=VALUE. Repeatable."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides the config)."),
    restart: bool = typer.Option(False, "--restart", help="Ignore a training state left by an interrupted run."),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="Also write the log to this file."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_VERBOSE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Train an amortized (FastSHAP) explainer for the config's model, players and fill on the images
    of the input folder; `run` with explainer {name: amortized, checkpoint: FILE} then explains each
    image in one forward pass."""
    from explain_cli.train import TrainStopped

    try:
        _usable_paths(CONFIG=config, __input=input_dir, __output=output)
        _setup_logging(verbose, quiet, log_file)
        from explain_cli.errors import ConfigError
        from explain_cli.train import train as train_explainer

        cfg = _load(config, set_, {"input.dir": str(input_dir.resolve()) if input_dir else None,
                                   "device": device})
        option = "--output"
        if output is None:
            checkpoint = getattr(cfg.explainer_settings, "checkpoint", None)
            if checkpoint is None:
                raise ConfigError("--output", "give --output FILE (or explainer.checkpoint in the config)")
            output, option = cfg.resolve(checkpoint), "explainer.checkpoint"
        result = train_explainer(cfg, output.resolve(), restart=restart, option=option)
    except UserError as exc:
        raise _fail(exc, EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        raise typer.Exit(130)
    except TrainStopped as exc:  # SIGTERM: the line says where the training state is
        print(exc, file=sys.stderr)
        raise typer.Exit(exc.code)
    except Exception as exc:  # noqa: BLE001
        raise _unexpected(exc, verbose)
    if not quiet:
        check = "" if result.kernel_pearson is None else f"; median Pearson r vs Kernel SHAP {result.kernel_pearson:.3f}"
        print(f"trained {result.epochs} epochs in {result.seconds:.1f} s ({result.model_evaluations} model "
              f"evaluations){check}; wrote {result.path}", file=sys.stderr)


@app.command(epilog="Example:\n\n  explain-cli validate configs/demo.yaml --set model.layer=blocks.3\n\n" + EXIT_CODES_HELP)
def validate(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: KEY=VALUE. Repeatable."),
    explainer: Optional[str] = typer.Option(None, "--explainer", help=_EXPLAINER_HELP),
    classes: List[str] = typer.Option([], "--class", help="Explain this class (a name from the label file, an index, 'label' or 'top_k'); repeatable, in order. Same as --set targets.classes=[...]."),
    input_dir: Optional[Path] = typer.Option(None, "--input", help="Override input.dir."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    check_predictions: Optional[bool] = typer.Option(
        None, "--check-predictions/--no-check-predictions",
        help="Run the model on up to 50 labelled images with the configured preprocessing and print how many "
             "it gets right (labels: targets.from_csv, else folders named after classes). Default: on when "
             "targets.from_csv is set."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_VERBOSE_HELP),
) -> None:
    """Check config, model, checkpoint, layer, labels and input folder; print the resolved config,
    each preprocess value with where it came from (and the model's own, when it has one), and how many
    images a run would process. Explains nothing."""
    _setup_logging(verbose, False, None)
    try:
        _usable_paths(CONFIG=config, __input=input_dir)
        import yaml

        from explain_cli.config import resolved_dict
        from explain_cli.pipeline import RunOptions, prepare

        cfg = _load(config, set_, {"input.dir": str(input_dir.resolve()) if input_dir else None,
                                   "device": device, "targets.classes": _classes(classes),
                                   "explainer.name": explainer})
        prep = prepare(cfg, RunOptions())
    except UserError as exc:
        raise _fail(exc, exc.exit_code)
    except Exception as exc:  # noqa: BLE001
        raise _unexpected(exc, verbose)
    print(yaml.safe_dump(resolved_dict(cfg), sort_keys=False).rstrip())
    weights = cfg.model.weights or "the factory's own"
    print(f"# model outputs: {prep.num_outputs}; weights: {weights}; layer: {cfg.model.layer}; device: {prep.device}")
    if prep.layer_tokens:
        print(f"# layer input: {_layer_input_line(prep.layer_tokens)}")
    excluded = prep.left_out.get("excluded", 0)
    print(f"# images to process: {len(prep.images)} (of {len(prep.all_images)} found in {prep.input_dir}"
          + (f"; {excluded} more skipped by input.exclude" if excluded else "") + ")")
    if prep.slides is not None:
        print(f"# slides: {_slides_line(prep.slides)}")
    if prep.walk_errors:
        print(f"# unreadable (a run lists them in errors.csv): {', '.join(rel for rel, _ in prep.walk_errors[:5])}"
              + (f" and {len(prep.walk_errors) - 5} more" if len(prep.walk_errors) > 5 else ""))
    from explain_cli.pipeline import describe_targets

    asked = describe_targets(prep)
    classes = ", ".join(c if isinstance(c, str) else f"{c['name']} ({c['index']})" for c in asked["classes"])
    line = f"# explained: {classes}; values sum to {asked['explained']} (activation {asked['activation']})"
    if asked["truth_csv"]:
        line += f"; labels for {asked['images_with_label']} of {len(prep.images)} images from {asked['truth_csv']}"
    print(line)
    try:
        _check_preprocessing(prep, check_predictions)
    except UserError as exc:
        raise _fail(exc, exc.exit_code)
    except Exception as exc:  # noqa: BLE001
        raise _unexpected(exc, verbose)


def _check_preprocessing(prep, check_predictions: Optional[bool]) -> None:
    """validate's preprocess block and prediction check (explain_cli/preprocess_check.py)."""
    from explain_cli.preprocess_check import check_predictions as predictions, differences, model_view, \
        preprocess_lines

    pre = prep.config.preprocess
    view = model_view(prep.config.model, prep.model)
    print("\n".join(preprocess_lines(pre, view)))
    differing = differences(pre, view) if view is not None else []
    if differing and view.trained:
        log.warning("preprocess differs from %s in %s: the model was trained on other inputs (allowed; see "
                    "docs/preprocessing.md)", view.source, ", ".join(f"preprocess.{k}" for k in differing))
    if check_predictions is False or (check_predictions is None and prep.truth is None):
        return
    found = predictions(prep, ask_folders=True)
    if found is None:
        raise UserError("--check-predictions: no labelled image: set targets.from_csv (a truth CSV) or put the "
                        "images in folders named after their classes (images/<class>/...)")
    print(found.line())
    if found.warning():
        log.warning("%s", found.warning())


@app.command(epilog="Example:\n\n  explain-cli check configs/demo.yaml --images 4\n\n"
             "Exit 5: the check failed (the maps do not change when the model's weights are randomised).\n\n"
             + EXIT_CODES_HELP)
def check(
    config: Path = typer.Argument(..., help="YAML config file."),
    images: int = typer.Option(8, "--images", min=1, help="Images of the input to check on (the first N)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Folder for check.csv, check.png and check.html (default: OUTPUT_DIR/check)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Stop the cascade after this many layers (default: all; at least 2)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: KEY=VALUE. Repeatable."),
    explainer: Optional[str] = typer.Option(None, "--explainer", help=_EXPLAINER_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_VERBOSE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Model-randomisation sanity check (Adebayo et al. 2018): randomise the model's weights from the
    top layer down and see whether the maps change; exit 5 naming the explainer and layer when they
    do not (explain_cli/check.py)."""
    _setup_logging(verbose, quiet, None)
    try:
        _usable_paths(CONFIG=config, __output=output)
        from explain_cli.check import EXIT_CHECK_FAILED, run_check

        cfg = _load(config, set_, {"device": device, "explainer.name": explainer})
        result = run_check(cfg, images, output.resolve() if output else None, steps=steps)
    except UserError as exc:
        raise _fail(exc, exc.exit_code)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except Exception as exc:  # noqa: BLE001
        raise _unexpected(exc, verbose)
    print(result.verdict(), file=sys.stderr)
    if not quiet:
        print(f"wrote {result.output_dir / 'check.html'} (check.csv, check.png)", file=sys.stderr)
    if not result.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _slides_line(plans) -> str:
    """validate's line on a slide run: slides, tiles kept and skipped, how they are read."""
    kept = sum(len(p.tiles) for p in plans.slides.values())
    no_tissue = sum(p.tiles_no_tissue for p in plans.slides.values())
    reads = sorted({f"level {p.level}, {p.read_size} px" if p.kind == "file" else "tile files"
                    for p in plans.slides.values()})
    return (f"{len(plans.slides)} slide(s), {kept} tiles to explain, {no_tissue} without tissue skipped"
            + (f", {plans.unmatched} files not matching slides.from_names" if plans.unmatched else "")
            + (f"; read at {'; '.join(reads)}" if reads else ""))


def _layer_input_line(found: dict) -> str:
    """validate's line on how the layer input becomes the (C, h, w) map (``check_layer_input``)."""
    if "layout" in found:
        return f"{found['layout']} maps, saved and drawn as (C, H, W) ({found['from']})"
    h, w = found["grid"]
    return (f"{found['prefix_tokens_dropped']} prefix token(s) dropped, the rest on a {h}x{w} patch grid "
            f"({found['from']}{'; assumed' if found['assumed'] else ''})")


@app.command(epilog="Examples:\n\n  explain-cli layers configs/demo.yaml\n\n  explain-cli layers --arch torchvision:vgg16\n\n" + EXIT_CODES_HELP)
def layers(
    config: Optional[Path] = typer.Argument(None, help="YAML config file (its model section is used)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="torchvision:NAME | timm:NAME | python:pkg.module:factory, instead of a config."),
    size: Optional[int] = typer.Option(None, "--size", min=8, max=4096,
                                       help="Input size of the dummy forward, 8..4096 like preprocess.size (default: preprocess.size or 224)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_VERBOSE_HELP),
) -> None:
    """Print every module as a dotted name with the shape gradient and deep explain (its input),
    the resolution of the map it gives, and its output shape; layers that cannot be explained
    are marked, to choose model.layer."""
    _setup_logging(verbose, False, None)
    try:
        _usable_paths(CONFIG=config)
        from explain_cli.config import ModelConfig
        from explain_cli.errors import ConfigError
        from explain_cli.models import build_model, layer_table

        if (config is None) == (arch is None):
            raise UserError("give a CONFIG or --arch NAME (one of them)")
        if config is not None:
            cfg = _load(config, [])
            model = build_model(cfg.model, lambda p: cfg.resolve(p))
            side = size or cfg.preprocess.input_shape
        else:
            try:
                library = arch.startswith(("torchvision:", "timm:"))  # shapes only: weights do not matter
                model_cfg = ModelConfig(arch=arch, weights="random" if library else None)
            except Exception as exc:  # noqa: BLE001 - pydantic's message names the problem
                raise ConfigError("--arch", str(exc).splitlines()[-1]) from None
            model = build_model(model_cfg, lambda p: Path(p))
            side = size or 224
        rows = layer_table(model, side)
    except UserError as exc:
        raise _fail(exc, EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001
        raise _unexpected(exc, verbose)
    print(format_layer_table(rows))


def _shape(shape: Optional[tuple]) -> str:
    return "x".join(str(d) for d in shape[1:]) if shape else "-"


def format_layer_table(rows: list) -> str:
    """The `layers` listing: name, type, explained (input) shape, map, output shape, and a mark."""
    width = max((len(r.name) for r in rows), default=5)
    kind_w = max((len(r.kind) for r in rows), default=8)
    lines = [f"{'layer':<{width}}  {'type':<{kind_w}}  {'explained (input)':<18} {'map':<9} output"]
    for r in rows:
        mapped = f"{r.map_size[0]}x{r.map_size[1]}" if r.map_size else "-"
        mark = f"   (cannot be explained: {r.problem})" if r.problem else ""
        mark += "   (input is (N, H, W, C): channels last)" if r.channels_last else ""
        lines.append(f"{r.name:<{width}}  {r.kind:<{kind_w}}  {_shape(r.input_shape):<18} {mapped:<9} "
                     f"{_shape(r.output_shape)}{mark}")
    explainable = sum(1 for r in rows if not r.problem)
    lines.append(f"# {explainable} of {len(rows)} rows can be model.layer (gradient, deep); the map is "
                 f"upsampled onto the image; partition and kernel explain 'input' only")
    return "\n".join(lines)


@app.command(epilog="Examples:\n\n  explain-cli init torchvision:resnet50 --input photos/\n\n"
             "  explain-cli init timm:convnext_tiny -o convnext.yaml\n\n"
             "  explain-cli init runs/best.pt --arch torchvision:resnet18 --input crops/\n\n" + EXIT_CODES_HELP)
def init(
    model: str = typer.Argument(..., help="torchvision:NAME | timm:NAME | python:pkg.module:factory | a checkpoint file (with --arch)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="The architecture of a checkpoint file (torchvision:NAME, timm:NAME, python:...)."),
    output: Path = typer.Option(Path("explain.yaml"), "--output", "-o", help="The config file to write."),
    input_dir: Path = typer.Option(Path("images"), "--input", help="The image folder the config names (input.dir)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", min=1, help="Classifier outputs (default: from the checkpoint, or the architecture's)."),
    weights: str = typer.Option("pretrained", "--weights", help="pretrained | random, for torchvision:/timm: architectures."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    resize: Optional[str] = typer.Option(None, "--resize", help="stretch | crop (preprocess.resize). Default: the pretrained weights' own transform (crop) for torchvision:/timm:, stretch for a checkpoint or factory (its training transform is unknown)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_VERBOSE_HELP),
) -> None:
    """Write a commented starter config for MODEL: sensible defaults, the preprocessing of its
    pretrained weights, and the layers that can be explained listed as comments. It validates as
    written (given the weights are in the local cache and the input folder exists)."""
    _setup_logging(verbose, False, None)
    try:
        _usable_paths(MODEL=None if ":" in model else Path(model), __output=output, __input=input_dir)
        from explain_cli.init import write_starter

        if weights not in ("pretrained", "random"):
            raise UserError(f"--weights: pretrained or random, got {weights!r}")
        if resize not in (None, "stretch", "crop"):
            raise UserError(f"--resize: stretch or crop, got {resize!r}")
        notes = write_starter(model, arch, output, input_dir, num_classes, weights, force, resize)
    except UserError as exc:
        raise _fail(exc, EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001
        raise _unexpected(exc, verbose)
    print(f"wrote {output}; next: explain-cli validate {output}", file=sys.stderr)
    if not input_dir.is_dir():
        print(f"note: {input_dir} does not exist yet: put your images there or edit input.dir", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


@app.command(epilog="Examples:\n\n  explain-cli merge out/\n\n"
             "  sbatch --dependency=afterok:$JOBID --wrap 'explain-cli merge out/'\n\n" + EXIT_CODES_HELP)
def merge(
    output_dir: Path = typer.Argument(..., help="The output folder the shards wrote to."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_VERBOSE_HELP),
) -> None:
    """Combine the shard files of a sharded run (topk/errors/run.shard-I-of-N.*) into topk.csv,
    errors.csv and run.json, then report.html. Refuses (exit 2) when a shard is missing, unfinished or ran with
    another config; exits 3, like a run, when images failed (all outputs are written). Safe to run again."""
    _setup_logging(verbose, quiet, None)
    try:
        _usable_paths(OUTPUT_DIR=output_dir)
        from explain_cli.merge import merge as merge_shards

        summary = merge_shards(output_dir)
    except UserError as exc:
        raise _fail(exc, EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001
        raise _unexpected(exc, verbose)
    if not quiet:
        what = ", ".join(summary.written) if summary.written else "nothing (already up to date)"
        line = (f"merged {summary.shards} shard(s): {summary.images} images, {summary.explained} explained, "
                f"{summary.failed} failed; wrote {what} in {summary.output_dir}")
        if summary.failed:
            line += " (see errors.csv)"
        print(line, file=sys.stderr)
    from explain_cli.report import write_report_or_warn

    write_report_or_warn(output_dir)
    if summary.failed:  # as the runs of the shards: a cron job or an afterok chain notices
        raise typer.Exit(EXIT_IMAGES_FAILED)


@app.command(epilog="Examples:\n\n  explain-cli report out/\n\n  explain-cli report /scratch/$USER/explain-out   (shards so far, before the merge)\n\n"
             + EXIT_CODES_HELP)
def report(
    output_dir: Path = typer.Argument(..., help="A run's output folder (output.dir)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_VERBOSE_HELP),
) -> None:
    """Write OUTPUT_DIR/report.html: one self-contained page to browse the run (summary, failed
    images, every image with its top-k classes and scores, sortable and filterable). Runs and
    merges write it too; use this after copying or editing outputs. Exit 2 if the folder has no
    run outputs."""
    _setup_logging(verbose, quiet, None)
    try:
        _usable_paths(OUTPUT_DIR=output_dir)
        from explain_cli.report import write_report

        path = write_report(output_dir)
    except UserError as exc:
        raise _fail(exc, EXIT_USAGE)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _unexpected(exc, verbose)
        why = "read-only file system" if exc.errno == errno.EROFS else exc.strerror
        raise _fail(f"report: cannot write to {output_dir}: {why}", EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001
        raise _unexpected(exc, verbose)
    if not quiet:
        print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    """Console-script entry point."""
    _protect_std_streams()
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
