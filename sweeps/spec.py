"""Sweep files: parse and validate configs/sweeps/*.yaml, and expand them into trials.

A sweep file names a base preset, fixed overrides, and axes (grid lists or random draws). The
trials are the cross product of the grid axes, times `trials` random draws per grid point. Every
trial's overrides are checked with configs.load_config before anything is launched, so a typo in
the sweep file costs a one-line error, not a failed sweep.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import math
import random
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from store.paths import as_path
from configs import Config, ConfigError, load_config
from configs.loader import CONFIG_DIR, resolve_path

if typing.TYPE_CHECKING:
    from sweeps.executor import ExecutorSpec

ROOT = CONFIG_DIR.parent
FIELDS = ("base", "overrides", "axes", "trials", "seed", "metric", "parallel", "sweep_dir", "share_tokenizer",
          "executor")
KINDS = ("grid", "uniform", "log_uniform", "choice")
RANDOM_KINDS = ("uniform", "log_uniform", "choice")


class SweepError(ConfigError):
    """A bad sweep file: the message is one line naming the field."""


@dataclass(frozen=True)
class Axis:
    key: str                      # as written: train.lr, or linked keys model.d_model,model.mlp_dim
    kind: str                     # grid | uniform | log_uniform | choice
    values: tuple                 # grid/choice values (tuples for linked keys), or (low, high)
    is_int: bool = False          # the config key is an int: random draws are rounded

    @property
    def random(self) -> bool:
        return self.kind in RANDOM_KINDS

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys this axis sets: one, or several moving together (linked)."""
        return tuple(k.strip() for k in self.key.split(","))

    def assign(self, value) -> dict:
        """{config key: value} for one value of this axis."""
        return dict(zip(self.keys, value)) if len(self.keys) > 1 else {self.key: value}


@dataclass(frozen=True)
class Trial:
    id: str                       # t000, t001, ...: also the run directory name
    values: dict                  # axis key -> value for this trial
    overrides: tuple[str, ...]    # fixed overrides + axis values, as key=value strings


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    base: str                     # preset path (as train.py will be given it) or name
    overrides: tuple[str, ...]
    axes: tuple[Axis, ...]
    trials_per_point: int
    seed: int
    metric: str
    direction: str                # min | max
    parallel: int | None          # trials at once; None: 1 locally, as many as a Ray cluster holds
    sweep_dir: Path
    share_tokenizer: bool
    trials: tuple[Trial, ...] = field(default=())
    executor: ExecutorSpec | None = None  # where trials run (sweeps/executor.py); local by default

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def keys(self) -> list[str]:
        """Every swept config key, in file order (linked keys listed separately)."""
        return [k for a in self.axes for k in a.keys]


