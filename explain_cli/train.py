"""``explain-cli train``: fit an amortized (FastSHAP) explainer for a config's model, players and fill.

The loss is FastSHAP's (Jethani et al., ICLR 2022): for an image ``x`` and coalitions ``S`` drawn
from the Shapley kernel (the size ``s`` with probability proportional to ``(M-1) / (s (M-s))``, then
``s`` players uniformly; each ``S`` paired with its complement, which halves the variance of the
estimate), minimise ``(v(S) - v(none) - sum_{j in S} phi_j(x))^2`` where ``phi`` is the explainer's
output after the additive efficiency normalisation (``amortized.efficient``), so the values sum
exactly to ``v(all) - v(none)``. Its minimiser is the Shapley values of the masking game.

All classes are in the loss: the cost of a step is the model evaluations (``2 + 2 * pairs`` per
image), and each one returns every class's output anyway; the loss over C outputs is a (rows, C)
subtraction, negligible next to the forward pass even for 1000 classes. So one explainer serves any
class selection (top-k or chosen classes) at run time.

The user's model is frozen (no gradients) and evaluated in batches of the config's ``batch_size``
rows. After each epoch the training state (explainer, optimiser, epoch, history) is written
atomically to ``OUTPUT.train``; a rerun of the same command (after a crash or ``kill -9``) resumes
from it, and gives the same explainer as an uninterrupted run (every epoch's random numbers come
from the seed and the epoch number only). Progress lines give the loss, the held-out loss and its
R^2, and an ETA. At the end the held-out images are explained by Kernel SHAP with many samples over
the same players and fill (by default sized to cost at most 20 % of the training's model
evaluations, :func:`validation_size`), one progress line per image, and the median Pearson
correlation of the two maps is printed and stored in the explainer file (``run`` shows it in
run.json and the report).

``explainer.train.epochs`` may change on a resume (more epochs continue the cosine schedule towards
the new end; a state already past it is written as trained); any other difference from the state's
settings is refused naming the keys. SIGTERM (and SIGINT) stop with a line saying where the state is.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from explain_cli import masking
from explain_cli.config import Config
from explain_cli.errors import ConfigError, ImageError, UserError
from explain_cli.explainers import _precision, _utils, amortized
from explain_cli.progress import format_seconds
from explain_cli.write import atomic_write, atomic_temp_name

#: Tiles a slide config trains on at most (held in memory as images): a seeded sample of the planned tiles.
MAX_TRAIN_TILES = 4000

log = logging.getLogger("explain_cli")

#: Most Kernel SHAP evaluations per held-out image of the final check, and fewest (validation_size).
VALIDATE_NSAMPLES, VALIDATE_MIN_NSAMPLES = 2000, 200
#: Share of the training's model evaluations the default (auto) check may cost.
VALIDATE_SHARE = 0.2
#: Settings of explainer.train that do not change the network being trained: a resume may change them.
RESUMABLE_KEYS = ("epochs", "validate_nsamples", "validate_images")


class TrainStopped(BaseException):
    """A stop signal during training; the message says where the training state is (exit 128 + n)."""

    def __init__(self, signal_name: str, code: int, message: str = "") -> None:
        super().__init__(message or signal_name)
        self.signal_name, self.code = signal_name, code


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM raises :class:`TrainStopped` where training is (a step, a validation image): the state
    of the last finished epoch is on disk, so stopping at once loses at most one epoch's work."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise TrainStopped(signal.Signals(signum).name, 128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def validation_size(n_hold: int, images: int, nsamples: int | str, training_evaluations: int) -> tuple[int, int]:
    """(images, nsamples) of the final Kernel SHAP check. ``auto`` keeps its cost (images x nsamples
    model evaluations) within 20 % of the training's: fewer images first (down to 1), then fewer
    samples (down to 200, below which the reference itself is too noisy to judge by)."""
    images = min(n_hold, images)
    if nsamples != "auto":
        return images, int(nsamples)
    budget = VALIDATE_SHARE * training_evaluations
    while images > 1 and images * VALIDATE_NSAMPLES > budget:
        images -= 1
    return images, int(max(VALIDATE_MIN_NSAMPLES, min(VALIDATE_NSAMPLES, budget // max(images, 1))))


def signature_differences(old: Any, new: dict[str, Any]) -> list[str]:
    """The settings a training state was made with that differ from this training's, by config key."""
    if not isinstance(old, dict):
        return ["the state holds no settings"]
    names = {"fingerprint": "the model's weights (model.checkpoint)", "arch": "model.arch",
             "outputs": "the model's outputs", "grid": "explainer.segments.grid", "fill": "explainer.fill",
             "network": "explainer.train.network (as resolved)", "seed": "seed"}
    out = []
    for key in dict.fromkeys([*new, *old]):
        a, b = old.get(key), new.get(key)
        if _equal(a, b):
            continue
        if key in ("images", "holdout") and isinstance(a, list) and isinstance(b, list):
            added, removed = len(set(b) - set(a)), len(set(a) - set(b))
            what = "training" if key == "images" else "held-out"
            out.append(f"the {what} images ({added} added, {removed} removed: input.dir, input.include/exclude, "
                       f"explainer.train.holdout)")
        elif key in ("train", "preprocess") and isinstance(a, dict) and isinstance(b, dict):
            prefix = "explainer.train" if key == "train" else "preprocess"
            out += [f"{prefix}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in dict.fromkeys([*b, *a])
                    if not _equal(a.get(k), b.get(k))]
        else:
            out.append(f"{names.get(key, key)}: {a!r} -> {b!r}" if key not in ("fingerprint",) else names[key])
    return out


