"""DiTVideo: a Diffusion Transformer over spacetime patches, built on dit_fast's fused ops.

Follows facebookresearch/DiT's models.py (same module and state-dict names where the structure is the
same) and extends it to video: 3D patches, full or alternating spatial/temporal attention (Latte,
Open-Sora), 3D sin-cos and/or 3D RoPE positions, class and/or text conditioning (cross-attention with
classifier-free-guidance dropout), per-frame timesteps, PixArt's adaLN-single and learned sigma.

Every hot path goes through dit_fast.ops with the model's ``backend``: ``backend="torch"`` is a pure
PyTorch model, the reference the fused model is tested against. Each branch's gated residual is fused
with the next branch's adaLN (``residual_layernorm_modulate``), across block boundaries too.
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from dit_fast import ops
from dit_fast._checks import check_backend, check_bool, check_choice, check_int, check_int_triple, check_number
from dit_fast.models.embeddings import (CaptionEmbedder, LabelEmbedder, PatchEmbed3D, TimestepEmbedder,
                                        get_3d_sincos_pos_embed)
from dit_fast.nn.attention import CrossAttention, SpacetimeAttention, check_heads
from dit_fast.ops.patchify import unpatchify_3d
from dit_fast.ops.rope import RoPE3D
from dit_fast.sparse.config import SparseAttention
from dit_fast.sparse.runtime import SelfAttentionLayer, SparseRuntime

ATTENTION_LAYOUTS = ("full", "spatial_temporal", "block_sparse")
POSITIONS = ("sincos", "rope", "both")


def _triple(value, name) -> Tuple[int, int, int]:
    """An int p means (1, p, p): one frame, or a 2D patch, as in image DiT."""
    return check_int_triple(name, value, scalar_means=lambda p: (1, p, p))


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Mlp(nn.Module):
    """DiT's (timm's) MLP: fc1, GELU with the tanh approximation, fc2."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def adaln_parameters(module: nn.Module, hidden_size: int, n: int, adaln_single: bool):
    """Gives ``module`` DiT's ``adaLN_modulation`` (SiLU + Linear(D, n * D)) or PixArt's ``scale_shift_table``."""
    if adaln_single:
        module.scale_shift_table = nn.Parameter(torch.randn(n, hidden_size) / hidden_size ** 0.5)
    else:
        module.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n * hidden_size, bias=True))


def adaln_modulations(module: nn.Module, c: Tensor, n: int) -> Tuple[Tensor, ...]:
    """c: (B, D) or per frame (B, G, D) -> n modulations of that shape.

    With adaLN-single, c is the shared projection of the timestep (B, [G,] n * D), to which the
    module's own table (n, D) is added (PixArt-alpha); otherwise DiT's per-block SiLU + Linear.
    """
    if hasattr(module, "scale_shift_table"):
        table = c.unflatten(-1, (n, -1)) + module.scale_shift_table.to(c.dtype)  # (B, [G,] n, D)
        return table.unbind(-2)
    return module.adaLN_modulation(c).chunk(n, dim=-1)  # n x (B, [G,] D)


class DiTVideoBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning, spacetime self-attention and optional cross-attention.

    The stream enters with the previous branch's (gate, y) still pending, so that its gated residual
    and this block's first adaLN run as one fused op; the block leaves its MLP branch pending in turn.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mode: str = "full",
                 cross_attention: bool = False, rope: Optional[RoPE3D] = None, qk_norm: bool = False,
                 adaln_single: bool = False, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.attn = SpacetimeAttention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, mode=mode,
                                       rope=rope, backend=backend)
        self.cross_attn = (CrossAttention(hidden_size, hidden_size, num_heads, qk_norm=qk_norm, backend=backend)
                           if cross_attention else None)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # shift/scale/gate for attention and MLP (DiT's order), then for cross-attention
        self.num_modulations = 9 if cross_attention else 6
        adaln_parameters(self, hidden_size, self.num_modulations, adaln_single)

    def forward(self, x, gate, y, c, grid, context=None, context_mask=None):
        """x: (B, N, D) stream; (gate, y): pending branch or (None, None); c: (B, [G,] D) -> (x, gate, y)."""
        mods = adaln_modulations(self, c, self.num_modulations)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if y is None:
            h = ops.layernorm_modulate(x, shift_msa, scale_msa, backend=self.backend)  # (B, N, D)
        else:
            x, h = ops.residual_layernorm_modulate(x, gate, y, shift_msa, scale_msa, backend=self.backend)
        y = self.attn(h, grid)  # (B, N, D)
        if self.cross_attn is not None:
            shift_ca, scale_ca, gate_ca = mods[6:]
            x, h = ops.residual_layernorm_modulate(x, gate_msa, y, shift_ca, scale_ca, backend=self.backend)
            y = self.cross_attn(h, context, context_mask)  # (B, N, D)
            gate_msa = gate_ca
        x, h = ops.residual_layernorm_modulate(x, gate_msa, y, shift_mlp, scale_mlp, backend=self.backend)
        # The gate leaves as a tensor of its own (B x D values), not as a view of all the modulations, so a
        # checkpointed block keeps only it. The MLP branch stays a view (nn.Linear views its 2-D product as
        # 3-D): copying it would cost an activation's read and write per block. FSDP2 warns about returned
        # views because an in-place op on one would skip its hook; nothing here ever modifies y in place,
        # and dit_fast.parallel.apply_fsdp silences that one warning for this class.
        return x, gate_mlp.clone(), self.mlp(h)  # stream (B, N, D), gate (B, [G,] D), branch (B, N, D)


