"""Which of a diffusers model's attention calls ``set_attention_backend("dit_fast")`` reaches.

diffusers' ``ModelMixin.set_attention_backend(name)`` writes the backend on every processor that has an
``_attention_backend`` attribute and makes it the process-wide default of ``dispatch_attention_fn``. So
it reaches a processor whose ``__call__`` calls ``dispatch_attention_fn`` without naming a backend of
its own, and no other:

  * "dispatch"       every attention call goes through the dispatcher (Wan, HunyuanVideo, LTX, ...);
  * "partly pinned"  some calls name ``backend=AttentionBackendName.FLEX`` (Wan-Animate-2's generation pass);
  * "pinned"         every call does (Kandinsky 6 SR's NABLA blocks);
  * "sdpa"           the processor calls ``F.scaled_dot_product_attention`` itself (CogVideoX, Mochi,
                     EasyAnimate, Allegro, Latte, ConsisID, the token refiners' ``AttnProcessor2_0``);
  * "none"           no softmax attention at all (Sana's linear attention);
  * "refuses"        the processor lists the backends it accepts (``_SUPPORTED_BACKENDS``) and dit_fast
                     is not one: AnyFlow-FAR's causal processor raises ValueError unless the backend is flex.

The classification reads the processor class's own source (diffusers ships Python), once per class.
``install_set_attention_backend_hook`` wraps ``ModelMixin.set_attention_backend`` once, when the
backend is registered: after diffusers' own code has run, a model none of whose processors the
backend reaches gets one warning saying that nothing changed and what does apply (``dit_fast.patch``),
and a model with a processor that refuses the backend one warning naming it (before its forward raises).
"""

import functools
import inspect
import re
import warnings
from typing import Dict

from torch import nn

REACHED = ("dispatch", "partly pinned")
_PINNED = re.compile(r"backend\s*=\s*AttentionBackendName\.\w+")


@functools.lru_cache(maxsize=None)
def processor_class_reach(cls: type) -> str:
    """One of "dispatch", "partly pinned", "pinned", "sdpa", "none", "refuses", "unknown" (no source) for a
    processor class."""
    from dit_fast.integrations.diffusers._processor import DitFastProcessor

    if issubclass(cls, DitFastProcessor):
        return "dispatch"  # DitFastProcessor.attend goes through the dispatcher
    accepted = getattr(cls, "_SUPPORTED_BACKENDS", None)
    if accepted is not None and "dit_fast" not in accepted:
        return "refuses"
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return "dispatch" if hasattr(cls, "_attention_backend") else "unknown"
    calls = source.count("dispatch_attention_fn(")
    pinned = len(_PINNED.findall(source))
    if calls == 0:
        return "sdpa" if "scaled_dot_product_attention(" in source else "none"
    if pinned >= calls:
        return "pinned"
    return "partly pinned" if pinned else "dispatch"


def attention_processors(model: nn.Module) -> Dict[str, str]:
    """{processor class name: reach} over the model's attention modules (diffusers' Attention,
    MochiAttention and every AttentionModuleMixin, the modules set_attention_backend walks)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    found = {}
    for module in model.modules():
        if isinstance(module, (Attention, MochiAttention, AttentionModuleMixin)):
            processor = getattr(module, "processor", None)
            if processor is not None:
                found[type(processor).__name__] = processor_class_reach(type(processor))
    return found


def _reached(processors: Dict[str, str]):
    """The processors set_attention_backend may reach: those known to dispatch, and unknown ones (given the
    benefit of the doubt: a processor class this table does not know may call diffusers' dispatcher)."""
    return [name for name, reach in processors.items() if reach in REACHED or reach == "unknown"]


def reaches(model: nn.Module) -> bool:
    """True when set_attention_backend reaches at least one attention call of ``model``."""
    return bool(_reached(attention_processors(model)))


def describe(processors: Dict[str, str]) -> str:
    why = {"sdpa": "calls scaled_dot_product_attention itself", "pinned": "pins the flex backend",
           "none": "has no softmax attention", "refuses": "accepts only the flex backend"}
    return ", ".join(f"{name} {why.get(reach, reach)}" for name, reach in processors.items()) or "no attention modules"


def what_applies(model: nn.Module) -> str:
    """One line: what dit_fast can do for a diffusers model dit_fast.patch has no plan for."""
    from dit_fast.integrations.diffusers.backend import BACKEND_NAME

    processors = attention_processors(model)
    reached = _reached(processors)
    if reached:
        refusing = {name: reach for name, reach in processors.items() if reach == "refuses"}
        caveat = (f", but {describe(refusing)} (its forward raises ValueError unless that processor's backend is "
                  "flex)") if refusing else ""
        return (f"model.set_attention_backend({BACKEND_NAME!r}) applies: its processors {', '.join(reached)} call "
                f"diffusers' dispatcher{caveat}")
    return f"nothing in dit_fast applies to it ({describe(processors)})"


def warn_if_unreached(model: nn.Module, backend: str) -> None:
    """The warning set_attention_backend(backend) gives when the dit_fast backend reaches none of ``model``'s calls."""
    from dit_fast.integrations import DIFFUSERS_MODELS, diffusers_model_name
    from dit_fast.integrations.diffusers.backend import BACKEND_NAME

    if str(getattr(backend, "value", backend)).lower() != BACKEND_NAME:
        return
    processors = attention_processors(model)
    refusing = {name: reach for name, reach in processors.items() if reach == "refuses"}
    if refusing:
        warnings.warn(f"set_attention_backend({BACKEND_NAME!r}) on {type(model).__name__}: {describe(refusing)} and "
                      "raises ValueError in the forward; set that processor's backend to flex", UserWarning,
                      stacklevel=3)
    if _reached(processors):
        return
    patchable = diffusers_model_name(model) in DIFFUSERS_MODELS
    hint = ("dit_fast.patch(model) installs processors on dit_fast's attention" if patchable
            else "dit_fast.patch has no plan for this class either")
    warnings.warn(f"set_attention_backend({BACKEND_NAME!r}) changes nothing on {type(model).__name__}: none of its "
                  f"attention processors call diffusers' dispatcher ({describe(processors)}); "
                  f"{hint}", UserWarning, stacklevel=3)


def install_set_attention_backend_hook() -> None:
    """Wraps diffusers' ``ModelMixin.set_attention_backend`` once: its behaviour is unchanged, then
    ``warn_if_unreached``. Idempotent (importing the integration again does not wrap twice)."""
    from diffusers.models.modeling_utils import ModelMixin

    original = ModelMixin.set_attention_backend
    if getattr(original, "_dit_fast_wrapped", None) is not None:
        return

    @functools.wraps(original)
    def set_attention_backend(self, backend: str) -> None:
        result = original(self, backend)
        warn_if_unreached(self, backend)
        return result

    set_attention_backend._dit_fast_wrapped = original
    ModelMixin.set_attention_backend = set_attention_backend


__all__ = ["attention_processors", "install_set_attention_backend_hook", "processor_class_reach", "reaches",
           "warn_if_unreached", "what_applies"]