@dataclass
class TrainResult:
    path: Path
    epochs: int
    seconds: float
    model_evaluations: int
    val_loss: float | None
    val_r2: float | None
    kernel_pearson: float | None


def shapley_masks(rng: np.random.Generator, n: int, pairs: int, m: int) -> np.ndarray:
    """(n, 2 * pairs, m) bool coalitions from the Shapley kernel, each followed (after the first
    ``pairs``) by its complement: sizes 1..m-1 with p(s) ~ (m-1)/(s(m-s)), players uniform."""
    sizes = np.arange(1, m)
    p = (m - 1) / (sizes * (m - sizes))
    s = rng.choice(sizes, size=(n, pairs), p=p / p.sum())
    ranks = rng.random((n, pairs, m)).argsort(-1).argsort(-1)
    masks = ranks < s[..., None]
    return np.concatenate([masks, ~masks], axis=1)


def _view(img: Any, preprocess: Any, rng: np.random.Generator | None) -> np.ndarray:
    """The picture (images.read_picture) resized as the pipeline preprocesses it (uint8 for an 8-bit
    picture, float on the 0-1 scale otherwise); with ``rng`` a random crop of 50-100 % of the area
    (aspect 3:4 to 4:3, in the filter of preprocess.interpolation) and a horizontal flip half the time."""
    from explain_cli.images import picture_size, resize

    if rng is None:
        return resize(img, preprocess)
    width, height = picture_size(img)
    area = width * height * rng.uniform(0.5, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = int(min(width, max(1, round(math.sqrt(area * ratio)))))
    h = int(min(height, max(1, round(math.sqrt(area / ratio)))))
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    out = resize(img, preprocess, box=(x0, y0, x0 + w, y0 + h))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save through write.atomic_write (a temporary file in the same folder, fsync, rename): a
    kill leaves the old file."""
    atomic_write(path, lambda fh: torch.save(obj, fh), fsync=True)


class _Game:
    """The masking game of a batch of images: model outputs for coalitions, in model batches."""

    def __init__(self, model: torch.nn.Module, labels: np.ndarray, cfg: Config, batch_size: int,
                 fill: Any, device: torch.device, features: torch.nn.Module | None = None) -> None:
        self.model = model
        self.features = features
        self.labels = torch.from_numpy(labels.reshape(-1)).to(device)
        self.mean, self.std = cfg.preprocess.norm
        self.batch_size = batch_size
        self.fill = fill
        self.device = device
        self.evaluations = 0

    def __call__(self, x: torch.Tensor, masks: np.ndarray) -> tuple[Any, ...]:
        """Fill images (B, C, H, W), the feature maps of images and fills (2B, D, h, w; None without
        a features network), v(all) (B, K), v(none) (B, K), v(S) (B, S, K) for images x (B, C, H, W)
        and masks (B, S, M)."""
        n, s = masks.shape[:2]
        fills = masking.fill_images(x, self.fill, self.mean, self.std)
        shown = torch.from_numpy(masks).to(self.device)
        rows = torch.cat([x, fills] + [masking.compose(shown[b], self.labels, x[b], fills[b]) for b in range(n)])
        out, features = amortized.forward_reading_features(self.model, rows, self.batch_size, self.features, 2 * n)
        out = out.float()
        self.evaluations += rows.shape[0]
        return fills, None if features is None else features.float(), out[:n], out[n:2 * n], out[2 * n:].view(n, s, -1)


def _loss(net: torch.nn.Module, weight: torch.Tensor | None, x: torch.Tensor, fills: torch.Tensor,
          features: torch.Tensor | None, masks: torch.Tensor, v_all: torch.Tensor, v_none: torch.Tensor,
          v_s: torch.Tensor) -> torch.Tensor:
    """FastSHAP's loss: mean over images, coalitions and all classes of the squared error."""
    phi = amortized.efficient(amortized.raw_values(net, x, fills, features, weight), v_all - v_none)  # (B, C, M)
    pred = torch.einsum("bsm,bcm->bsc", masks, phi)
    return (v_s - v_none[:, None] - pred).square().mean()


def _player_values(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, k, M) player values read back from painted (N, k, C, H, W) maps."""
    flat = labels.reshape(-1)
    first = np.array([np.flatnonzero(flat == j)[0] for j in range(int(flat.max()) + 1)])
    return values.sum(2).reshape(values.shape[0], values.shape[1], -1)[:, :, first]


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a and b (..., M)."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


@dataclass
class _Setup:
    """What a training works with, resolved before the first step: the settings, the frozen model,
    the game, the explainer network and its optimiser."""

    cfg: Config
    ts: amortized.TrainSettings
    grid: int
    fill: Any
    dev: Any = None
    model: Any = None
    outputs: int = 0
    model_fp: str = ""
    batch_size: int = 0
    labels: Any = None
    kind: str = "pixels"
    classifier: Any = None
    weight: Any = None
    game: Any = None
    net: Any = None
    optimiser: Any = None

    @property
    def players(self) -> int:
        return self.grid * self.grid


@dataclass
class _Data:
    """The training images (cached views) and the held-out ones with their fixed game."""

    names: list[str]
    train_idx: list[int]
    hold_idx: list[int]
    train_photos: list[Any]
    hold_x: Any = None
    hold: Any = None  # (fills, features, masks, v_all, v_none, v_s, variance of the target)


@dataclass
class _Progress:
    """Where the training is: the epochs done, their history, time and model evaluations."""

    start_epoch: int = 0
    history: list[dict[str, Any]] = None  # type: ignore[assignment]
    seconds_before: float = 0.0
    evaluations_before: int = 0
    seconds: float = 0.0
    where: dict[str, Any] = None  # type: ignore[assignment]  # for the line a stop signal prints


def train(cfg: Config, output: Path, restart: bool = False, device: str | None = None,
          option: str = "--output") -> TrainResult:
    """Train, checkpoint each epoch to ``OUTPUT.train``, validate, write ``output`` (see the module doc).
    ``option`` names where ``output`` came from, for the refusal of an unwritable one. The steps:
    check the config, build the model and the game, read the data, resume a state, fit, validate,
    write the explainer file."""
    setup, input_dir = _check_config(cfg)
    output = Path(output)
    check_output_file(output, option)
    _check_not_an_input(cfg, output, option)
    _build_model(setup, device)
    data = _read_data(setup, input_dir)
    _build_network(setup)
    _hold_out(setup, data)
    _cache_views(setup, data)
    signature = _signature(setup, data)
    state_path = output.with_name(output.name + ".train")
    progress = _resume(setup, state_path, signature, restart)
    setup.game.evaluations = progress.evaluations_before
    try:  # only now: a refusal above leaves no folder behind
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option}: cannot create the folder of {output}: {exc.strerror or exc}") from None
    progress.where = {"epoch": progress.start_epoch, "validating": False}
    try:
        with stop_signals():
            _fit(setup, data, progress, signature, state_path)
            setup.net.eval()
            validation, kernel_r = _final_validation(setup, data, progress)
    except TrainStopped as stopped:
        done = progress.where["epoch"]
        during = "the final validation" if progress.where["validating"] else f"epoch {done + 1}/{setup.ts.epochs}"
        kept = (f"the training state after epoch {done} is in {state_path}" if done else
                "no epoch had finished, nothing is kept")
        raise TrainStopped(stopped.signal_name, stopped.code,
                           f"train: stopped by {stopped.signal_name} during {during}; {kept}: rerun the same "
                           f"command to resume") from None
    _save_atomic(_explainer_file(setup, data, progress, validation), output)
    if state_path.exists():
        state_path.unlink()
    return TrainResult(output, len(progress.history), progress.seconds, setup.game.evaluations,
                       validation.get("val_loss"), validation.get("val_r2"), kernel_r)


def _check_config(cfg: Config) -> tuple[_Setup, Path]:
    """The settings, refused (ConfigError naming the key) where they cannot train; the input folder."""
    settings = cfg.explainer_settings
    if settings.name != "amortized":
        raise ConfigError("explainer.name", f"train fits an amortized explainer: set explainer.name: amortized "
                                            f"(with segments: {{grid: G}} and fill), not {settings.name!r}",
                          cfg._source)
    if cfg.model.layer != "input":
        raise ConfigError("model.layer", "the amortized explainer masks input patches: set model.layer: input",
                          cfg._source)
    setup = _Setup(cfg, settings.train, settings.grid(), settings.fill_or_default())
    grid = setup.grid
    if cfg.preprocess.transform is not None:
        raise ConfigError("preprocess.transform", "train makes random crops of each image with preprocess.size "
                                                  "and friends; a user transform cannot be cropped: train with the "
                                                  "preprocess keys that match it", cfg._source)
    size = min(cfg.preprocess.shape)
    if grid < 2:
        raise ConfigError("explainer.segments.grid", f"a {grid} x {grid} grid is one player, whose value is always "
                                                     "v(all) - v(none): nothing to train; use grid: 2 or more",
                          cfg._source)
    if grid > size:
        raise ConfigError("explainer.segments.grid", f"a {grid} x {grid} grid needs images of at least {grid} px "
                                                     f"(preprocess.size is {size})", cfg._source)
    input_dir = cfg.resolve(cfg.input.dir)
    if not input_dir.is_dir():
        raise ConfigError("input.dir", f"not a folder: {input_dir}", cfg._source)
    return setup, input_dir


def _check_not_an_input(cfg: Config, output: Path, option: str) -> None:
    """UserError when the explainer file would overwrite the model's checkpoint or the config."""
    from explain_cli.models import checkpoint_path

    model_file = checkpoint_path(cfg.model.checkpoint, cfg.resolve) if cfg.model.checkpoint else None
    for what, other in (("model.checkpoint", model_file), ("the config file", cfg._source)):
        if other is not None and os.path.realpath(output) == os.path.realpath(other):
            raise UserError(f"{option}: {output} is {what}; training would overwrite it: give another file")


def _build_model(setup: _Setup, device: str | None) -> None:
    """The frozen model on its device, under the config's precision; its outputs and fingerprint."""
    from explain_cli.autobatch import initial_batch_size
    from explain_cli.job import resolve_device
    from explain_cli.models import build_model, count_outputs

    cfg = setup.cfg
    setup.dev = dev = resolve_device(device or cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, lambda p: cfg.resolve(p))
    setup.outputs = count_outputs(model, cfg.preprocess.input_shape)
    setup.model_fp = amortized.fingerprint(model)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # precision as in run: the game's evaluations (and the validation's kernel) under autocast, so the
    # explainer learns the game run will play; the explainer network itself trains in float32.
    setup.model = _precision.with_precision(model, cfg.precision, dev)
    setup.batch_size, _ = initial_batch_size(cfg.batch_size, dev)


def _read_data(setup: _Setup, input_dir: Path) -> _Data:
    """Data: the readable images of the input folder (a slide config's tiles), split into training
    and held-out images by the seed."""
    from explain_cli.discover import discover_images, source_path
    from explain_cli.images import read_picture, to_picture

    cfg, ts = setup.cfg, setup.ts
    rels = discover_images(input_dir, cfg.input.include, cfg.input.exclude)
    tiles = None
    if cfg.slides is not None:  # a slide config trains on its tiles (a seeded sample: all are held in memory)
        from explain_cli.slides.plan import plan_slides
        from explain_cli.slides.source import TileSource

        plans = plan_slides(input_dir, rels, cfg.slides)
        tiles = TileSource(input_dir, plans)
        rels = plans.images
        if len(rels) > MAX_TRAIN_TILES:
            rels = sorted(random.Random(cfg.seed).sample(rels, MAX_TRAIN_TILES))
    photos, names = [], []
    for rel in rels:
        try:
            photos.append(to_picture(tiles.image(rel), cfg.preprocess) if tiles is not None
                          else read_picture(source_path(input_dir, rel), cfg.preprocess))
            names.append(rel)
        except ImageError as exc:
            log.warning("train: skipping %s (%s)", rel, exc)
    if not photos:
        raise UserError(f"train: no readable image in {input_dir} (check input.include/exclude)")
    order = np.random.default_rng(cfg.seed).permutation(len(photos))
    n_hold = 0 if ts.holdout == 0 or len(photos) < 2 else min(len(photos) - 1, max(1, round(ts.holdout * len(photos))))
    hold_idx, train_idx = sorted(order[:n_hold].tolist()), sorted(order[n_hold:].tolist())
    log.info("train: %d images for training, %d held out for validation; %d x %d players, fill %s, "
             "%d model outputs, device %s", len(train_idx), n_hold, setup.grid, setup.grid, setup.fill,
             setup.outputs, setup.dev)
    return _Data(names, train_idx, hold_idx, photos)  # train_photos: every picture until _cache_views


def _build_network(setup: _Setup) -> None:
    """Game: the masking game of the grid's players; the explainer network (a head on the model's
    feature map, or the pixels network) and its optimiser."""
    cfg, ts, dev = setup.cfg, setup.ts, setup.dev
    height, width = cfg.preprocess.shape
    setup.labels = masking.grid_labels(height, width, setup.grid)
    channels = cfg.preprocess.input_shape[0]
    found = None if ts.network == "pixels" else amortized.find_feature_map(setup.model, cfg.preprocess.shape,
                                                                            channels, setup.outputs, dev)
    if ts.network == "features" and found is None:
        raise ConfigError("explainer.train.network", "features needs a model whose outputs are a linear layer of "
                                                     "the global average of a feature map (most CNNs); this one is "
                                                     "not: use network: pixels (or auto)", cfg._source)
    setup.kind = "features" if found is not None else "pixels"
    feature_module, setup.classifier = found if found is not None else (None, None)
    setup.weight = None if setup.classifier is None else setup.classifier.weight
    log.info("train: explainer network %s%s", setup.kind, "" if found is None else
             f" (a head on the {setup.classifier.in_features}-channel feature map before global pooling)")
    setup.game = _Game(setup.model, setup.labels, cfg, setup.batch_size, setup.fill, dev, feature_module)
    if setup.kind == "features":
        setup.net = amortized.FeatureNet(setup.classifier.in_features, setup.grid, 8 * ts.width).to(dev)
    else:
        setup.net = amortized.ExplainerNet(channels, setup.outputs, setup.grid, ts.width).to(dev)
    setup.optimiser = torch.optim.Adam(setup.net.parameters(), lr=ts.learning_rate)


def _hold_out(setup: _Setup, data: _Data) -> None:
    """Held-out images: preprocessed exactly as run does, fixed coalitions, model outputs once."""
    from explain_cli.images import normalise

    cfg, ts, dev, game = setup.cfg, setup.ts, setup.dev, setup.game
    n_hold = len(data.hold_idx)
    if not n_hold:
        return
    photos = data.train_photos
    hold_x = torch.from_numpy(np.stack([normalise(_view(photos[i], cfg.preprocess, None), cfg.preprocess)
                                        for i in data.hold_idx])).to(dev)
    hold_masks = shapley_masks(np.random.default_rng([cfg.seed, 7_919]), n_hold, ts.pairs, setup.players)
    with torch.no_grad():
        hold_out = [game(hold_x[a:b], hold_masks[a:b]) for a, b in _utils.chunk_ranges(n_hold, ts.images_per_step)]
    fills, v_all, v_none, v_s = (torch.cat([p[i] for p in hold_out]) for i in (0, 2, 3, 4))
    features = None if setup.kind == "pixels" else torch.cat([torch.cat([p[1][:len(p[0])] for p in hold_out]),
                                                              torch.cat([p[1][len(p[0]):] for p in hold_out])])
    target = v_s - v_none[:, None]
    data.hold_x = hold_x
    data.hold = (fills, features, torch.from_numpy(hold_masks).float().to(dev), v_all, v_none, v_s,
                 float((target - target.mean()).square().mean()))


def _cache_views(setup: _Setup, data: _Data) -> None:
    """Cached photos for the training views: at most twice the model's input on the short side."""
    size = min(setup.cfg.preprocess.shape)
    photos = data.train_photos
    cached = []
    for i in data.train_idx:
        img = photos[i]
        short = 0 if isinstance(img, np.ndarray) else min(img.size)  # arrays (16-bit, N channels): kept whole
        if short > 2 * size:
            scale = 2 * size / short
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        cached.append(img)
    data.train_photos = cached


def _signature(setup: _Setup, data: _Data) -> dict[str, Any]:
    """What a training state must have been made with to be resumed."""
    cfg, ts = setup.cfg, setup.ts
    return {"fingerprint": setup.model_fp, "arch": cfg.model.arch, "outputs": setup.outputs, "grid": setup.grid,
            "fill": setup.fill, "preprocess": amortized.preprocess_record(cfg.preprocess),
            "train": {k: v for k, v in ts.model_dump(mode="json").items() if k not in RESUMABLE_KEYS},
            "network": setup.kind,
            "images": [data.names[i] for i in data.train_idx], "holdout": [data.names[i] for i in data.hold_idx],
            "seed": int(cfg.seed)}


def _resume(setup: _Setup, state_path: Path, signature: dict[str, Any], restart: bool) -> _Progress:
    """Checkpoint: the state of an interrupted training of the same signature, loaded into the
    network and optimiser (UserError for another training's or a damaged state); a fresh start
    without one (or with ``restart``)."""
    progress = _Progress(history=[])
    if not state_path.exists() or restart:
        return progress
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{state_path}: not a training state ({type(exc).__name__}); delete it or pass --restart") from None
    if not isinstance(state, dict) or not _equal(state.get("signature"), signature):
        diffs = signature_differences(state.get("signature") if isinstance(state, dict) else None, signature)
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(f"{state_path} is the state of a training with another config, model or image list "
                        f"({shown}); pass --restart to start over (or delete it)")
    problem = _state_problem(state)
    if problem is None:
        try:
            setup.net.load_state_dict(state["net"])
            setup.optimiser.load_state_dict(state["optimiser"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            problem = f"its network or optimiser does not fit ({type(exc).__name__}: {str(exc)[:200]})"
    if problem is not None:
        raise UserError(f"{state_path}: not a training state of this explain-cli ({problem}); delete it or "
                        f"pass --restart")
    progress.start_epoch, progress.history = int(state["epoch"]), list(state["history"])
    progress.seconds_before, progress.evaluations_before = float(state["seconds"]), int(state["evaluations"])
    epochs = setup.ts.epochs
    log.info("train: resuming from %s after epoch %d of %d", state_path, progress.start_epoch, epochs)
    if progress.start_epoch > epochs:
        log.warning("train: the state is after epoch %d, more than explainer.train.epochs (%d): the explainer "
                    "is written as trained (%d epochs)", progress.start_epoch, epochs, progress.start_epoch)
    return progress


def _fit(setup: _Setup, data: _Data, progress: _Progress, signature: dict[str, Any], state_path: Path) -> None:
    """Fit loop: the epochs left, each followed by the held-out loss and the training state on disk."""
    ts = setup.ts
    steps_per_epoch = math.ceil(len(data.train_idx) / ts.images_per_step)
    started = time.monotonic()
    epoch_seconds: list[float] = []
    for epoch in range(progress.start_epoch, ts.epochs):
        t0 = time.monotonic()
        losses = _epoch(setup, data, epoch, steps_per_epoch)
        val_loss, val_r2 = _held_out_loss(setup, data)
        epoch_seconds.append(time.monotonic() - t0)
        progress.history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_loss": val_loss,
                                 "val_r2": val_r2})
        elapsed = progress.seconds_before + time.monotonic() - started
        _save_atomic({"signature": signature, "net": setup.net.state_dict(), "optimiser": setup.optimiser.state_dict(),
                      "epoch": epoch + 1, "history": progress.history, "seconds": elapsed,
                      "evaluations": setup.game.evaluations}, state_path)
        progress.where["epoch"] = epoch + 1
        eta = float(np.mean(epoch_seconds)) * (ts.epochs - epoch - 1)
        val = "" if val_loss is None else f", held-out loss {val_loss:.4g} (R^2 {val_r2:.3f})"
        log.info("train: epoch %d/%d loss %.4g%s, %.1f s/epoch, ETA %s", epoch + 1, ts.epochs,
                 progress.history[-1]["loss"], val, epoch_seconds[-1], format_seconds(eta))
    progress.seconds = progress.seconds_before + time.monotonic() - started


def _epoch(setup: _Setup, data: _Data, epoch: int, steps_per_epoch: int) -> list[float]:
    """One pass over the training images (random views and coalitions from the seed and the epoch
    only, so a resumed training is the same); the step losses."""
    from explain_cli.images import normalise

    cfg, ts, dev, net, optimiser = setup.cfg, setup.ts, setup.dev, setup.net, setup.optimiser
    total_steps = ts.epochs * steps_per_epoch
    t0 = time.monotonic()
    rng = np.random.default_rng([cfg.seed, epoch])
    perm = rng.permutation(len(data.train_idx))
    losses, last_line = [], t0
    net.train()
    for step, (a, b) in enumerate(_utils.chunk_ranges(len(perm), ts.images_per_step)):
        views = np.stack([_view(data.train_photos[j], cfg.preprocess, rng if ts.augment else None) for j in perm[a:b]])
        x = torch.from_numpy(normalise(views, cfg.preprocess)).to(dev)
        masks = shapley_masks(rng, b - a, ts.pairs, setup.players)
        with torch.no_grad():
            fills, features, v_all, v_none, v_s = setup.game(x, masks)
        lr = 0.5 * ts.learning_rate * (1 + math.cos(math.pi * (epoch * steps_per_epoch + step) / total_steps))
        for group in optimiser.param_groups:
            group["lr"] = lr
        with torch.enable_grad():  # also when the caller has switched autograd off
            loss = _loss(net, setup.weight, x, fills, features, torch.from_numpy(masks).float().to(dev), v_all, v_none,
                         v_s)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if time.monotonic() - last_line > 30:
            last_line = time.monotonic()
            log.info("train: epoch %d/%d step %d/%d loss %.4g", epoch + 1, ts.epochs, step + 1,
                     steps_per_epoch, float(np.mean(losses)))
    return losses


def _held_out_loss(setup: _Setup, data: _Data) -> tuple[float | None, float | None]:
    """Validation: the loss on the held-out images and its R^2 (None without held-out images)."""
    hold = data.hold
    if hold is None:
        return None, None
    setup.net.eval()
    with torch.no_grad():
        val_loss = float(_loss(setup.net, setup.weight, data.hold_x, *hold[:6]))
    return val_loss, (1 - val_loss / hold[6] if hold[6] > 0 else None)


def _final_validation(setup: _Setup, data: _Data, progress: _Progress) -> tuple[dict[str, Any], float | None]:
    """The explainer file's ``validation``: the last held-out loss and, on some held-out images, the
    median Pearson r against Kernel SHAP (validation_size says how many, with how many samples)."""
    ts, game, hold = setup.ts, setup.game, data.hold
    n_hold = len(data.hold_idx)
    kernel_r = None
    validation: dict[str, Any] = {"holdout_images": n_hold}
    if progress.history:
        validation.update(val_loss=progress.history[-1]["val_loss"], val_r2=progress.history[-1]["val_r2"])
    count, nsamples = validation_size(n_hold, ts.validate_images, ts.validate_nsamples, game.evaluations)
    if hold is not None and nsamples > 0:
        progress.where["validating"] = True
        log.info("train: validating on %d held-out image(s) against Kernel SHAP with %d samples each "
                 "(%d model evaluations, %.0f %% of the training's %d)", count, nsamples, count * nsamples,
                 100 * count * nsamples / max(game.evaluations, 1), game.evaluations)
        feats = None if hold[1] is None else torch.cat([hold[1][:count], hold[1][n_hold:n_hold + count]])
        t_val = time.monotonic()
        kernel_r = _validate(setup.net, setup.weight, setup.model, data.hold_x[:count], hold[0][:count], feats,
                             hold[3][:count], hold[4][:count], setup.cfg, setup.grid, setup.fill, nsamples,
                             setup.batch_size, setup.dev, setup.labels)
        validation.update(kernel_nsamples=nsamples, kernel_images=count, kernel_median_pearson=kernel_r,
                          kernel_seconds=round(time.monotonic() - t_val, 3))
        log.info("train: median Pearson r against Kernel SHAP (%d samples) on held-out images: %.3f "
                 "(validation %.1f s, training %.1f s)", nsamples, kernel_r, time.monotonic() - t_val,
                 progress.seconds)
    return validation, kernel_r


def _explainer_file(setup: _Setup, data: _Data, progress: _Progress, validation: dict[str, Any]) -> dict[str, Any]:
    """What explainer.pt holds: the model it is for, the players, the network and its weights, the
    training and its validation."""
    cfg, ts = setup.cfg, setup.ts
    return {
        "format": amortized.FORMAT, "version": amortized.VERSION,
        "model": {"arch": cfg.model.arch, "fingerprint": setup.model_fp, "outputs": setup.outputs},
        "players": {"grid": setup.grid}, "fill": setup.fill,
        "preprocess": amortized.preprocess_record(cfg.preprocess),
        "network": {"kind": setup.kind, "channels": cfg.preprocess.input_shape[0], "outputs": setup.outputs,
                    "grid": setup.grid, "width": ts.width,
                    "dim": 0 if setup.classifier is None else int(setup.classifier.in_features)},
        "state_dict": {k: v.detach().cpu() for k, v in setup.net.state_dict().items()},
        "training": {"images": len(data.train_idx), "epochs": len(progress.history), "pairs": ts.pairs,
                     "seconds": round(progress.seconds, 3), "model_evaluations": setup.game.evaluations,
                     "history": progress.history, "seed": int(cfg.seed)},
        "validation": validation,
    }


def _validate(net: torch.nn.Module, weight: torch.Tensor | None, model: torch.nn.Module, x: torch.Tensor,
              fills: torch.Tensor, features: torch.Tensor | None, v_all: torch.Tensor, v_none: torch.Tensor, cfg: Config, grid: int, fill: Any, nsamples: int, batch_size: int,
              dev: torch.device, labels: np.ndarray) -> float:
    """Median Pearson r, over held-out images and their top-3 classes, of the explainer's values
    against Kernel SHAP's with ``nsamples`` coalitions over the same players and fill."""
    from explain_cli.explainers import kernel
    from explain_cli.explainers.base import ExplainContext

    settings = kernel.Settings(segments={"grid": grid}, fill=fill, nsamples=nsamples)
    context = ExplainContext(model=model, layer=None, layer_name="input", background=x[:0],
                             mean=cfg.preprocess.norm[0], std=cfg.preprocess.norm[1], device=dev,
                             batch_size=batch_size, settings=settings, precision=cfg.precision)
    explainer = kernel.Explainer(context)
    parts, started, last_line = [], time.monotonic(), 0.0
    for i in range(x.shape[0]):  # one image at a time: a progress line while minutes pass
        parts.append(explainer.explain(x[i:i + 1], min(3, v_all.shape[1]), [i]))
        now = time.monotonic()
        if now - last_line > 10 or i + 1 == x.shape[0]:
            last_line = now
            eta = (now - started) / (i + 1) * (x.shape[0] - i - 1)
            log.info("train: validation image %d/%d against Kernel SHAP, %.1f s/image, ETA %s", i + 1, x.shape[0],
                     (now - started) / (i + 1), format_seconds(eta))
    ref = _player_values(np.concatenate([p.values for p in parts]), labels)  # (N, k, M)
    classes = torch.from_numpy(np.concatenate([p.classes for p in parts])).to(dev)
    with torch.no_grad():
        phi = amortized.efficient(amortized.raw_values(net, x, fills, features, weight), v_all - v_none)  # (N, C, M)
        ours = phi.gather(1, classes[:, :, None].expand(-1, -1, phi.shape[-1])).cpu().numpy()
    return float(np.nanmedian(pearson_rows(ours, ref)))


def check_output_file(output: Path, option: str = "--output") -> None:
    """Refuse, before any model work, an explainer file that could not be written: a folder, a path
    below a file, a read-only or unwritable folder (UserError naming the path, exit 2)."""
    from explain_cli.config import check_output_dir

    state = output.with_name(output.name + ".train")
    # the longest name written beside it (_save_atomic's temporary file of the state), tried below
    longest = output.with_name(atomic_temp_name(state))
    too_long = max(len(os.fsencode(state.name)), len(os.fsencode(longest.name)))
    if too_long > 255:  # NAME_MAX of common file systems
        raise UserError(f"{option}: the file name {output.name!r} is too long (its training state's "
                        f"file would be {too_long} bytes)")
    try:
        if output.is_dir():
            raise UserError(f"{option}: {output} is a folder; give the explainer file, e.g. {output / 'explainer.pt'}")
        if state.is_dir():
            raise UserError(f"{option}: {state}, where the training state of {output.name} goes, is a folder")
        check_output_dir(output.parent, key=option)
        if output.exists() and not os.access(output, os.W_OK) and not os.access(output.parent, os.W_OK):
            raise UserError(f"{option}: cannot replace {output}: permission denied")
        if output.parent.is_dir():  # a file system with shorter names, or one that refuses some characters
            with open(longest, "x"):
                pass
            longest.unlink()
    except OSError as exc:  # a folder name too long, a parent we may not stat, a name refused
        raise UserError(f"{option}: cannot write {output}: {exc.strerror or exc}") from None


def _equal(a: Any, b: Any) -> bool:
    """``a == b`` for data read from a file, where a forged tensor makes ``==`` ambiguous."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _state_problem(state: dict[str, Any], epochs: int = 100_000) -> str | None:
    """Why a ``.train`` state with the right signature cannot be resumed (None: it can). ``epochs``
    bounds its epoch: the schema's most, as the count may change on a resume."""
    number = (int, float)
    if not isinstance(state.get("net"), dict) or not isinstance(state.get("optimiser"), dict):
        return "'net' and 'optimiser' must be mappings"
    epoch = state.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= epochs:
        return f"'epoch' must be an integer 0..{epochs}"
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch or not all(isinstance(h, dict) for h in history):
        return "'history' must list one mapping per epoch done"
    for key in ("seconds", "evaluations"):
        value = state.get(key)
        if not isinstance(value, number) or isinstance(value, bool) or not 0 <= value < 1e18:
            return f"'{key}' must be a number"
    return None
