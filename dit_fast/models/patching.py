"""``dit_fast.patch(model)``: swap a facebookresearch/DiT-style model's hot paths for dit_fast's, in place.

In the spirit of Liger-Kernel's ``apply_liger_kernel_to_*``: the module tree, parameters and state dict
stay as they are; only ``forward`` of three kinds of module is replaced.

    DiTBlock     norm1 + modulate -> layernorm_modulate; attention residual + norm2 + modulate ->
                 residual_layernorm_modulate; MLP residual -> gated_residual
    FinalLayer   norm_final + modulate -> layernorm_modulate
    Attention    (timm's: qkv, proj, num_heads) -> dit_fast.ops.attention (flash layout, no permutes)

Modules are recognised by their attributes, so DiT forks with the same names are patched too.

A patched model stays an ordinary module: ``module.forward`` becomes a ``PatchedMethod`` (a module-level
class holding the module and a module-level function, both found by name), so ``pickle``,
``copy.deepcopy`` and ``torch.save(model)`` / ``torch.load(..., weights_only=False)`` work and the copy is
still patched; ``del module.forward`` gives back the class's own forward.
"""

import inspect
import sys
import types
from typing import Callable

from torch import nn

from dit_fast import _backend, ops
from dit_fast.integrations import DIFFUSERS_MODELS, is_diffusers_model
from dit_fast.ops.flash_attention import attention


# ---------------------------------------------------------------------------------------------
# A patched method pickle can find (also used by dit_fast.integrations.diffusers).
# ---------------------------------------------------------------------------------------------


def _found_by_name(function) -> bool:
    """True when pickle finds ``function`` as ``module.qualname`` (a module-level function or class)."""
    owner = sys.modules.get(getattr(function, "__module__", None) or "")
    for part in getattr(function, "__qualname__", "<locals>").split("."):
        owner = getattr(owner, part, None)
    return owner is function


class PatchedMethod:
    """``function(module, *args, **kwargs)``: what a patch puts in ``module.<name>`` (its ``forward``).

    Unlike ``types.MethodType(function, module)``, which pickles as ``getattr(module, function.__name__)``
    (an attribute the module does not have), this pickles as its class, the module (a back-reference the
    pickler's memo resolves) and the function by its qualified name; ``copy.deepcopy`` binds the copy to
    the copied module.
    """

    def __init__(self, module: nn.Module, function: Callable):
        self.module = module
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """The function's signature without the module (what ``inspect.signature`` of a bound method gives)."""
        signature = inspect.signature(self.function)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __repr__(self):
        return f"<dit_fast {self.function.__module__}.{self.function.__qualname__} of {type(self.module).__name__}>"


def patch_method(module: nn.Module, name: str, function: Callable) -> None:
    """Sets ``module.<name>`` to ``function`` bound to ``module``; ``del module.<name>`` restores the class's.

    ``function`` must be a module-level function: a lambda or a closure would make the model unpicklable
    (TypeError here, at patch time, rather than at ``torch.save``)."""
    if not isinstance(function, types.FunctionType) or not _found_by_name(function):
        raise TypeError(f"patch_method: {name} must be a module-level function (pickle finds it by name), got "
                        f"{getattr(function, '__qualname__', type(function).__name__)}")
    setattr(module, name, PatchedMethod(module, function))


# ---------------------------------------------------------------------------------------------
# facebookresearch/DiT-style models
# ---------------------------------------------------------------------------------------------


def _is_dit_block(m):
    return all(hasattr(m, a) for a in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation"))


def _is_final_layer(m):
    return all(hasattr(m, a) for a in ("norm_final", "linear", "adaLN_modulation"))


def _is_attention(m):
    return all(hasattr(m, a) for a in ("qkv", "proj", "num_heads")) and isinstance(m.qkv, nn.Linear)


def _affine(norm):
    """(weight, bias, eps) of a LayerNorm, weight/bias None without elementwise affine."""
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"dit_fast.patch expects nn.LayerNorm norms, got {type(norm).__name__}")
    return norm.weight, norm.bias, norm.eps


def _block_forward(self, x, c):
    """DiTBlock.forward on dit_fast's fused adaLN ops; same math, fewer passes over x."""
    backend = self._dit_fast_backend
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    w1, b1, eps1 = _affine(self.norm1)
    w2, b2, eps2 = _affine(self.norm2)
    h = ops.layernorm_modulate(x, shift_msa, scale_msa, weight=w1, bias=b1, eps=eps1, backend=backend)  # (N, T, D)
    a = self.attn(h)  # (N, T, D)
    if w2 is None and b2 is None:
        x, h = ops.residual_layernorm_modulate(x, gate_msa, a, shift_mlp, scale_mlp, eps=eps2, backend=backend)
    else:
        x = ops.gated_residual(x, gate_msa, a, backend=backend)
        h = ops.layernorm_modulate(x, shift_mlp, scale_mlp, weight=w2, bias=b2, eps=eps2, backend=backend)
    return ops.gated_residual(x, gate_mlp, self.mlp(h), backend=backend)  # (N, T, D)


