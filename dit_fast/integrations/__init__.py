"""Integrations with other libraries. Nothing here imports them: each is imported when asked for.

``DIFFUSERS_MODELS`` is the one registry of the diffusers transformers ``dit_fast.patch`` knows: class
name -> the module under ``dit_fast.integrations.diffusers`` whose ``patch(model, backend)`` patches it.
It lives here, outside that package, so that ``dit_fast.patch`` can recognise a diffusers model and
name the supported classes without importing diffusers.
"""

from typing import Optional

DIFFUSERS_MODELS = {
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "LTXVideoTransformer3DModel": "ltx",
    "CogVideoXTransformer3DModel": "cogvideox",
    "MochiTransformer3DModel": "mochi",
    # the Wan family: Wan's plan with a small delta each (wan.PLANS)
    "WanVACETransformer3DModel": "wan",
    "WanAnimateTransformer3DModel": "wan",
    "SkyReelsV2Transformer3DModel": "wan",
    "ChronoEditTransformer3DModel": "wan",
    "HunyuanVideo15Transformer3DModel": "hunyuan_video15",
    "LTX2VideoTransformer3DModel": "ltx2",
    "CosmosTransformer3DModel": "cosmos",
    # processors that call SDPA themselves: dit_fast.patch is what reaches them
    "EasyAnimateTransformer3DModel": "easyanimate",
    "AllegroTransformer3DModel": "allegro",
    "LatteTransformer3DModel": "latte",
    "ConsisIDTransformer3DModel": "consisid",
}


def is_diffusers_model(model) -> bool:
    """True when a class of ``model`` (or one it derives from) is defined by diffusers."""
    return any(cls.__module__.split(".")[0] == "diffusers" for cls in type(model).__mro__)


def diffusers_model_name(model) -> Optional[str]:
    """The supported diffusers class ``model`` is (or derives from), or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in DIFFUSERS_MODELS and cls.__module__.split(".")[0] == "diffusers":
            return cls.__name__
    return None
