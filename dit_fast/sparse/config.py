"""``SparseAttention``: which sparse pattern, how dense, when, and the calibrated choice per layer and head.

    sparse = dit_fast.SparseAttention(pattern="sliding_tile", density=0.25, dense_steps=10, tolerance=0.05)
    dit_fast.patch(pipe.transformer, sparse=sparse)        # Wan 2.1 / 2.2, HunyuanVideo
    pipe(prompt, ...)                                       # the first sparse step calibrates
    sparse.save("wan-480p.sparse.json")                     # ... once per model and resolution
    dit_fast.patch(other.transformer, sparse=dit_fast.SparseAttention.load("wan-480p.sparse.json"))

Fields (all validated: a ValueError / TypeError naming the field):
    pattern       a name of dit_fast.sparse.PATTERNS ("sliding_tile", "radial", "topk"), or several (the
                  calibration then chooses among all of them, per layer and head)
    density       the sparsest kept fraction allowed, of the video token pairs (the text is always dense),
                  in (0, 1]; 1 keeps every tile: dense attention computed by the block-sparse op
    dense_steps   the first denoising steps run dense (the step read from the timestep: schedule.py)
    dense_layers  attention layers (0-based, the model's order) that stay dense
    tolerance     None: every sparse layer and head runs ``pattern`` at ``density`` (one pattern). A number:
                  on the first sparse step each layer measures, per head, the relative error
                  ||o_candidate - o_dense|| / ||o_dense|| of every candidate (each pattern at densities
                  density, density * sqrt(2), ..., up to dense) and keeps the sparsest within tolerance
                  (dense when none is)
    tile          (tt, th, tw) tokens per 3D tile, the unit of sparsity (the latent grid, after patching)
    local         topk's local window in tiles per axis (kept besides the top-k tiles)

The choices (per token grid, layer and head: a pattern and its parameters) are kept here, so that
``save`` writes them as a small versioned JSON and ``load`` gives a configuration that reproduces them
exactly, with no calibration. A bad file gives one SparseCalibrationError naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from dit_fast._checks import check_int, check_int_triple, check_number
from dit_fast._files import atomic_write
from dit_fast.ops.sparse_layout import TileLayout
from dit_fast.sparse.patterns import PATTERNS, video_fraction, video_mask

FORMAT = "dit_fast.sparse_calibration"
VERSION = 1
SPARSE_PATTERNS = tuple(name for name in PATTERNS if name != "dense")
DEFAULT_TILE = (4, 4, 4)  # 64 tokens, Video Sparse Attention's and Sliding Tile Attention's cube

Choice = Dict[str, object]  # {"pattern": name, **params}


class SparseCalibrationError(ValueError):
    """A calibration file that cannot be read or does not fit: the message names the file and the key."""


def grid_key(grid: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in grid)


def check_choice(choice, where: str = "choice") -> Choice:
    """A {"pattern": name, **params} dict with a known pattern and parameters of the right kinds."""
    if not isinstance(choice, dict) or choice.get("pattern") not in PATTERNS:
        raise ValueError(f"{where} must be a dict with 'pattern' one of {tuple(PATTERNS)}, got {choice!r}")
    allowed = {"sliding_tile": {"window"}, "radial": {"decay", "dense_radius", "sink"}, "topk": {"keep", "local"},
               "dense": set()}[choice["pattern"]]
    extra = set(choice) - allowed - {"pattern"}
    if extra:
        raise ValueError(f"{where}: pattern {choice['pattern']!r} takes {sorted(allowed)}, got unknown {sorted(extra)}")
    out = {"pattern": choice["pattern"]}
    for key in sorted(allowed):
        if key not in choice:
            raise ValueError(f"{where}: pattern {choice['pattern']!r} needs {key!r}")
        value = choice[key]
        if key in ("window", "local"):
            value = list(check_int_triple(f"{where}.{key}", value))
        elif key == "decay":
            value = check_number(f"{where}.decay", value, 0, low_open=True)
        elif key in ("dense_radius", "keep"):
            value = check_int(f"{where}.{key}", value, low=0)
        elif key == "sink" and not isinstance(value, bool):
            raise TypeError(f"{where}.sink must be true or false, got {value!r}")
        out[key] = value
    return out


def _keeps_everything(choice: Choice, layout: TileLayout) -> bool:
    """Whether a choice keeps every tile pair (dense: no candidate of its own)."""
    if choice["pattern"] == "topk":
        return choice["keep"] + math.prod(choice["local"]) >= layout.n_video_tiles
    return video_fraction(layout, video_mask(choice, layout)) >= 1 - 1e-12


class SparseAttention:
    """Block-sparse attention for a video DiT: the pattern(s), the density, the schedule, the calibration
    and its cache (module docstring). Pass it to ``dit_fast.patch(transformer, sparse=...)`` or
    ``DiTVideo(attention="block_sparse", sparse=...)``."""

    def __init__(self, pattern: Union[str, Sequence[str]] = "sliding_tile", density: float = 0.25,
                 dense_steps: int = 0, dense_layers: Iterable[int] = (), tolerance: Optional[float] = None,
                 tile: Sequence[int] = DEFAULT_TILE, local: Sequence[int] = (1, 1, 1)):
        names = ((pattern,) if isinstance(pattern, str) else tuple(pattern) if isinstance(pattern, (list, tuple))
                 else None)
        if not names or any(n not in SPARSE_PATTERNS for n in names) or len(set(names)) != len(names):
            raise ValueError(f"pattern must be one of {SPARSE_PATTERNS} or a sequence of distinct ones, "
                             f"got {pattern!r}")
        self.patterns: Tuple[str, ...] = names
        self.density = check_number("density", density, 0, 1, low_open=True)
        self.dense_steps = check_int("dense_steps", dense_steps, low=0)
        if isinstance(dense_layers, (str, bytes)) or not isinstance(dense_layers, Iterable):
            raise TypeError(f"dense_layers must be a sequence of layer indices, got {dense_layers!r}")
        self.dense_layers = tuple(sorted({check_int("dense_layers[]", i, low=0) for i in dense_layers}))
        self.tolerance = None if tolerance is None else check_number("tolerance", tolerance, 0, low_open=True)
        if self.tolerance is None and len(names) > 1:
            raise ValueError(f"pattern {names}: choosing among several patterns needs a tolerance (the calibration "
                             "picks, per layer and head, the sparsest within it); give tolerance=... or one pattern")
        self.tile = check_int_triple("tile", tile)
        self.local = check_int_triple("local", local)
        self.model: Optional[str] = None  # the model class it was calibrated on / bound to
        self.choices: Dict[str, Dict[int, List[Choice]]] = {}  # grid key -> layer -> one choice per head

    # ---- what the configuration asks for ----

    @property
    def pattern(self) -> Union[str, Tuple[str, ...]]:
        return self.patterns[0] if len(self.patterns) == 1 else self.patterns

    def is_dense(self, layer: int, step: Optional[int]) -> bool:
        """Whether ``layer`` runs dense at denoising ``step`` (None: no schedule, e.g. training)."""
        return layer in self.dense_layers or (step is not None and step < self.dense_steps)

    def layout(self, grid: Sequence[int], extra: int = 0) -> TileLayout:
        """The tiles of a (T, H, W) token grid (tiles clipped to the grid) plus ``extra`` text tokens."""
        grid = tuple(int(n) for n in grid)
        if len(grid) != 3:
            raise ValueError(f"grid must be the (T, H, W) token grid, got {grid}")
        return TileLayout(grid, tuple(min(t, n) for t, n in zip(self.tile, grid, strict=True)), int(extra))

    def density_choice(self, layout: TileLayout, name: Optional[str] = None, density: Optional[float] = None) -> Choice:
        """Pattern ``name`` (default: the first) at ``density`` (default: the configured one)."""
        name = name or self.patterns[0]
        density = self.density if density is None else density
        options = {"local": list(self.local)} if name == "topk" else {}
        return {"pattern": name, **PATTERNS[name].for_density(layout, density, **options)}

    def candidates(self, layout: TileLayout) -> List[Choice]:
        """The calibration's candidates, each pattern at densities density * sqrt(2)^i below 1, then dense;
        distinct, in the order tried (the calibration keeps the first, per head, within tolerance: the
        sparsest by construction within one pattern; across patterns by the density asked)."""
        levels = []
        d = self.density
        while d < 1 - 1e-9:
            levels.append(d)
            d *= math.sqrt(2)
        seen, out = set(), []
        for density in levels:
            for name in self.patterns:
                choice = self.density_choice(layout, name, density)
                key = json.dumps(choice, sort_keys=True)
                if key not in seen and not _keeps_everything(choice, layout):
                    seen.add(key)
                    out.append(choice)
        return out + [{"pattern": "dense"}]

    # ---- the cache of choices ----

    def choices_for(self, grid: Sequence[int], layer: int) -> Optional[List[Choice]]:
        return self.choices.get(grid_key(grid), {}).get(layer)

    def record(self, grid: Sequence[int], layer: int, choices: List[Choice]) -> None:
        self.choices.setdefault(grid_key(grid), {})[layer] = [dict(c) for c in choices]

    def bind(self, model_name: str) -> None:
        """Ties the calibration to a model class: a loaded calibration of another class is refused."""
        if self.model is not None and self.model != model_name and self.choices:
            raise ValueError(f"this SparseAttention holds a calibration for {self.model}, not {model_name}: use a "
                             "fresh SparseAttention (or one loaded from that model's file)")
        self.model = model_name

    # ---- save / load ----

    def to_dict(self) -> dict:
        """The configuration alone (no calibration): what a training run's config stores."""
        return {"pattern": list(self.patterns), "density": self.density, "dense_steps": self.dense_steps,
                "dense_layers": list(self.dense_layers), "tolerance": self.tolerance, "tile": list(self.tile),
                "local": list(self.local)}

    @classmethod
    def from_dict(cls, config: dict) -> "SparseAttention":
        """The inverse of to_dict (a pattern may also be one name)."""
        if not isinstance(config, dict):
            raise TypeError(f"a SparseAttention configuration is a dict of its fields, got {type(config).__name__}")
        pattern = config.get("pattern", ("sliding_tile",))
        return cls(**{**config, "pattern": tuple(pattern) if isinstance(pattern, list) else pattern})

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Writes the configuration and every calibrated choice as JSON, atomically (dit_fast/_files.py)."""
        data = {"format": FORMAT, "version": VERSION, "model": self.model, "config": self.to_dict(),
                "calibrations": [{"grid": [int(n) for n in key.split("x")], "layers": {
                    str(layer): choices for layer, choices in sorted(layers.items())}}
                    for key, layers in sorted(self.choices.items())]}
        path = os.fspath(path)

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)

        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SparseAttention":
        """A configuration with the saved choices: SparseCalibrationError naming the file and key if bad."""
        path = os.fspath(path)

        def fail(key, message):
            return SparseCalibrationError(f"sparse calibration {path!r}, key {key!r}: {message}")

        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise SparseCalibrationError(f"sparse calibration {path!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SparseCalibrationError(f"sparse calibration {path!r} is not readable JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise fail("format", f"expected {FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r}")
        if data.get("version") != VERSION:
            raise fail("version", f"this dit_fast reads version {VERSION}, got {data.get('version')!r}")
        if data.get("model") is not None and not isinstance(data["model"], str):
            raise fail("model", f"expected a model class name, got {data['model']!r}")
        try:
            sparse = cls.from_dict(data.get("config", {}))
        except (TypeError, ValueError) as exc:
            raise fail("config", str(exc)) from None
        sparse.model = data.get("model")
        calibrations = data.get("calibrations", [])
        if not isinstance(calibrations, list):
            raise fail("calibrations", f"expected a list, got {type(calibrations).__name__}")
        for i, entry in enumerate(calibrations):
            where = f"calibrations[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict):
                raise fail(where, "expected {'grid': [T, H, W], 'layers': {layer: [choice per head]}}")
            try:
                grid = check_int_triple(f"{where}.grid", entry.get("grid"))
            except (TypeError, ValueError) as exc:
                raise fail(f"{where}.grid", str(exc)) from None
            for layer, choices in entry["layers"].items():
                key = f"{where}.layers.{layer}"
                if not str(layer).isdigit() or not isinstance(choices, list) or not choices:
                    raise fail(key, f"expected a layer index and a non-empty list of per-head choices, got {choices!r}")
                try:
                    checked = [check_choice(c, f"{key}[{h}]") for h, c in enumerate(choices)]
                except (TypeError, ValueError) as exc:
                    raise fail(key, str(exc)) from None
                sparse.record(grid, int(layer), checked)
        return sparse

    # ---- the command line's spec ----

    @classmethod
    def from_spec(cls, spec: str) -> "SparseAttention":
        """``PATTERN[+PATTERN...][:key=value,...]``, e.g. ``sliding_tile:density=0.25,dense_steps=2`` or
        ``radial+topk:density=0.1,tolerance=0.05,tile=4x4x4,dense_layers=0/1``."""
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"a sparse spec is PATTERN[:key=value,...], got {spec!r}")
        names, _, rest = spec.partition(":")
        kwargs: dict = {"pattern": tuple(names.split("+"))}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"sparse spec {spec!r}: {item!r} is not key=value")
            try:
                if key in ("density", "tolerance"):
                    kwargs[key] = float(value)
                elif key == "dense_steps":
                    kwargs[key] = int(value)
                elif key == "dense_layers":
                    kwargs[key] = [int(i) for i in value.split("/") if i]
                elif key in ("tile", "local"):
                    kwargs[key] = tuple(int(n) for n in value.split("x"))
                else:
                    raise ValueError(f"unknown key {key!r} (density, tolerance, dense_steps, dense_layers, tile, "
                                     "local)")
            except ValueError as exc:
                raise ValueError(f"sparse spec {spec!r}: {exc}") from None
        return cls(**kwargs)

    def spec(self) -> str:
        """The spec string of this configuration (from_spec(spec()) equals it, calibration aside)."""
        parts = [f"density={self.density!r}", f"dense_steps={self.dense_steps}",
                 "tile=" + "x".join(map(str, self.tile))]
        if self.dense_layers:
            parts.append("dense_layers=" + "/".join(map(str, self.dense_layers)))
        if self.tolerance is not None:
            parts.append(f"tolerance={self.tolerance!r}")
        if self.local != (1, 1, 1):
            parts.append("local=" + "x".join(map(str, self.local)))
        return "+".join(self.patterns) + ":" + ",".join(parts)

    def __repr__(self):
        calibrated = sum(len(layers) for layers in self.choices.values())
        return f"SparseAttention({self.spec()!r}, model={self.model!r}, calibrated layers={calibrated})"


__all__ = ["SparseAttention", "SparseCalibrationError", "check_choice", "SPARSE_PATTERNS", "FORMAT", "VERSION"]