class FinalLayer(nn.Module):
    """The final layer of DiT: last pending residual + adaLN, then a linear map to patch values."""

    def __init__(self, hidden_size: int, patch_size: Sequence[int], out_channels: int, adaln_single: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.backend = backend
        pt, ph, pw = patch_size
        self.linear = nn.Linear(hidden_size, pt * ph * pw * out_channels, bias=True)
        self.adaln_single = adaln_single
        adaln_parameters(self, hidden_size, 2, adaln_single)

    def forward(self, x, gate, y, c):
        """x, y: (B, N, D); c: (B, [G,] D) -> (B, N, pt * ph * pw * out_channels)."""
        if self.adaln_single:  # PixArt's final layer: the table plus the timestep embedding itself
            c = torch.cat([c, c], dim=-1)  # (B, [G,] 2D)
        shift, scale = adaln_modulations(self, c, 2)  # (B, [G,] D) each
        if y is None:
            h = ops.layernorm_modulate(x, shift, scale, backend=self.backend)
        else:
            _, h = ops.residual_layernorm_modulate(x, gate, y, shift, scale, backend=self.backend)
        return self.linear(h)


class DiTVideo(nn.Module):
    """Diffusion model with a Transformer backbone over spacetime patches of (B, C, T, H, W) inputs."""

    # Set by dit_fast.parallel.sequence_parallel(model, mesh): forward then embeds, transforms and decodes
    # only this rank's chunk of the tokens (None: one process holds every token).
    sequence_parallel_plan = None

    def __init__(
        self,
        input_size=(1, 32, 32),
        patch_size=(1, 2, 2),
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        text_dim: Optional[int] = None,
        attention: str = "full",
        pos: str = "sincos",
        per_frame_timesteps: bool = False,
        adaln_single: bool = False,
        learn_sigma: bool = True,
        qk_norm: bool = False,
        gradient_checkpointing: bool = False,
        cfg_channels: Optional[int] = None,
        backend: str = "auto",
        sparse: Optional[SparseAttention] = None,
    ):
        super().__init__()
        self.input_size = _triple(input_size, "input_size")
        self.patch_size = _triple(patch_size, "patch_size")
        if any(s % p for s, p in zip(self.input_size, self.patch_size)):
            raise ValueError(f"input_size {self.input_size} must be divisible by patch_size {self.patch_size}")
        check_choice("attention", attention, ATTENTION_LAYOUTS)
        if (attention == "block_sparse") != (sparse is not None):
            raise ValueError("attention='block_sparse' takes sparse=dit_fast.SparseAttention(...) (the pattern, "
                             "density, schedule), and sparse= needs attention='block_sparse'; got "
                             f"attention={attention!r}, sparse={sparse!r}")
        if sparse is not None and not isinstance(sparse, SparseAttention):
            raise TypeError(f"sparse must be a dit_fast.SparseAttention, got {type(sparse).__name__}")
        if sparse is not None and any(i >= depth for i in sparse.dense_layers):
            raise ValueError(f"sparse.dense_layers {sparse.dense_layers} names layers past depth = {depth}")
        check_choice("pos", pos, POSITIONS)
        check_int("in_channels", in_channels)
        check_int("hidden_size", hidden_size)
        check_int("depth", depth)
        check_int("num_heads", num_heads)
        check_heads(hidden_size, num_heads, name="hidden_size")  # divisible, into a head dim the kernels take
        if pos in ("sincos", "both") and hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 for sin-cos positions (pos={pos!r}), got {hidden_size}")
        if int(hidden_size * check_number("mlp_ratio", mlp_ratio, 0, low_open=True)) < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} gives an MLP of width int({hidden_size} * {mlp_ratio}) = 0")
        check_number("class_dropout_prob", class_dropout_prob, 0, 1, high_open=True)
        check_int("num_classes", num_classes, low=0)
        if text_dim is not None:
            check_int("text_dim", text_dim)
        for flag, value in (("per_frame_timesteps", per_frame_timesteps), ("adaln_single", adaln_single),
                            ("learn_sigma", learn_sigma), ("qk_norm", qk_norm),
                            ("gradient_checkpointing", gradient_checkpointing)):
            check_bool(flag, value)
        if cfg_channels is not None:
            check_int("cfg_channels", cfg_channels, 1, in_channels)
        check_backend(backend)
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.text_dim = text_dim
        self.class_dropout_prob = class_dropout_prob
        self.attention = attention
        self.pos = pos
        self.per_frame_timesteps = per_frame_timesteps
        self.adaln_single = adaln_single
        self.gradient_checkpointing = gradient_checkpointing
        self.cfg_channels = cfg_channels
        self.backend = backend
        self.grid = tuple(s // p for s, p in zip(self.input_size, self.patch_size))

        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size, backend=backend)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if adaln_single:
            num_modulations = 9 if text_dim else 6  # the blocks' shift/scale/gate triples
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_modulations * hidden_size, bias=True))
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.text_embedder = CaptionEmbedder(text_dim, hidden_size) if text_dim else None
        if pos in ("sincos", "both"):
            self.register_buffer("pos_embed", get_3d_sincos_pos_embed(hidden_size, self.grid)[None])
        else:
            self.pos_embed = None
        rope = RoPE3D() if pos in ("rope", "both") else None
        modes = (["spatial", "temporal"] * (depth // 2) + ["spatial"] * (depth % 2) if attention == "spatial_temporal"
                 else ["full"] * depth)
        self.blocks = nn.ModuleList([
            DiTVideoBlock(hidden_size, num_heads, mlp_ratio, mode=mode, cross_attention=text_dim is not None,
                          rope=rope, qk_norm=qk_norm, adaln_single=adaln_single, backend=backend)
            for mode in modes
        ])
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels, adaln_single, backend)
        # block-sparse self-attention: one runtime (schedule, calibration, blocks) shared by the blocks' layers
        self.sparse = None if sparse is None else SparseRuntime(sparse, type(self).__name__)
        for i, block in enumerate(self.blocks if sparse is not None else []):
            block.attn.sparse = SelfAttentionLayer(self.sparse, i)
        self.initialize_weights()

    def initialize_weights(self):
        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Initialize patch_embed like nn.Linear (instead of nn.Conv3d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Initialize label embedding table and timestep embedding MLP:
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.adaln_single:
            nn.init.normal_(self.t_block[1].weight, std=0.02)

        # Zero-out adaLN modulation layers (adaLN-Zero). The cross-attention output projection keeps
        # its xavier init: its gate is zeroed here, and zeroing both would leave each with a zero
        # gradient (the text path would never learn).
        for block in self.blocks:
            if not self.adaln_single:  # PixArt keeps its random tables; the zeroed outputs below suffice
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers:
        if not self.adaln_single:
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def _check_inputs(self, x, t, y, text, text_mask):
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, C={self.in_channels}, T, H, W), got {shape}")
        B, _, T, H, W = x.shape
        if any(s % p for s, p in zip((T, H, W), self.patch_size)):
            raise ValueError(f"x frames and size (T, H, W) = {(T, H, W)} must be divisible by patch_size {self.patch_size}")
        G = T // self.patch_size[0]
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a torch.Tensor of timesteps, got {type(t).__name__}")
        expected = [(B,), (B, G)] if self.per_frame_timesteps else [(B,)]
        if tuple(t.shape) not in expected:
            raise ValueError(f"t must have shape {' or '.join(map(str, expected))} for x {tuple(x.shape)}, got {tuple(t.shape)}")
        if self.y_embedder is not None:
            if not isinstance(y, Tensor) or tuple(y.shape) != (B,):
                raise ValueError(f"y must be (B,) = ({B},) class labels for a class-conditional model, got "
                                 f"{tuple(y.shape) if isinstance(y, Tensor) else y!r}")
            if y.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"y must hold int64 class labels, got {y.dtype}")
            self._check_labels(y)
        if self.text_embedder is not None:
            if text is None or text.dim() != 3 or text.shape[0] != B or text.shape[2] != self.text_dim:
                raise ValueError(f"text must be (B, L, text_dim) = ({B}, L, {self.text_dim}), got "
                                 f"{None if text is None else tuple(text.shape)}")
            if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
                raise ValueError(f"text_mask must be (B, L) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        return (T // self.patch_size[0], H // self.patch_size[1], W // self.patch_size[2])

    def _check_labels(self, y: Tensor) -> None:
        """Labels in [0, num_classes), or num_classes itself (DiT's null class) when the model has one.

        Eager: a ValueError (costs one host sync). Under torch.compile the check is an in-graph async
        assert instead (no graph break); an out-of-range label would otherwise index past the table.
        """
        high = self.num_classes + (1 if self.class_dropout_prob > 0 else 0)  # DiT passes y = num_classes for CFG
        bad = (y < 0) | (y >= high)
        if torch.compiler.is_compiling():
            torch._assert_async(~bad.any(), "DiTVideo: y holds class labels outside [0, num_classes]")
        elif bad.any():
            raise ValueError(f"y must hold class labels in [0, {self.num_classes})"
                             f"{f' (or {self.num_classes}: the null class)' if high > self.num_classes else ''}, "
                             f"got {y[bad].tolist()[:8]}")

    def position_embedding(self, grid, device, dtype) -> Tensor:
        """(1, N, D) sin-cos table: the buffer for the training grid, computed for any other grid."""
        if tuple(grid) == self.grid:
            return self.pos_embed.to(dtype)
        return get_3d_sincos_pos_embed(self.hidden_size, grid)[None].to(device=device, dtype=dtype)

    def unpatchify(self, x: Tensor, grid) -> Tensor:
        """x: (B, N, pt * ph * pw * C) -> (B, C, T, H, W)."""
        return unpatchify_3d(x, self.patch_size, grid, order="thwc", backend=self.backend)

    def forward(self, x, t, y=None, text=None, text_mask=None, force_drop_ids=None):
        """x: (B, C, T, H, W); t: (B,) or per frame (B, T / pt); y: (B,) labels; text: (B, L, text_dim)."""
        grid = self._check_inputs(x, t, y, text, text_mask)
        drop_ids = self._drop_ids(x.shape[0], x.device, force_drop_ids)
        sp = self.sequence_parallel_plan
        if sp is None:
            x = self.x_embedder(x)                          # (B, N, D), N = T * H * W / (pt * ph * pw)
        else:
            x = sp.embed_patches(self.x_embedder, x, grid)  # (B, n, D): this rank's chunk of the N tokens
        if self.pos_embed is not None:
            pos = self.position_embedding(grid, x.device, x.dtype)  # (1, N, D)
            x = x + (pos if sp is None else sp.shard_tokens(pos, grid))  # (B, N or n, D)
        c = self.t_embedder(t)                             # (B, D) or per frame (B, G, D)
        tiles = self._sparse_order(t, grid, per_sample=c.dim() == 2)  # a TileLayout: tokens tile-major, or None
        if tiles is not None:
            x = tiles.to_tiles(x)                          # (B, N, D), each 3D tile contiguous
        if self.y_embedder is not None:
            y = self.y_embedder(y, drop_ids)               # (B, D)
            c = c + (y if c.dim() == 2 else y[:, None])    # (B, [G,] D)
        block_c = self.t_block(c) if self.adaln_single else c  # (B, [G,] 6D or 9D) shared, or (B, [G,] D)
        if sp is not None:  # per-frame conditioning: the rows of this rank's frames (or tokens)
            c, block_c = sp.shard_groups(c, grid), sp.shard_groups(block_c, grid)
        context = context_mask = None
        if self.text_embedder is not None:
            context, context_mask = self.text_embedder(text, text_mask, drop_ids)  # (B, L, D), (B, L)
        gate = branch = None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, gate, branch = torch.utils.checkpoint.checkpoint(
                    block, x, gate, branch, block_c, grid, context, context_mask, use_reentrant=False)
            else:
                x, gate, branch = block(x, gate, branch, block_c, grid, context, context_mask)  # (B, N, D)
        x = self.final_layer(x, gate, branch, c)           # (B, N, pt * ph * pw * out_channels)
        if tiles is not None:
            x = tiles.from_tiles(x)                        # back to (t, h, w) raster order
        if sp is not None:
            x = sp.gather_tokens(x, grid)                  # (B, N, ...) on every rank, or this rank's tokens
            if not sp.gather_output:
                return x
        return self.unpatchify(x, grid)                    # (B, out_channels, T, H, W)

    def _sparse_order(self, t, grid, per_sample: bool):
        """Block-sparse attention: the step from t (the schedule), and the token order of this call: tile-major
        (the layout, returned) when every op between input and output is per token (one modulation per
        sample, no sequence parallelism), else raster (None; the op gathers per layer)."""
        if self.sparse is None:
            return None
        self.sparse.observe(t, training=self.training and torch.is_grad_enabled())
        tile_major = per_sample and self.sequence_parallel_plan is None
        self.sparse.order = "tiles" if tile_major else "raster"
        return self.sparse.config.layout(grid) if tile_major else None

    def _drop_ids(self, batch, device, force_drop_ids):
        """(B,) bool: which samples lose their label and caption (CFG dropout), or None."""
        if force_drop_ids is not None:
            if not isinstance(force_drop_ids, Tensor) or tuple(force_drop_ids.shape) != (batch,):
                raise ValueError(f"force_drop_ids must be a (B,) = ({batch},) tensor, True where the label and caption "
                                 f"are dropped, got {getattr(force_drop_ids, 'shape', force_drop_ids)!r}")
            return force_drop_ids.to(device=device).bool()
        if self.training and self.class_dropout_prob > 0 and (self.y_embedder is not None or self.text_embedder is not None):
            return torch.rand(batch, device=device) < self.class_dropout_prob
        return None

    def forward_with_cfg(self, x, t, y=None, cfg_scale=1.0, text=None, text_mask=None, cfg_channels=None):
        """DiT's batched classifier-free guidance: the first half of x is run conditioned and unconditioned.

        As in DiT, the second half of the batch is the unconditional one (its labels and captions are
        dropped) and guidance applies to the first ``cfg_channels`` output channels (DiT checkpoints: 3;
        default: all predicted channels, i.e. all but the learned sigma).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)          # (2B', C, T, H, W)
        drop = torch.arange(len(combined), device=x.device) >= len(half)
        model_out = self.forward(combined, t, y, text, text_mask, force_drop_ids=drop)
        k = cfg_channels or self.cfg_channels or self.in_channels
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

def DiT_XL_2(**kwargs):
    return DiTVideo(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16, **kwargs)


def DiT_XL_4(**kwargs):
    return DiTVideo(depth=28, hidden_size=1152, patch_size=(1, 4, 4), num_heads=16, **kwargs)


def DiT_XL_8(**kwargs):
    return DiTVideo(depth=28, hidden_size=1152, patch_size=(1, 8, 8), num_heads=16, **kwargs)


def DiT_L_2(**kwargs):
    return DiTVideo(depth=24, hidden_size=1024, patch_size=(1, 2, 2), num_heads=16, **kwargs)


def DiT_L_4(**kwargs):
    return DiTVideo(depth=24, hidden_size=1024, patch_size=(1, 4, 4), num_heads=16, **kwargs)


def DiT_L_8(**kwargs):
    return DiTVideo(depth=24, hidden_size=1024, patch_size=(1, 8, 8), num_heads=16, **kwargs)


def DiT_B_2(**kwargs):
    return DiTVideo(depth=12, hidden_size=768, patch_size=(1, 2, 2), num_heads=12, **kwargs)


def DiT_B_4(**kwargs):
    return DiTVideo(depth=12, hidden_size=768, patch_size=(1, 4, 4), num_heads=12, **kwargs)


def DiT_B_8(**kwargs):
    return DiTVideo(depth=12, hidden_size=768, patch_size=(1, 8, 8), num_heads=12, **kwargs)


def DiT_S_2(**kwargs):
    return DiTVideo(depth=12, hidden_size=384, patch_size=(1, 2, 2), num_heads=6, **kwargs)


def DiT_S_4(**kwargs):
    return DiTVideo(depth=12, hidden_size=384, patch_size=(1, 4, 4), num_heads=6, **kwargs)


def DiT_S_8(**kwargs):
    return DiTVideo(depth=12, hidden_size=384, patch_size=(1, 8, 8), num_heads=6, **kwargs)


# Video variants: 16 latent frames of 32x32x4, no classes, velocity prediction (rectified flow).
VIDEO_DEFAULTS = dict(input_size=(16, 32, 32), in_channels=4, num_classes=0, learn_sigma=False, class_dropout_prob=0.1)


def _sized(depth, hidden_size, num_heads):
    def build(**kwargs):
        return DiTVideo(**{"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads, **kwargs})
    return build


def DiT_XL_1x2x2_video(**kwargs):
    return _sized(28, 1152, 16)(**{**VIDEO_DEFAULTS, "patch_size": (1, 2, 2), **kwargs})


def DiT_XL_1x2x2_video_st(**kwargs):
    return _sized(28, 1152, 16)(**{**VIDEO_DEFAULTS, "patch_size": (1, 2, 2), "attention": "spatial_temporal", **kwargs})


def DiT_B_1x2x2_video(**kwargs):
    return _sized(12, 768, 12)(**{**VIDEO_DEFAULTS, "patch_size": (1, 2, 2), **kwargs})


def DiT_S_1x2x2_video(**kwargs):
    return _sized(12, 384, 6)(**{**VIDEO_DEFAULTS, "patch_size": (1, 2, 2), **kwargs})


def DiT_S_2x2x2_video(**kwargs):
    return _sized(12, 384, 6)(**{**VIDEO_DEFAULTS, "patch_size": (2, 2, 2), **kwargs})


def DiT_tiny(**kwargs):
    """The test config: 2 blocks of width 64, 2 heads; (4, 8, 8) input with 2x2 patches -> 64 tokens."""
    defaults = dict(input_size=(4, 8, 8), patch_size=(1, 2, 2), in_channels=4, num_classes=10, learn_sigma=True)
    return _sized(2, 64, 2)(**{**defaults, **kwargs})


DiT_models = {
    'DiT-XL/2': DiT_XL_2, 'DiT-XL/4': DiT_XL_4, 'DiT-XL/8': DiT_XL_8,
    'DiT-L/2': DiT_L_2, 'DiT-L/4': DiT_L_4, 'DiT-L/8': DiT_L_8,
    'DiT-B/2': DiT_B_2, 'DiT-B/4': DiT_B_4, 'DiT-B/8': DiT_B_8,
    'DiT-S/2': DiT_S_2, 'DiT-S/4': DiT_S_4, 'DiT-S/8': DiT_S_8,
    'DiT-XL/1x2x2-video': DiT_XL_1x2x2_video, 'DiT-XL/1x2x2-video-st': DiT_XL_1x2x2_video_st,
    'DiT-B/1x2x2-video': DiT_B_1x2x2_video, 'DiT-S/1x2x2-video': DiT_S_1x2x2_video,
    'DiT-S/2x2x2-video': DiT_S_2x2x2_video,
    'DiT-tiny': DiT_tiny,
}
