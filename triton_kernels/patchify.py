"""Triton kernel for 3D patchify / unpatchify: video (B, C, T, H, W) <-> tokens (B, S, K).

One kernel serves both directions (TO_TOKENS) and both feature orders (CHANNELS_LAST):
  token s = (t' H' + h') W' + w', feature f = (c, i, j, k) flattened as (C, pt, ph, pw) ("cthw")
  or (pt, ph, pw, C) ("thwc"), maps to video[b, c, t' pt + i, h' ph + j, w' pw + k].
The readable PyTorch references are in dit_fast/ops/patchify.py.

A program owns a [BLOCK_W tokens, BLOCK_F features] tile of one token row (b, t', h'): the
feature -> video offset is computed once per column and the token -> offset once per row, so each
element costs one add. Patch sizes are compile-time, so the feature decomposition divides by
constants.
"""

import triton
import triton.language as tl


@triton.jit
def _patchify_3d_kernel(
    V_ptr,  # video, (B, C, T, H, W) with strides (stride_vb, stride_vc, stride_vt, stride_vh, stride_vw)
    TOK_ptr,  # tokens, (B, S, K) with strides (stride_tb, stride_ts, stride_tk)
    C,  # channels
    T_TOK,  # token grid T' = T / PT
    H_TOK,  # token grid H' = H / PH
    W_TOK,  # token grid W' = W / PW
    K,  # features per token, C * PT * PH * PW
    stride_vb, stride_vc, stride_vt, stride_vh, stride_vw,
    stride_tb, stride_ts, stride_tk,
    PT: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # feature order (pt, ph, pw, C) instead of (C, pt, ph, pw)
    TO_TOKENS: tl.constexpr,  # patchify (video -> tokens) or unpatchify (tokens -> video)
    BLOCK_W: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # = (b * T' + t') * H' + h'; int64: offsets pass 2^31
    h_tok = row % H_TOK
    t_tok = (row // H_TOK) % T_TOK
    b = row // (H_TOK * T_TOK)
    w_tok = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    f = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (w_tok < W_TOK)[:, None] & (f < K)[None, :]

    # feature -> (c, i, j, k) inside the patch
    if CHANNELS_LAST:
        c = f % C
        k = (f // C) % PW
        j = (f // (C * PW)) % PH
        i = f // (C * PW * PH)
    else:
        k = f % PW
        j = (f // PW) % PH
        i = (f // (PW * PH)) % PT
        c = f // (PW * PH * PT)
    feature_offset = c.to(tl.int64) * stride_vc + i * stride_vt + j * stride_vh + k * stride_vw  # (BLOCK_F,)
    token_offset = (b * stride_vb + (t_tok * PT) * stride_vt + (h_tok * PH) * stride_vh
                    + (w_tok.to(tl.int64) * PW) * stride_vw)  # (BLOCK_W,)
    video_ptrs = V_ptr + token_offset[:, None] + feature_offset[None, :]

    s = (t_tok * H_TOK + h_tok) * W_TOK + w_tok  # (BLOCK_W,) token index, int64
    token_ptrs = TOK_ptr + (b * stride_tb + s * stride_ts)[:, None] + (f.to(tl.int64) * stride_tk)[None, :]

    if TO_TOKENS:
        tl.store(token_ptrs, tl.load(video_ptrs, mask=mask), mask=mask)
    else:
        tl.store(video_ptrs, tl.load(token_ptrs, mask=mask), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers. Arguments are validated by dit_fast.ops.patchify; no autograd here.
# ---------------------------------------------------------------------------------------------


def _launch(video, tokens, patch, grid, channels_last, to_tokens):
    B, C = video.shape[:2]
    pt, ph, pw = patch
    t_tok, h_tok, w_tok = grid
    K = C * pt * ph * pw
    if video.numel() == 0:
        return
    block_f = min(triton.next_power_of_2(K), 256)
    block_w = max(1, min(triton.next_power_of_2(w_tok), 4096 // block_f))
    _patchify_3d_kernel[(B * t_tok * h_tok, triton.cdiv(w_tok, block_w), triton.cdiv(K, block_f))](
        video, tokens,
        C, t_tok, h_tok, w_tok, K,
        *video.stride(),
        *tokens.stride(),
        PT=pt, PH=ph, PW=pw,
        CHANNELS_LAST=bool(channels_last),
        TO_TOKENS=bool(to_tokens),
        BLOCK_W=block_w,
        BLOCK_F=block_f,
        num_warps=4,
    )


def patchify_3d(video, patch, channels_last=False):
    """video (B, C, T, H, W), any strides -> new contiguous tokens (B, S, C * pt * ph * pw)."""
    B, C, T, H, W = video.shape
    pt, ph, pw = patch
    grid = (T // pt, H // ph, W // pw)
    tokens = video.new_empty((B, grid[0] * grid[1] * grid[2], C * pt * ph * pw))
    _launch(video, tokens, patch, grid, channels_last, to_tokens=True)
    return tokens


def unpatchify_3d(tokens, patch, grid, channels_last=True):
    """tokens (B, S, K), any strides, of a (T', H', W') grid -> new contiguous video (B, C, T, H, W)."""
    B, S, K = tokens.shape
    pt, ph, pw = patch
    video = tokens.new_empty((B, K // (pt * ph * pw), grid[0] * pt, grid[1] * ph, grid[2] * pw))
    _launch(video, tokens, patch, grid, channels_last, to_tokens=False)
    return video
