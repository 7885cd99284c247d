"""Python launchers of the 3D patchify / unpatchify CUDA kernel (csrc/patchify.cu through dit_fast._C).

Same signatures as dit_fast.triton_kernels.patchify; the readable references are in
dit_fast/ops/patchify.py. The kernel moves bytes, so it takes the element size, not a dtype.
"""

from dit_fast import _extension

MAX_TOKEN_BYTES = 32768  # csrc/patchify.h kPatchifyMaxTokenBytes: one token's K features + 16 bytes


def _ext():
    if _extension.cuda_ext is None:
        raise RuntimeError(f"the CUDA extension dit_fast._C is not available: {_extension.load_error}")
    return _extension.cuda_ext


def _launch(video, tokens, patch, grid, channels_last, to_tokens):
    B, C = video.shape[:2]
    pt, ph, pw = patch
    K = C * pt * ph * pw
    if K * video.element_size() + 16 > MAX_TOKEN_BYTES:
        raise ValueError(f"the CUDA patchify kernel holds one token of K = {K} features "
                         f"({K * video.element_size()} bytes) in shared memory, at most {MAX_TOKEN_BYTES - 16} "
                         "bytes; use backend='triton'")
    if video.numel() == 0:
        return
    _ext().patchify_3d(
        video.data_ptr(), tokens.data_ptr(),
        B, C, *grid, pt, ph, pw,
        *video.stride(),
        bool(channels_last), bool(to_tokens), video.element_size(), _extension.stream_handle(video),
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
    """tokens (B, S, K) of a (T', H', W') grid -> new contiguous video (B, C, T, H, W)."""
    tokens = tokens.contiguous()  # the kernel reads whole tokens as contiguous runs
    B, S, K = tokens.shape
    pt, ph, pw = patch
    video = tokens.new_empty((B, K // (pt * ph * pw), grid[0] * pt, grid[1] * ph, grid[2] * pw))
    _launch(video, tokens, patch, grid, channels_last, to_tokens=False)
    return video