def format_value(value) -> str:
    """A YAML scalar/list as the right-hand side of a key=value override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def key_type(key: str):
    """The schema type of a dotted config key (int, float, str, bool, tuple), or None if unknown."""
    cls, parts = Config, key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            return None
    return None if dataclasses.is_dataclass(cls) else cls


def _err(field_name: str, msg: str) -> SweepError:
    return SweepError(f"sweep field '{field_name}' {msg}")


def _number(field_name: str, value) -> float:
    if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(field_name, f"expects a number, got {value!r}")
    return value


def _int(field_name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(field_name, f"expects an integer >= {minimum}, got {value!r}")
    return value


def _parse_axis(key: str, spec) -> Axis:
    where = f"axes.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _err(where, f"must be a mapping with one of {', '.join(KINDS)}, e.g. {{grid: [1, 2]}}; got {spec!r}")
    (kind, values), = spec.items()
    if kind not in KINDS:
        near = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise _err(where, f"has unknown kind '{kind}'{hint}; use one of {', '.join(KINDS)}")
    keys = [k.strip() for k in key.split(",")]
    for k in keys:
        if k == "train.run_dir":
            raise _err(where, "cannot be swept: each trial gets its own train.run_dir")
        if key_type(k) is None:
            try:  # the loader's message carries a 'did you mean' hint
                load_config(None, [f"{k}=0"])
            except ConfigError as e:
                raise _err(where, f"is not a config key: {e}") from None
            raise _err(where, f"names '{k}', not a config key (use section.key, e.g. train.lr)")
    if len(set(keys)) != len(keys):
        raise _err(where, "links the same key twice")
    hint = key_type(keys[0])
    if not isinstance(values, list) or not values:
        raise _err(f"{where}.{kind}", f"expects a non-empty list, got {values!r}")
    if len(keys) > 1:  # linked keys move together: each value is a list with one entry per key
        if kind not in ("grid", "choice"):
            raise _err(f"{where}.{kind}", f"cannot draw linked keys; use grid or choice with [{', '.join(keys)}] lists")
        for v in values:
            if not isinstance(v, list) or len(v) != len(keys):
                raise _err(f"{where}.{kind}", f"expects lists of {len(keys)} values ({', '.join(keys)}), got {v!r}")
        return Axis(key, kind, tuple(tuple(v) for v in values))
    if kind in ("uniform", "log_uniform"):
        if len(values) != 2:
            raise _err(f"{where}.{kind}", f"expects [low, high], got {values!r}")
        if hint not in (int, float):
            raise _err(f"{where}.{kind}", f"draws numbers but {key} is {getattr(hint, '__name__', hint)}")
        low, high = (_number(f"{where}.{kind}", v) for v in values)
        if not low < high:
            raise _err(f"{where}.{kind}", f"needs low < high, got {values!r}")
        if kind == "log_uniform" and low <= 0:
            raise _err(f"{where}.{kind}", f"needs positive bounds, got {values!r}")
        values = [low, high]
    return Axis(key, kind, tuple(values), is_int=hint is int)


def _draw(axis: Axis, rng: random.Random):
    """One random value for a random axis; ints are rounded, floats kept to 4 significant digits."""
    if axis.kind == "choice":
        return rng.choice(axis.values)
    low, high = axis.values
    x = (rng.uniform(low, high) if axis.kind == "uniform"
         else math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(round(x)) if axis.is_int else float(f"{x:.4g}")


def expand(axes: tuple[Axis, ...], trials_per_point: int, seed: int, fixed: tuple[str, ...]) -> tuple[Trial, ...]:
    """The trials: grid cross product (file order) x independent random draws, deterministic in seed."""
    rng = random.Random(seed)
    grid = [a for a in axes if not a.random]
    rand = [a for a in axes if a.random]
    out = []
    for point in itertools.product(*(a.values for a in grid)):
        for _ in range(trials_per_point if rand else 1):
            picked = dict(zip((a.key for a in grid), point))
            picked.update({a.key: _draw(a, rng) for a in rand})
            ordered = {k: v for a in axes for k, v in a.assign(picked[a.key]).items()}
            overrides = fixed + tuple(f"{k}={format_value(v)}" for k, v in ordered.items())
            out.append(Trial(f"t{len(out):03d}", ordered, overrides))
    return tuple(out)


def _resolve_base(base, sweep_path: Path) -> str:
    """The base preset as train.py should get it: as written if it resolves from here, else absolute."""
    if not isinstance(base, str) or not base:
        raise _err("base", f"expects a preset path or name, got {base!r}")
    if resolve_path(base).is_file():
        return base
    for parent in (ROOT, sweep_path.parent):
        if (parent / base).is_file():
            return str((parent / base).resolve())
    raise _err("base", f"names no config file: {base!r} (nor configs/{Path(base).stem}.yaml)")


def _overrides(raw) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _err("overrides", f"must be a mapping of config keys to values, got {raw!r}")
    out = []
    for key, value in raw.items():
        if key == "train.run_dir":
            raise _err(f"overrides.{key}", "cannot be set: each trial gets its own train.run_dir")
        if isinstance(value, dict):
            raise _err(f"overrides.{key}", "must be a value; write nested keys dotted (train.lr: 1e-3)")
        out.append(f"{key}={format_value(value)}")
    return tuple(out)


def _metric(raw) -> tuple[str, str]:
    if raw is None:
        return "val_bpb", "min"
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise _err("metric", f"must be a mapping {{name: val_bpb, direction: min}}, got {raw!r}")
    for key in raw:
        if key not in ("name", "direction"):
            raise _err(f"metric.{key}", "is unknown; metric has name and direction")
    name, direction = raw.get("name", "val_bpb"), raw.get("direction", "min")
    if not isinstance(name, str) or not name:
        raise _err("metric.name", f"expects a metrics.jsonl key such as val_bpb, got {name!r}")
    if direction not in ("min", "max"):
        raise _err("metric.direction", f"must be min or max, got {direction!r}")
    return name, direction


def _blame(e: ConfigError, trial: Trial, fixed: tuple[str, ...], axes: list[Axis]) -> SweepError:
    """Turn a trial's config error into a sweep-file error naming the field that set the key."""
    msg = str(e)
    named = {}
    for key in list(trial.values) + [o.split("=", 1)[0] for o in fixed]:
        m = re.search(r"(?<![\w.])" + re.escape(key) + r"(?![\w.])", msg)
        if m:
            named.setdefault(key, m.start())
    if not named:
        shown = ", ".join(trial.overrides[len(fixed):])
        return _err("axes", f"give trial {trial.id} ({shown}) a bad config: {msg}")
    key = min(named, key=named.get)  # the key the message names first
    if key in trial.values:
        axis = next(a for a in axes if key in a.keys)
        value = tuple(trial.values[k] for k in axis.keys) if len(axis.keys) > 1 else trial.values[key]
        return _err(f"axes.{axis.key}", f"value {value!r} is invalid: {msg}")
    return _err(f"overrides.{key}", f"is invalid: {msg}")


