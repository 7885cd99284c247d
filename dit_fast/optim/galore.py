"""GaLoreAdamW: AdamW whose moments live in a low-rank subspace of each weight's gradient.

GaLore: Zhao et al. 2024, https://arxiv.org/abs/2403.03507. The math is in
dit_fast/optim/reference.py, the checks of settings and loaded state in checks.py, the row-split
(FSDP2) collectives in sharded.py; this file holds the optimizer (state, refresh schedule, backends,
per-layer mode, resume, DDP and FSDP2).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from dit_fast import _backend
from dit_fast.optim import checks
from dit_fast.optim import reference as ref
from dit_fast.optim import sharded
from dit_fast.optim.checks import (DECAY_MODES, KERNEL_VARIANTS, NONFINITE, PLAIN_STEPS, PROJ_TYPES,  # noqa: F401
                                   REFRESH_METHODS, SIDES, STATE_DTYPES)

_STATE_TORCH_DTYPES = checks.STATE_TORCH_DTYPES


def resolve_side(proj_type: str, shape) -> str:
    """Which side the basis sits on, by galore-torch's rules ("std": the smaller dimension)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


class _Geometry(NamedTuple):
    """Where this rank's moment rows sit in the whole moment."""
    shape: tuple  # the whole moment's shape
    start: int  # this rank's first row
    stop: int
    offset: int  # its first element in the flattened whole (int8 blocks count from there)
    fix_absmax: Optional[Callable]  # completes the absmax of blocks shared with another rank (int8, sharded)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore low-rank moments, drop-in for galore-torch's ``GaLoreAdamW``.

    Param groups that carry ``rank`` are projected (their 2-D parameters; any other parameter in
    such a group falls back to the plain step instead of crashing); other groups get the plain step,
    which is torch.optim.AdamW's (``plain_step="adamw"``). galore-torch's group keys work unchanged:
    ``rank``, ``update_proj_gap`` (refresh every that many steps, at steps 0, gap, 2 gap, ...),
    ``scale``, ``proj_type`` in {"std", "reverse_std", "left", "right", "full"}. Every keyword below
    except backend, per_layer, accumulation_steps, sync_basis, seed and nonfinite can also be set per group.

    Args beyond galore-torch:
      state_dtype: "fp32" | "bf16" | "int8": storage of the moments. "int8" keeps them blockwise
        quantized (256 elements per fp32 absmax, companded codes; see reference.py), for projected
        and plain parameters alike, and never copies a full weight.
      refresh: "svd" (exact, galore-torch's) | "randomized" (subspace iteration warm-started from the
        previous basis, ``refresh_iters`` iterations, ``oversample`` extra columns).
      rotate_moments: at a refresh, carry the moments into the new basis (m exactly, v through the
        squared rotation) instead of keeping their coordinates (galore-torch keeps them).
      plain_step: the step of parameters without a projection. "adamw" (default): torch.optim.AdamW's,
        op for op (eps added after the bias correction of sqrt(v), decoupled decay first); "galore":
        galore-torch's (HF AdamW: eps added before the bias correction, so early steps on small
        gradients move less, by up to lr per step; decay as ``weight_decay_mode``).
      per_layer: step each parameter from its ``register_post_accumulate_grad_hook`` as soon as its
        gradient is complete, and free that gradient, so that full gradients are never all alive.
        With ``accumulation_steps=k`` a parameter steps on every k-th accumulation (the last
        micro-batch). ``step()`` then only runs the closure; LR schedulers work as usual since
        each hook reads its group's current ``lr``. Not for DDP: DDP reduces gradients after
        these hooks fire, so use the plain mode there; not for FSDP2 (refused): it writes the
        sharded gradients without these hooks.
      nonfinite: "raise" (default): a NaN or inf in any gradient raises ValueError naming the
        parameter, before any parameter is updated; "skip": the whole step is skipped (counted in
        ``skipped_steps``; in per_layer mode, that parameter's step). The check costs one device
        sync per step (per parameter in per_layer mode).
      backend: "auto" | "torch" | "triton" | "cuda". CPU -> "torch" (the reference). On a GPU
        "auto" uses Triton (the fused project-back + weight update kernels); "cuda" runs the
        moment updates in the compiled extension and the project-back in cuBLAS (addmm's epilogue).
      kernel: "hybrid" (library matmul for the down-projection, the Adam step on the low-rank
        gradient, then the up-projection kernel with the weight update in its epilogue) | "fused"
        (down-projection kernel with the Adam step in its epilogue, then the same up-projection);
        Triton backend, fp32/bf16 states ("int8" and proj_type "full" always take the hybrid path).
        Neither writes the full-rank update to memory.
      sync_basis: under torch.distributed with whole (DDP) parameters, broadcast each new basis from
        rank 0 so every rank uses the same one even if its SVD rounds differently.
      seed: seeds the randomized refresh (per parameter and per refresh, so resume is exact).

    FSDP2: parameters that ``fully_shard`` split by rows (DTensor ``Shard(0)``, with ``Replicate`` on
    other mesh dimensions for HSDP) are stepped on their local rows; no rank gathers a whole weight
    or gradient, the moments and left bases are split the same way, and the trajectory equals one
    process's to fp32 rounding. Projected groups need ``refresh="randomized"``; ``state_dict()`` then
    returns DTensors (a collective call on every rank for int8 states). Sides, collectives and sizes:
    dit_fast/optim/sharded.py.

    Differences from galore-torch (deliberate):
      * eps defaults to 1e-8 (galore-torch: 1e-6); pass eps=1e-6 to match.
      * weight_decay_mode="adamw" (default) decays the old weight before the update, as
        torch.optim.AdamW; weight_decay_mode="galore" reproduces galore-torch, which decays the
        already-updated weight (``p.add_(p, alpha=-lr * wd)`` after the step).
      * groups without rank step as torch.optim.AdamW (plain_step="adamw"); galore-torch steps them
        with HF AdamW's bias correction (plain_step="galore").
      * moments are kept in fp32 (state_dtype) even for bf16 parameters; galore-torch keeps them in
        the gradient's dtype.
      * the projection side is fixed at the first refresh and stored; galore-torch re-derives it from
        shapes at each project_back, which breaks "reverse_std" when rank >= the smaller dimension.
      * parameters that are not 2-D take the plain step (galore-torch crashes on them).
      * state holds only tensors and plain values (the bases as tensors), so
        ``torch.load(..., weights_only=True)`` loads it and resume continues bitwise on CPU;
        ``load_state_dict`` checks every entry (checks.py) before changing anything.
    With fp32 parameters, eps=1e-6, weight_decay_mode="galore", plain_step="galore",
    state_dtype="fp32" and refresh="svd", the trajectory is galore-torch's (tests/test_galore_compat.py).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, correct_bias: bool = True, weight_decay_mode: str = "adamw",
                 update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std", state_dtype: str = "fp32",
                 refresh: str = "svd", refresh_iters: int = 2, oversample: int = 8, rotate_moments: bool = False,
                 plain_step: str = "adamw", kernel: str = "hybrid", per_layer: bool = False,
                 accumulation_steps: int = 1, backend: str = "auto", sync_basis: bool = True, seed: int = 0,
                 nonfinite: str = "raise"):
        if not isinstance(betas, (tuple, list)):
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        weight_decay_mode=weight_decay_mode, update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, state_dtype=state_dtype, refresh=refresh, refresh_iters=refresh_iters,
                        oversample=oversample, rotate_moments=rotate_moments, plain_step=plain_step, kernel=kernel)
        if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        _backend._check_name(backend, "backend")
        self.backend = backend
        self.per_layer = bool(per_layer)
        self.accumulation_steps = accumulation_steps
        self.sync_basis = sync_basis
        self.seed = int(seed)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._hooks = []
        self._shards = {}  # id(param) -> (param, ShardGroup or None)
        super().__init__(params, defaults)
        if self.per_layer:
            self._install_hooks()

    # -------------------------------------------------------------- groups and hooks

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._lookup_table = None
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        first = sum(len(g["params"]) for g in self.param_groups[:-1])
        try:
            if isinstance(group["betas"], list):
                group["betas"] = tuple(group["betas"])
            checks.check_group(group, f"param group {index}")
            checks.check_params(group["params"], first, f"param group {index}")
            for i, p in enumerate(group["params"]):
                self._check_sharding(p, group, f"parameter {first + i} (group {index}, shape {tuple(p.shape)})")
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            self._lookup_table = None
            raise
        if getattr(self, "per_layer", False) and self._hooks:
            self._install_hooks(group["params"])

    def _check_sharding(self, p: torch.Tensor, group: dict, where: str) -> None:
        shards = sharded.shard_group_of(p, where)
        if shards is None:
            return
        if self.per_layer:
            raise ValueError(f"{where}: per_layer=True cannot step DTensor (FSDP2) parameters: FSDP2 writes the "
                             "sharded gradients without firing post-accumulate-grad hooks; use per_layer=False")
        if shards.world > 1 and "rank" in group and p.dim() == 2 and group["refresh"] == "svd":
            raise ValueError(f"{where}: refresh='svd' needs each whole gradient, but this parameter is split by "
                             f"rows across {shards.world} ranks (FSDP2); use refresh='randomized' (row-local "
                             "products and small all-reduces, dit_fast/optim/sharded.py)")

    def _shard(self, p: torch.Tensor) -> Optional[sharded.ShardGroup]:
        entry = self._shards.get(id(p))
        if entry is None or entry[0] is not p:
            entry = (p, sharded.shard_group_of(p, self._where(p)))
            self._shards[id(p)] = entry
        return entry[1]

    def _install_hooks(self, params: Optional[Iterable[torch.Tensor]] = None) -> None:
        if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            raise RuntimeError("per_layer needs torch >= 2.1 (Tensor.register_post_accumulate_grad_hook)")
        params = params if params is not None else [p for g in self.param_groups for p in g["params"]]
        for p in params:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._post_accumulate_hook))

    def _lookup(self, p: torch.Tensor) -> Tuple[dict, int]:
        """(group, position among all parameters) of ``p``; cached, rebuilt after add_param_group and
        load_state_dict (which replace the groups)."""
        table = getattr(self, "_lookup_table", None)
        if table is None or id(p) not in table or not any(g is table[id(p)][0] for g in self.param_groups):
            table, i = {}, 0
            for group in self.param_groups:
                for q in group["params"]:
                    table[id(q)] = (group, i)
                    i += 1
            self._lookup_table = table
        if id(p) not in table:
            raise KeyError("parameter not in this optimizer")
        return table[id(p)]

    def _group_of(self, p: torch.Tensor) -> dict:
        return self._lookup(p)[0]

    def _param_index(self, p: torch.Tensor) -> int:
        return self._lookup(p)[1]

    def _where(self, p: torch.Tensor) -> str:
        group, index = self._lookup(p)
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        return f"parameter {index} (group {gi}, shape {tuple(p.shape)})"

    @torch.no_grad()
    def _post_accumulate_hook(self, p: torch.Tensor) -> None:
        if not getattr(self, "_ddp_warned", False) and dist.is_available() \
                and dist.is_initialized() and dist.get_world_size() > 1:
            self._ddp_warned = True
            warnings.warn("GaLoreAdamW(per_layer=True) under torch.distributed: DDP reduces gradients after "
                          "post-accumulate-grad hooks fire, so each rank would step on its own gradient. "
                          "Use per_layer=False with DDP.", RuntimeWarning)
        state = self.state[p]
        state["micro_step"] = state.get("micro_step", 0) + 1
        if state["micro_step"] % self.accumulation_steps:
            return
        if self._grads_finite([(p, self._group_of(p))]):
            self._step_param(p, self._group_of(p))
        p.grad = None

    def remove_hooks(self) -> None:
        """Detaches the per-layer hooks (the optimizer then steps only from ``step()``)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.per_layer = False

    # -------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.per_layer:
            return loss  # parameters stepped in their post-accumulate-grad hooks
        todo = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if todo and not self._grads_finite(todo):
            return loss
        for p, group in todo:
            self._step_param(p, group)
        return loss

    def _grads_finite(self, todo) -> bool:
        """True when every gradient is finite; else raises ValueError or (nonfinite="skip") returns False.
        One device sync; with sharded parameters one all-reduce of len(todo) flags per shard group, so
        every rank takes the same decision."""
        flags, groups = [], {}
        for p, _ in todo:
            grad = sharded.local(p.grad)
            if grad.is_sparse:
                raise RuntimeError("GaLoreAdamW does not support sparse gradients")
            flags.append(~torch.isfinite(grad).all())
            shards = self._shard(p)
            if shards is not None and shards.world > 1:
                groups.setdefault(id(shards.group), shards.group)
        bad = torch.stack([f.to(flags[0].device) for f in flags]).float()
        for group in groups.values():  # insertion order: the parameters' order, the same on every rank
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        if not bool(bad.any()):
            return True
        p = todo[int(bad.nonzero()[0, 0])][0]
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            if self.skipped_steps == 1:
                warnings.warn(f"GaLoreAdamW: the gradient of {self._where(p)} holds NaN or inf: step skipped "
                              "(nonfinite='skip'; further skips are counted in skipped_steps)", RuntimeWarning)
            return False
        raise ValueError(f"GaLoreAdamW: the gradient of {self._where(p)} holds NaN or inf; no parameter was "
                         "updated (pass nonfinite='skip' to skip such steps, as a GradScaler does)")

    def _kernel_backend(self, device: torch.device) -> str:
        name = _backend.resolve_backend(self.backend, device, "GaLoreAdamW")
        if name == "auto":  # both kernel backends can run: Triton has the fused project-back
            name = "triton"
        return name

    def _geometry(self, p: torch.Tensor, group: dict, state: dict,
                  shards: Optional[sharded.ShardGroup]) -> _Geometry:
        """The whole moment's shape and this rank's rows of it."""
        if "rank" in group and p.dim() == 2:
            m, n = p.shape
            side = SIDES[state["side"]]
            k = state["basis_right"].shape[0] if side == "right" else state["basis_left"].shape[1]
            shape = {"right": (m, k), "left": (k, n), "full": (k, k)}[side]
        else:
            shape = tuple(p.shape)
        if shards is None or not shape:
            return _Geometry(shape, 0, shape[0] if shape else 1, 0, None)
        start, stop = shards.span(shape[0])
        row = math.prod(shape[1:])
        fix = None
        if group["state_dtype"] == "int8" and shards.world > 1:
            def fix(absmaxes, _rows=shape[0], _row=row):
                shards.fix_absmax(absmaxes, _rows, _row)
        return _Geometry(shape, start, stop, start * row, fix)

    def _init_moments(self, state: dict, geom: _Geometry, device, state_dtype: str) -> None:
        shape = (geom.stop - geom.start,) + tuple(geom.shape[1:]) if geom.shape else ()
        if state_dtype == "int8":
            blocks = ref.block_count(math.prod(shape), geom.offset)
            state["exp_avg"] = torch.zeros(shape, dtype=torch.int8, device=device)
            state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.uint8, device=device)
            state["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
        else:
            state["exp_avg"] = torch.zeros(shape, dtype=_STATE_TORCH_DTYPES[state_dtype], device=device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=_STATE_TORCH_DTYPES[state_dtype], device=device)

    def _moments_fp32(self, state: dict, geom: _Geometry) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 moments: the state tensors themselves for fp32 storage (updates in place), else copies."""
        if state["exp_avg"].dtype == torch.int8:
            return (ref.dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], True, geom.offset),
                    ref.dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], False, geom.offset))
        return state["exp_avg"].float(), state["exp_avg_sq"].float()

    def _store_moments(self, state: dict, m: torch.Tensor, v: torch.Tensor, geom: _Geometry) -> None:
        if state["exp_avg"].dtype == torch.int8:
            ref.store_8bit(m, v, state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"],
                           state["exp_avg_sq_absmax"], geom.offset, geom.fix_absmax)
        else:
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)

    @staticmethod
    def _basis(state: dict) -> Tuple[torch.Tensor, ...]:
        side = SIDES[state["side"]]
        if side == "right":
            return (state["basis_right"],)
        if side == "left":
            return (state["basis_left"],)
        return (state["basis_left"], state["basis_right"])

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict,
                 shards: Optional[sharded.ShardGroup]) -> None:
        side = SIDES[state["side"]]
        old = self._basis(state) if state["refreshes"] > 0 else None
        if group["refresh"] == "svd":
            if shards is not None and shards.world > 1:
                raise ValueError(f"{self._where(p)}: refresh='svd' needs the whole gradient of a parameter split "
                                 "across ranks; use refresh='randomized'")
            new = ref.svd_basis(grad, group["rank"], side, p.dtype)
        else:
            gen = torch.Generator(device="cpu")
            gen.manual_seed((self.seed * 1_000_003 + self._param_index(p) * 7_919 + state["refreshes"]) % (2 ** 63))
            new = ref.randomized_basis(grad, group["rank"], side, p.dtype, previous=old, oversample=group["oversample"],
                                       iters=group["refresh_iters"], generator=gen,
                                       rows=None if shards is None else shards.rows(p.shape[0]))
        if shards is None and self.sync_basis and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            new = tuple(b.contiguous() for b in new)
            for b in new:
                dist.broadcast(b, src=0)
        if group["rotate_moments"] and old is not None and "exp_avg" in state:
            geom = self._geometry(p, group, state, shards)
            m, v = self._moments_fp32(state, geom)
            if shards is None:
                m, v = ref.rotate_moments(m, v, side, ref.rotation(old, new, side))
            else:
                m, v = sharded.rotate_moments_rows(m, v, side, old, new, shards, geom.shape[0])
            self._store_moments(state, m, v, geom)
        if side in ("left", "full"):
            state["basis_left"] = new[0]  # strides as the SVD left them: same BLAS path as galore-torch
        if side in ("right", "full"):
            state["basis_right"] = new[-1]
        state["refreshes"] += 1

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        shards = self._shard(p)
        w, grad = sharded.local(p), sharded.local(p.grad)
        if grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        state = self.state[p]
        projected = "rank" in group and p.dim() == 2
        if "step" not in state:
            state["step"] = 0
            if projected:
                state["side"] = SIDES.index(resolve_side(group["proj_type"], p.shape))
                state["refreshes"] = 0
        backend = self._kernel_backend(w.device)
        if projected and (state["step"] % group["update_proj_gap"] == 0 or state["refreshes"] == 0):
            self._refresh(p, grad, group, state, shards)
        geom = self._geometry(p, group, state, shards)
        if "exp_avg" not in state:
            self._init_moments(state, geom, w.device, group["state_dtype"])
        state["step"] += 1
        if projected:
            self._step_projected(backend, w, grad, group, state, shards, geom)
        else:
            self._step_plain(backend, w, grad, group, state, geom)

    # -------------------------------------------------------------- the plain step (groups without rank)

    def _step_plain(self, backend, w, grad, group, state, geom: _Geometry) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd, t = group["lr"], group["eps"], group["weight_decay"], state["step"]
        quant = state["exp_avg"].dtype == torch.int8
        if backend != "torch" and not (quant and geom.fix_absmax is not None) and w.numel():
            kernels = self._kernels(backend)
            moments = (state["exp_avg"], state["exp_avg_sq"], state.get("exp_avg_absmax"),
                       state.get("exp_avg_sq_absmax"))
            if group["plain_step"] == "adamw":
                alpha, eps_k = ref.adamw_kernel_scalars(lr, beta1, beta2, eps, t, group["correct_bias"])
                kernels.adam_step(grad, *moments, beta1, beta2, eps_k, param=w, alpha=alpha,
                                  pre_decay=1.0 - lr * wd, post_decay=1.0)
            else:
                alpha, pre, post = ref.step_scalars(lr, beta1, beta2, t, wd, 1.0, group["correct_bias"],
                                                    group["weight_decay_mode"])
                kernels.adam_step(grad, *moments, beta1, beta2, eps, param=w, alpha=alpha, pre_decay=pre,
                                  post_decay=post)
            return
        target = w if w.dtype == torch.float32 else w.float()  # one rounding to the parameter's dtype
        if group["plain_step"] == "adamw":
            m, v = self._moments_fp32(state, geom)
            ref.adamw_moments_reference(grad, m, v, beta1, beta2)
            if state["exp_avg"].dtype != torch.float32:
                self._store_moments(state, m, v, geom)
            ref.adamw_update_reference(target, m, v, lr, beta1, beta2, eps, wd, t, group["correct_bias"])
        else:
            alpha, _, _ = ref.step_scalars(lr, beta1, beta2, t, wd, 1.0, group["correct_bias"],
                                           group["weight_decay_mode"])
            n = self._moment_update_torch(grad, group, state, geom)
            ref.apply_update_reference(target, n, alpha, lr * wd, group["weight_decay_mode"])
        if target is not w:
            w.copy_(target)

    # -------------------------------------------------------------- the projected step

    @staticmethod
    def _kernels(backend: str):
        if backend == "triton":
            from dit_fast.triton_kernels import galore as kernels
        else:
            from dit_fast.cuda import galore as kernels
        return kernels

    @staticmethod
    def _project(grad, side, basis, shards) -> torch.Tensor:
        """R, this rank's rows of it: G_i P^T (right, local) or the reduce-scatter of P_i^T G_i (left, full)."""
        low = ref.project(grad, side, basis)
        if shards is None or side == "right":
            return low
        return shards.reduce_scatter_rows(low)

    @staticmethod
    def _gather(n, side, shards, geom: _Geometry) -> torch.Tensor:
        """N whole where the project-back needs it (left, full: an all-gather of (k, n) / (k, k))."""
        if shards is None or side == "right":
            return n
        return shards.all_gather_rows(n, geom.shape[0])

    def _moment_update_torch(self, low: torch.Tensor, group: dict, state: dict, geom: _Geometry) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        if state["exp_avg"].dtype == torch.int8:
            return ref.adam_moments_8bit_reference(low, state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"],
                                                   state["exp_avg_sq_absmax"], beta1, beta2, group["eps"],
                                                   geom.offset, geom.fix_absmax)
        return ref.adam_moments_reference(low, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"])

    def _step_projected(self, backend, w, grad, group, state, shards, geom: _Geometry) -> None:
        beta1, beta2 = group["betas"]
        step_size, pre, post = ref.step_scalars(group["lr"], beta1, beta2, state["step"], group["weight_decay"],
                                                1.0, group["correct_bias"], group["weight_decay_mode"])
        side = SIDES[state["side"]]
        basis = self._basis(state)
        scale = group["scale"]
        if backend == "torch":
            low = self._project(grad, side, basis, shards)
            n = self._gather(self._moment_update_torch(low, group, state, geom), side, shards, geom)
            update = ref.project_back(n.to(basis[0].dtype) if w.dtype == torch.float32 else n, side,
                                      basis if w.dtype == torch.float32 else tuple(b.float() for b in basis))
            if scale != 1.0:
                update = update * scale  # galore-torch scales after projecting back
            lr_wd = group["lr"] * group["weight_decay"]
            if w.dtype == torch.float32:
                ref.apply_update_reference(w, update, step_size, lr_wd, group["weight_decay_mode"])
            else:  # one rounding to the parameter's dtype
                target = w.float()
                ref.apply_update_reference(target, update, step_size, lr_wd, group["weight_decay_mode"])
                w.copy_(target)
            return
        kernels = self._kernels(backend)
        quant = state["exp_avg"].dtype == torch.int8
        moments = (state["exp_avg"], state["exp_avg_sq"], state.get("exp_avg_absmax"), state.get("exp_avg_sq_absmax"))
        alpha = step_size * scale
        if backend == "triton" and group["kernel"] == "fused" and side != "full" and not quant \
                and (shards is None or side == "right") and w.numel():
            n = kernels.down_project_adam(grad, basis[0], side, state["exp_avg"], state["exp_avg_sq"],
                                          beta1, beta2, group["eps"])
            kernels.project_back_update(w, n, basis[0], side, alpha, pre, post)
            return
        # hybrid: library matmul down, Adam on the low-rank gradient, fused up-projection + update
        low = self._project(grad, side, basis, shards)
        if (quant and geom.fix_absmax is not None) or low.numel() == 0:  # int8 blocks across ranks: reference
            n = self._moment_update_torch(low, group, state, geom)
        else:
            n = kernels.adam_step(low, *moments, beta1, beta2, group["eps"])
        n = self._gather(n, side, shards, geom)
        if w.numel() == 0:
            return
        if side == "full":  # A N B = (A N) B: the small product first, then the fused up-projection
            n = basis[0].float() @ n
            side, basis = "right", basis[1:]
        kernels.project_back_update(w, n, basis[0], side, alpha, pre, post)

    # -------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """torch.optim.Optimizer's state dict; for FSDP2 parameters the row-split state as DTensors laid
        out like the parameter (and int8 absmax whole), so torch.distributed.checkpoint can reshard it.
        Collective (call it on every rank) when sharded int8 states exist."""
        sd = super().state_dict()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                shards = self._shard(p)
                if shards is not None and index in sd["state"]:
                    sd["state"][index] = self._whole_state(p, group, self.state[p], shards)
                index += 1
        return sd

    def _whole_state(self, p, group, state, shards) -> dict:
        out = dict(state)
        if "exp_avg" in state:
            geom = self._geometry(p, group, state, shards)
            rows, row = geom.shape[0], math.prod(geom.shape[1:])
            for key in ("exp_avg", "exp_avg_sq"):
                out[key] = shards.dtensor(state[key], geom.shape)
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                if key in state:
                    out[key] = shards.whole_absmax(state[key], rows, row)
        if "basis_left" in state:
            out["basis_left"] = shards.dtensor(state["basis_left"], (p.shape[0], state["basis_left"].shape[1]))
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads as torch.optim.Optimizer does (the saved groups replace the current ones), after checking
        every group and every state entry against this optimizer's parameters (ValueError / TypeError
        naming the parameter, its group and shape, the key and what was expected; nothing changes on
        error). Keeps every state tensor's dtype (fp32 moments of a bf16 parameter, int8 codes, bases).
        For FSDP2 parameters each entry may be a DTensor (as state_dict() and
        torch.distributed.checkpoint give it) or a whole tensor (from one process): this rank keeps its rows."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry (keys: {sorted(map(str, state_dict))})")
        saved = state_dict["state"]
        if not isinstance(saved, dict):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(saved).__name__}")
        groups = checks.merge_loaded_groups(state_dict["param_groups"], self.param_groups)
        ids = [i for g in groups for i in g["params"]]
        if len(set(ids)) != len(ids):
            raise ValueError("state_dict['param_groups'] lists a parameter id twice")
        unknown = [k for k in saved if k not in set(ids)]
        if unknown:
            raise ValueError(f"state_dict['state'] has entries {unknown[:5]} for parameters no group lists")
        new_state, index = {}, 0
        for gi, (group, current) in enumerate(zip(groups, self.param_groups)):
            for sid, p in zip(group["params"], current["params"]):
                if sid in saved:
                    where = f"state_dict['state'][{sid!r}] for parameter {index} (group {gi}, shape {tuple(p.shape)})"
                    checks.check_param_state(saved[sid], p.shape, p.dtype, group, where)
                    new_state[p] = self._localize(p, saved[sid], where)
                index += 1
        super().load_state_dict({"state": {}, "param_groups": groups})
        self._lookup_table = None
        for p, entry in new_state.items():
            self.state[p] = entry

    def _localize(self, p: torch.Tensor, entry: dict, where: str) -> dict:
        """Copies of a checked entry's tensors on p's device; this rank's rows of row-split ones."""
        shards = self._shard(p)
        device = sharded.local(p).device
        out = {}
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                out[key] = value
                continue
            if shards is None:
                if sharded.is_dtensor(value):
                    raise ValueError(f"{where}: {key} is a DTensor but the parameter is not (load it where the "
                                     "model is sharded the same way, or through torch.distributed.checkpoint)")
                out[key] = value.to(device=device, copy=True)
                continue
            if key in checks.row_split_keys(entry):
                if sharded.is_dtensor(value):
                    if tuple(value.placements) != shards.placements or value.device_mesh != shards.mesh:
                        raise ValueError(f"{where}: {key} is laid out as {tuple(value.placements)}, expected the "
                                         f"parameter's {shards.placements} on its mesh")
                    value = value.to_local()
                else:
                    start, stop = shards.span(value.shape[0])
                    value = value[start:stop]
            else:
                if sharded.is_dtensor(value):
                    value = value.full_tensor()  # a whole (replicated) entry: small (a right basis, absmax)
                if key.endswith("_absmax"):
                    low = entry["exp_avg"].shape
                    value = shards.local_absmax(value, low[0], math.prod(low[1:]))
            out[key] = value.to(device=device, copy=True).contiguous()
        return out

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, absmaxes, bases) on this rank."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total