def _final_layer_forward(self, x, c):
    """FinalLayer.forward with the fused adaLN."""
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    w, b, eps = _affine(self.norm_final)
    x = ops.layernorm_modulate(x, shift, scale, weight=w, bias=b, eps=eps, backend=self._dit_fast_backend)
    return self.linear(x)  # (N, T, patch_size ** 2 * out_channels)


def _attention_forward(self, x):
    """timm Attention.forward through dit_fast.ops.attention in the (B, S, heads, D) layout."""
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, heads, D) each
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    out = attention(q, k, v, scale=getattr(self, "scale", None), backend=self._dit_fast_backend)  # (B, N, heads, D)
    return self.proj(out.reshape(B, N, C))  # (B, N, C)


def _check_not_patched(model: nn.Module) -> None:
    from dit_fast.models.dit_video import DiTVideo

    if isinstance(model, DiTVideo):
        raise ValueError("dit_fast.patch: a DiTVideo is dit_fast's own model and already runs on its fused ops; "
                         "there is nothing to patch")
    done = getattr(model, "_dit_fast_patched", None)
    if done is not None:
        raise ValueError(f"dit_fast.patch: this {type(model).__name__} is already patched ({done}); patch a fresh "
                         "model (patching twice would wrap the patched code again)")


def patch(model: nn.Module, backend: str = "auto", sparse=None) -> nn.Module:
    """Replaces, in place, the norms, modulation and attention of a DiT-style model with dit_fast's ops.

    Returns ``model``. Parameters, buffers and the state dict are untouched; outputs stay equal up to
    floating-point rounding. A diffusers video transformer (the classes of
    ``dit_fast.integrations.DIFFUSERS_MODELS``: the Wan family, HunyuanVideo 1 and 1.5, LTX-Video 1 and 2,
    Cosmos, CogVideoX, ConsisID, Mochi, EasyAnimate, Allegro, Latte; README "Supported diffusers models") is
    patched by ``dit_fast.integrations.diffusers`` (imported only then). Raises ValueError, with the model
    left as it was, when no DiT block is found, for an unsupported diffusers model, a model patched before, a
    DiTVideo or an unknown backend name; TypeError when ``model`` is no nn.Module.
    sparse: a ``dit_fast.SparseAttention`` giving Wan's and HunyuanVideo's self-attention block-sparse
    attention with its schedule and calibration (dit_fast/integrations/diffusers/sparse.py).
    """
    if not isinstance(model, nn.Module):
        hint = "; for a diffusers pipeline, patch pipe.transformer" if hasattr(model, "transformer") else ""
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}{hint}")
    _check_not_patched(model)
    _backend._check_name(backend, "dit_fast.patch")  # here, not at the first forward
    if is_diffusers_model(model):  # imported only for diffusers models: `import dit_fast` never imports diffusers
        from dit_fast.integrations import diffusers as diffusers_integration
        return diffusers_integration.patch(model, backend=backend, sparse=sparse)
    if sparse is not None:
        raise ValueError(f"dit_fast.patch(..., sparse=...) patches diffusers' Wan and HunyuanVideo transformers, not a "
                         f"{type(model).__name__}; a DiTVideo takes DiTVideo(attention='block_sparse', sparse=...)")
    plan = []  # (module, kind, forward): decided for the whole model before any module changes
    for module in model.modules():
        if _is_dit_block(module):
            plan.append((module, "blocks", _block_forward))
        elif _is_final_layer(module):
            plan.append((module, "final_layers", _final_layer_forward))
        elif _is_attention(module):
            plan.append((module, "attention", _attention_forward))
    counts = {kind: sum(k == kind for _, k, _ in plan) for kind in ("blocks", "final_layers", "attention")}
    if counts["blocks"] == 0:  # raised with the model untouched (a ViT's attention modules stay its own)
        raise ValueError(f"dit_fast.patch found no DiT block (a module with norm1, attn, norm2, mlp and "
                         f"adaLN_modulation) in {type(model).__name__}; it patches facebookresearch/DiT-style "
                         f"models and diffusers' {', '.join(DIFFUSERS_MODELS)}")
    for module, _, forward in plan:
        patch_method(module, "forward", forward)
        module._dit_fast_backend = backend
    model._dit_fast_patched = counts
    return model
