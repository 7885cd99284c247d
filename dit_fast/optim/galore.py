"""GaLoreAdamW: AdamW whose moments live in a low-rank subspace of each weight's gradient.

GaLore: Zhao et al. 2024, https://arxiv.org/abs/2403.03507. The math is in
dit_fast/optim/reference.py; this file holds the optimizer (state, refresh schedule, backends,
per-layer mode, resume, DDP).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Optional, Tuple

import torch

from dit_fast import _backend
from dit_fast.optim import reference as ref

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
STATE_DTYPES = ("fp32", "bf16", "int8")
REFRESH_METHODS = ("svd", "randomized")
DECAY_MODES = ("adamw", "galore")
KERNEL_VARIANTS = ("hybrid", "fused")
_STATE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# state["side"] is stored as an index into SIDES: torch.optim.Optimizer.load_state_dict would turn a
# string state value into a generator (it recurses into iterables)
SIDES = ("right", "left", "full")


def resolve_side(proj_type: str, shape) -> str:
    """Which side the basis sits on, by galore-torch's rules ("std": the smaller dimension)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_group(group: dict) -> None:
    """Raises ValueError / TypeError naming the bad key of a parameter group."""
    for key in ("lr", "eps", "weight_decay", "scale"):
        if not _is_real(group[key]):
            raise TypeError(f"{key} must be a real number, got {type(group[key]).__name__}")
        if not math.isfinite(group[key]) or group[key] < 0:
            raise ValueError(f"{key} must be finite and >= 0, got {group[key]}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_real(b) for b in betas):
        raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    if "rank" in group:
        rank = group["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise TypeError(f"rank must be an int, got {type(rank).__name__}")
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
    gap = group["update_proj_gap"]
    if not isinstance(gap, int) or isinstance(gap, bool):
        raise TypeError(f"update_proj_gap must be an int, got {type(gap).__name__}")
    if gap <= 0:
        raise ValueError(f"update_proj_gap must be > 0, got {gap}")
    for key, allowed in (("proj_type", PROJ_TYPES), ("state_dtype", STATE_DTYPES), ("refresh", REFRESH_METHODS),
                         ("weight_decay_mode", DECAY_MODES), ("kernel", KERNEL_VARIANTS)):
        if group[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {group[key]!r}")
    for key in ("refresh_iters", "oversample"):
        if not isinstance(group[key], int) or isinstance(group[key], bool) or group[key] < 0:
            raise ValueError(f"{key} must be an int >= 0, got {group[key]!r}")


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore low-rank moments, drop-in for galore-torch's ``GaLoreAdamW``.

    Param groups that carry ``rank`` are projected (their 2-D parameters; any other parameter in
    such a group falls back to plain AdamW instead of crashing); other groups get plain AdamW.
    galore-torch's group keys work unchanged: ``rank``, ``update_proj_gap`` (refresh every that many
    steps, at steps 0, gap, 2 gap, ...), ``scale``, ``proj_type`` in {"std", "reverse_std", "left",
    "right", "full"}. Every keyword below can also be set per group.

    Args beyond galore-torch:
      state_dtype: "fp32" | "bf16" | "int8": storage of the moments. "int8" keeps them blockwise
        quantized (256 elements per fp32 absmax, companded codes; see reference.py), for projected
        and plain parameters alike, and never copies a full weight.
      refresh: "svd" (exact, galore-torch's) | "randomized" (subspace iteration warm-started from the
        previous basis, ``refresh_iters`` iterations, ``oversample`` extra columns).
      rotate_moments: at a refresh, carry the moments into the new basis (m exactly, v through the
        squared rotation) instead of keeping their coordinates (galore-torch keeps them).
      per_layer: step each parameter from its ``register_post_accumulate_grad_hook`` as soon as its
        gradient is complete, and free that gradient, so that full gradients are never all alive.
        With ``accumulation_steps=k`` a parameter steps on every k-th accumulation (the last
        micro-batch). ``step()`` then only runs the closure; LR schedulers work as usual since
        each hook reads its group's current ``lr``. Not for DDP: DDP reduces gradients after
        these hooks fire, so use the plain mode there.
      backend: "auto" | "torch" | "triton" | "cuda". CPU -> "torch" (the reference). On a GPU
        "auto" uses Triton (the fused project-back + weight update kernels); "cuda" runs the
        moment updates in the compiled extension and the project-back in cuBLAS (addmm's epilogue).
      kernel: "hybrid" (library matmul for the down-projection, the Adam step on the low-rank
        gradient, then the up-projection kernel with the weight update in its epilogue) | "fused"
        (down-projection kernel with the Adam step in its epilogue, then the same up-projection);
        Triton backend, fp32/bf16 states ("int8" and proj_type "full" always take the hybrid path).
        Neither writes the full-rank update to memory.
      sync_basis: under torch.distributed, broadcast each new basis from rank 0 so every rank uses
        the same one even if its SVD rounds differently.
      seed: seeds the randomized refresh (per parameter and per refresh, so resume is exact).

    Differences from galore-torch (deliberate):
      * eps defaults to 1e-8 (galore-torch: 1e-6); pass eps=1e-6 to match.
      * weight_decay_mode="adamw" (default) decays the old weight before the update, as
        torch.optim.AdamW; weight_decay_mode="galore" reproduces galore-torch, which decays the
        already-updated weight (``p.add_(p, alpha=-lr * wd)`` after the step).
      * moments are kept in fp32 (state_dtype) even for bf16 parameters; galore-torch keeps them in
        the gradient's dtype.
      * the projection side is fixed at the first refresh and stored; galore-torch re-derives it from
        shapes at each project_back, which breaks "reverse_std" when rank >= the smaller dimension.
      * parameters that are not 2-D fall back to plain AdamW (galore-torch crashes on them).
      * state holds only tensors and plain values (the bases as tensors), so
        ``torch.load(..., weights_only=True)`` loads it and resume continues bitwise on CPU.
    With fp32 parameters, eps=1e-6, weight_decay_mode="galore", state_dtype="fp32" and
    refresh="svd", the trajectory is galore-torch's (tests/test_galore_compat.py).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, correct_bias: bool = True, weight_decay_mode: str = "adamw",
                 update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std", state_dtype: str = "fp32",
                 refresh: str = "svd", refresh_iters: int = 2, oversample: int = 8, rotate_moments: bool = False,
                 kernel: str = "hybrid", per_layer: bool = False, accumulation_steps: int = 1,
                 backend: str = "auto", sync_basis: bool = True, seed: int = 0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        weight_decay_mode=weight_decay_mode, update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, state_dtype=state_dtype, refresh=refresh, refresh_iters=refresh_iters,
                        oversample=oversample, rotate_moments=rotate_moments, kernel=kernel)
        if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        _backend._check_name(backend, "backend")
        self.backend = backend
        self.per_layer = bool(per_layer)
        self.accumulation_steps = accumulation_steps
        self.sync_basis = sync_basis
        self.seed = int(seed)
        self._hooks = []
        super().__init__(params, defaults)
        if self.per_layer:
            self._install_hooks()

    # -------------------------------------------------------------- groups and hooks

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._lookup_table = None
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        _check_group(group)
        if getattr(self, "per_layer", False) and self._hooks:
            self._install_hooks(group["params"])

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

    @torch.no_grad()
    def _post_accumulate_hook(self, p: torch.Tensor) -> None:
        if not getattr(self, "_ddp_warned", False) and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            self._ddp_warned = True
            warnings.warn("GaLoreAdamW(per_layer=True) under torch.distributed: DDP reduces gradients after "
                          "post-accumulate-grad hooks fire, so each rank would step on its own gradient. "
                          "Use per_layer=False with DDP.", RuntimeWarning)
        state = self.state[p]
        state["micro_step"] = state.get("micro_step", 0) + 1
        if state["micro_step"] % self.accumulation_steps:
            return
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
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _param_index(self, p: torch.Tensor) -> int:
        return self._lookup(p)[1]

    def _kernel_backend(self, device: torch.device) -> str:
        name = _backend.resolve_backend(self.backend, device, "GaLoreAdamW")
        if name == "auto":  # both kernel backends can run: Triton has the fused project-back
            name = "triton"
        return name

    def _init_moments(self, state: dict, shape, device, state_dtype: str) -> None:
        if state_dtype == "int8":
            blocks = -(-math.prod(shape) // ref.QBLOCK)
            state["exp_avg"] = torch.zeros(shape, dtype=torch.int8, device=device)
            state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.uint8, device=device)
            state["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
        else:
            state["exp_avg"] = torch.zeros(shape, dtype=_STATE_TORCH_DTYPES[state_dtype], device=device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=_STATE_TORCH_DTYPES[state_dtype], device=device)

    def _moments_fp32(self, state: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        if state["exp_avg"].dtype == torch.int8:
            return (ref.dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed=True),
                    ref.dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], signed=False))
        return state["exp_avg"].float(), state["exp_avg_sq"].float()

    def _store_moments(self, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        if state["exp_avg"].dtype == torch.int8:
            codes, absmax = ref.quantize_blockwise(m, signed=True)
            state["exp_avg"].copy_(codes)
            state["exp_avg_absmax"].copy_(absmax)
            codes, absmax = ref.quantize_blockwise(v, signed=False)
            state["exp_avg_sq"].copy_(codes)
            state["exp_avg_sq_absmax"].copy_(absmax)
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

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        side = SIDES[state["side"]]
        old = self._basis(state) if "basis_right" in state or "basis_left" in state else None
        if group["refresh"] == "svd":
            new = ref.svd_basis(grad, group["rank"], side, p.dtype)
        else:
            gen = torch.Generator(device="cpu")
            gen.manual_seed((self.seed * 1_000_003 + self._param_index(p) * 7_919 + state["refreshes"]) % (2 ** 63))
            new = ref.randomized_basis(grad, group["rank"], side, p.dtype, previous=old, oversample=group["oversample"],
                                       iters=group["refresh_iters"], generator=gen)
        if self.sync_basis and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            new = tuple(b.contiguous() for b in new)
            for b in new:
                torch.distributed.broadcast(b, src=0)
        if group["rotate_moments"] and old is not None and "exp_avg" in state:
            rot = ref.rotation(old, new, side)
            m, v = ref.rotate_moments(*self._moments_fp32(state), side, rot)
            self._store_moments(state, m, v)
        if side in ("left", "full"):
            state["basis_left"] = new[0]  # strides as the SVD left them: same BLAS path as galore-torch
        if side in ("right", "full"):
            state["basis_right"] = new[-1]
        state["refreshes"] += 1

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        state = self.state[p]
        projected = "rank" in group and p.dim() == 2
        if "step" not in state:
            state["step"] = 0
            if projected:
                state["side"] = SIDES.index(resolve_side(group["proj_type"], p.shape))
                state["refreshes"] = 0
        backend = self._kernel_backend(p.device)
        beta1, beta2 = group["betas"]
        if projected:
            if state["step"] % group["update_proj_gap"] == 0 or state["refreshes"] == 0:
                self._refresh(p, grad, group, state)
            basis = self._basis(state)
        if "exp_avg" not in state:
            shape = tuple(p.shape)
            if projected:
                side = SIDES[state["side"]]
                rows = basis[0].shape[1] if side in ("left", "full") else shape[0]  # left basis (m, r)
                cols = basis[-1].shape[0] if side in ("right", "full") else shape[1]  # right basis (r, n)
                shape = (rows, cols)
            self._init_moments(state, shape, p.device, group["state_dtype"])
        state["step"] += 1
        step_size, pre, post = ref.step_scalars(group["lr"], beta1, beta2, state["step"], group["weight_decay"],
                                                1.0, group["correct_bias"], group["weight_decay_mode"])
        scale = group["scale"] if projected else 1.0
        if backend == "torch":
            self._step_torch(p, grad, group, state, projected, step_size, scale, pre, post)
        else:
            self._step_kernels(backend, p, grad, group, state, projected, step_size, scale, pre, post)

    def _moment_update_torch(self, low: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        if state["exp_avg"].dtype == torch.int8:
            return ref.adam_moments_8bit_reference(low, state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"],
                                                   state["exp_avg_sq_absmax"], beta1, beta2, group["eps"])
        return ref.adam_moments_reference(low, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"])

    def _step_torch(self, p, grad, group, state, projected, step_size, scale, pre, post) -> None:
        side = SIDES[state["side"]] if projected else None
        low = ref.project(grad, side, self._basis(state)) if projected else grad
        n = self._moment_update_torch(low, group, state)
        if projected:
            basis = self._basis(state)
            update = ref.project_back(n.to(basis[0].dtype) if p.dtype == torch.float32 else n, side,
                                      basis if p.dtype == torch.float32 else tuple(b.float() for b in basis))
            if scale != 1.0:
                update = update * scale  # galore-torch scales after projecting back
        else:
            update = n
        lr_wd = group["lr"] * group["weight_decay"]
        if p.dtype == torch.float32:
            ref.apply_update_reference(p, update, step_size, lr_wd, group["weight_decay_mode"])
        else:  # one rounding to the parameter's dtype
            w = p.float()
            ref.apply_update_reference(w, update, step_size, lr_wd, group["weight_decay_mode"])
            p.copy_(w)

    def _step_kernels(self, backend, p, grad, group, state, projected, step_size, scale, pre, post) -> None:
        beta1, beta2 = group["betas"]
        if backend == "triton":
            from dit_fast.triton_kernels import galore as kernels
        else:
            from dit_fast.cuda import galore as kernels
        quant = state["exp_avg"].dtype == torch.int8
        moments = (state["exp_avg"], state["exp_avg_sq"],
                   state.get("exp_avg_absmax"), state.get("exp_avg_sq_absmax"))
        if not projected:
            kernels.adam_step(grad, *moments, beta1, beta2, group["eps"], param=p, alpha=step_size, pre_decay=pre,
                              post_decay=post)
            return
        side = SIDES[state["side"]]
        basis = self._basis(state)
        alpha = step_size * scale
        if backend == "triton" and group["kernel"] == "fused" and side != "full" and not quant:
            n = kernels.down_project_adam(grad, basis[0], side, state["exp_avg"], state["exp_avg_sq"],
                                          beta1, beta2, group["eps"])
            kernels.project_back_update(p, n, basis[0], side, alpha, pre, post)
            return
        # hybrid: library matmul down, Adam on the low-rank gradient, fused up-projection + update
        low = ref.project(grad, side, basis)
        n = kernels.adam_step(low, *moments, beta1, beta2, group["eps"])
        if side == "full":  # A N B = (A N) B: the small product first, then the fused up-projection
            n = basis[0].float() @ n
            side, basis = "right", basis[1:]
        kernels.project_back_update(p, n, basis[0], side, alpha, pre, post)

    # -------------------------------------------------------------- state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads as torch.optim.Optimizer does, but keeps every state tensor's dtype (fp32 moments of a
        bf16 parameter, int8 codes, bases) instead of casting floating tensors to the parameter's."""
        super().load_state_dict(state_dict)
        self._lookup_table = None
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i not in state_dict["state"]:
                continue
            for key, value in state_dict["state"][i].items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        for group in self.param_groups:
            _check_group(group)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, absmaxes, bases)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total


# ------------------------------------------------------------------ param groups

DEFAULT_TARGETS = ("attn", "attention", "mlp", "ffn", "feed_forward")


def galore_param_groups(model: torch.nn.Module, rank: int = 128, target=DEFAULT_TARGETS, update_proj_gap: int = 200,
                        scale: float = 0.25, proj_type: str = "std", min_dim: Optional[int] = None,
                        weight_decay: Optional[float] = None, **group_options) -> list:
    """[projected group, plain group] for ``GaLoreAdamW``.

    A parameter goes to the projected group when it is the 2-D ``weight`` of an ``nn.Linear`` whose
    qualified module name matches ``target`` and whose smaller dimension exceeds ``min_dim``
    (default: ``rank``; a smaller matrix would need more state projected than plain). Everything
    else (biases, norms, embeddings, convolutions, small or non-matching linears) goes to the plain
    group. ``target``: an iterable of substrings of the module name (default: attention and MLP
    names), "linear" for every Linear, or a callable ``(name, module) -> bool``. In DiT the adaLN
    modulation linears (D -> 6 D per block) hold a third of the parameters: pass
    ``target=("attn", "mlp", "adaLN_modulation")`` or ``"linear"`` to project them too
    (benchmarks/galore_memory.py: DiT-XL/2 at rank 256 keeps 51% of AdamW's state bytes with the
    default target and 26% with every linear projected, 9% with int8 moments).
    Extra keyword arguments become keys of both groups (for example ``state_dtype``).
    """
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    if isinstance(target, str) and target != "linear":
        target = (target,)
    if not (target == "linear" or callable(target) or isinstance(target, (tuple, list, set))):
        raise TypeError("target must be 'linear', a callable (name, module) -> bool, or an iterable of substrings")
    min_dim = rank if min_dim is None else min_dim

    def matches(name: str, module: torch.nn.Module) -> bool:
        if target == "linear":
            return True
        if callable(target):
            return bool(target(name, module))
        return any(t in name for t in target)

    projected, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and matches(name, module):
            w = module.weight
            if w.requires_grad and w.dim() == 2 and min(w.shape) > min_dim and id(w) not in seen:
                projected.append(w)
                seen.add(id(w))
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    extra = dict(group_options)
    if weight_decay is not None:
        extra["weight_decay"] = weight_decay
    groups = []
    if projected:
        groups.append(dict(params=projected, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                           proj_type=proj_type, **extra))
    if plain:
        groups.append(dict(params=plain, **extra))
    return groups


def state_bytes_for(shape, param_dtype: torch.dtype = torch.float32, rank: Optional[int] = None,
                    proj_type: str = "std", state_dtype: str = "fp32") -> int:
    """Bytes of the state tensors GaLoreAdamW allocates for one parameter (moments, absmaxes, bases).

    ``rank=None``: a plain (non-projected) parameter. Mirrors the allocation in ``_step_param``; plain
    Python values in the state (step, side, refresh count) are not tensors and not counted.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    basis = 0
    low_shape = shape
    if rank is not None and len(shape) == 2:
        m, n = shape
        k = min(rank, m, n)
        side = resolve_side(proj_type, shape)
        item = torch.empty((), dtype=param_dtype).element_size()
        if side == "right":
            low_shape, basis = (m, k), k * n * item
        elif side == "left":
            low_shape, basis = (k, n), m * k * item
        else:
            low_shape, basis = (k, k), (m * k + k * n) * item
    low = math.prod(low_shape)
    if state_dtype == "int8":
        return basis + 2 * low + 2 * 4 * (-(-low // ref.QBLOCK))
    return basis + 2 * low * _STATE_TORCH_DTYPES[state_dtype].itemsize