def load_sweep(path: str | Path, sweep_dir: str | None = None) -> SweepSpec:
    """Read, validate and expand a sweep file; raises SweepError (one line) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path} must hold a mapping of fields ({', '.join(FIELDS)})")
    for key in raw:
        if key not in FIELDS:
            near = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise SweepError(f"unknown sweep field '{key}'{hint}")
    if "base" not in raw:
        raise _err("base", "is required: the preset path or name the trials start from")
    base = _resolve_base(raw["base"], path)
    fixed = _overrides(raw.get("overrides"))
    if not isinstance(raw.get("axes"), dict) or not raw["axes"]:
        raise _err("axes", "must map at least one config key to {grid: [...]} or a random draw, "
                           f"got {raw.get('axes')!r}")
    fixed_keys = {o.split("=", 1)[0] for o in fixed}
    axes, seen = [], set()
    for key, spec in raw["axes"].items():
        for k in str(key).split(","):
            if k.strip() in fixed_keys:
                raise _err(f"axes.{key}", f"sets {k.strip()}, which overrides also sets; keep it in one place")
            if k.strip() in seen:
                raise _err(f"axes.{key}", f"sets {k.strip()}, which another axis also sets")
            seen.add(k.strip())
        try:
            axes.append(_parse_axis(str(key), spec))
        except SweepError:
            raise
        except ConfigError as e:
            raise _err(f"axes.{key}", f"is invalid: {e}") from None
    has_random = any(a.random for a in axes)
    if has_random and "trials" not in raw:
        raise _err("trials", "is required with random axes (uniform, log_uniform, choice)")
    if not has_random and "trials" in raw:
        raise _err("trials", "applies only to random axes; grid axes already give the trials")
    trials_per_point = _int("trials", raw.get("trials", 1), 1)
    seed = _int("seed", raw.get("seed", 0), 0)
    metric, direction = _metric(raw.get("metric"))
    parallel = _int("parallel", raw["parallel"], 1) if raw.get("parallel") is not None else None
    from sweeps.executor import parse_executor  # here: sweeps.executor imports SweepError from this module
    executor = parse_executor(raw.get("executor"))
    share = raw.get("share_tokenizer", True)
    if not isinstance(share, bool):
        raise _err("share_tokenizer", f"expects true or false, got {share!r}")
    out_dir = sweep_dir or raw.get("sweep_dir") or f"runs/sweeps/{path.stem}"
    if not isinstance(out_dir, str):
        raise _err("sweep_dir", f"expects a directory path, got {out_dir!r}")

    trials = expand(tuple(axes), trials_per_point, seed, fixed)
    # Whole trials only: an override may be invalid alone and valid with the others (n_heads vs
    # n_kv_heads), so each trial's full list is checked and the error blamed on the key it names.
    for trial in trials:
        try:
            load_config(base, list(trial.overrides))
        except ConfigError as e:
            raise _blame(e, trial, fixed, axes) from None
    return SweepSpec(path, base, fixed, tuple(axes), trials_per_point, seed, metric, direction, parallel,
                     as_path(out_dir), share, trials, executor)


def trial_config(spec: SweepSpec, trial: Trial) -> Config:
    """The full config a trial runs with (its run_dir included)."""
    return load_config(spec.base, list(trial.overrides) + [f"train.run_dir={spec.sweep_dir / trial.id}"])


def definition_hash(trial: Trial, base: str) -> str:
    """Identifies what a trial runs, so a rerun can tell that the sweep file changed under it."""
    base = str(resolve_path(base).resolve())  # 'tiny' and 'configs/tiny.yaml' are the same trial
    return hashlib.sha1("\n".join((base,) + trial.overrides).encode()).hexdigest()[:12]
