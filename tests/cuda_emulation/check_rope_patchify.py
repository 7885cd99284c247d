"""Emulated checks of csrc/rope.cu and csrc/patchify.cu (see run.py)."""

# ---------------------------------------------------------------------------------------------
# RoPE (csrc/rope.cu) and patchify (csrc/patchify.cu) through dit_fast/cuda/{rope,patchify}.py
# ---------------------------------------------------------------------------------------------

FLOOR = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def check_rope(check):
    import torch

    from dit_fast.cuda import rope as cuda_rope
    from dit_fast.ops import rope as R

    def rope(x, grid, split=None, theta=10000.0):
        D = x.shape[-1]
        split = R.rope_split(D, split)
        table = R.rope_inv_freq_reference(D, theta, split)
        out = cuda_rope.rope_3d(x, grid, table, split, False)
        back = cuda_rope.rope_3d(out, grid, table, split, True)
        ref = R.apply_rope_3d_reference(x, grid, theta, split)
        ref64 = R.apply_rope_3d_reference(x.double(), grid, theta, split)
        err = (out.double() - ref64).abs().max().item()
        torch_err = (ref.double() - ref64).abs().max().item()
        undo_err = (back.double() - x.double()).abs().max().item()
        floor = FLOOR[str(x.dtype)[6:]]
        detail = f"err {err:.1e} (torch {torch_err:.1e}), inverse err {undo_err:.1e}"
        assert err <= 2 * torch_err + floor * max(1.0, ref64.abs().max().item()), detail
        assert undo_err <= 4 * floor * max(1.0, x.abs().max().item()), detail
        return detail

    def case(x, grid, split=None):
        check(f"rope {tuple(x.shape)} {x.dtype} strides {x.stride()} split {split}", rope, x, grid, split)

    grid = (3, 5, 7)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        case(torch.randn(2, 105, 3, 72, dtype=dtype), grid)  # 128-bit accesses
        case(torch.randn(1, 105, 2, 64, dtype=dtype), grid, (16, 32, 16))  # custom split
    case(torch.randn(2, 105, 3, 3, 72)[:, :, 1], grid)  # slice of a packed qkv, in place
    case(torch.randn(2, 105, 2, 74)[..., :72], grid)  # even strides, not 16-byte multiples: one pair per access
    case(torch.randn(1, 105, 1, 66, dtype=torch.float16), grid)  # D = 66: one pair per access
    case(torch.randn(1, 2 * 3 * 41, 1, 24), (2, 3, 41), (8, 8, 8))  # angles of tens of radians


def check_patchify(check):
    import torch

    from dit_fast.cuda import patchify as cuda_patchify
    from dit_fast.ops import patchify as P

    def roundtrip(video, patch, order):
        tokens = cuda_patchify.patchify_3d(video, patch, order == "thwc")
        grid = tuple(d // p for d, p in zip(video.shape[2:], patch))
        back = cuda_patchify.unpatchify_3d(tokens, patch, grid, order == "thwc")
        assert torch.equal(tokens, P.patchify_3d_reference(video, patch, order)), "patchify differs from the reference"
        assert torch.equal(back, video), "unpatchify does not restore the video"

    def case(video, patch, order):
        check(f"patchify {tuple(video.shape)} {video.dtype} strides {video.stride()} patch {patch} {order}",
              roundtrip, video, patch, order)

    for patch, shape in (((1, 2, 2), (2, 3, 3, 10, 14)), ((2, 2, 2), (1, 5, 6, 10, 14)), ((1, 2, 2), (1, 16, 2, 4, 6))):
        for order in ("cthw", "thwc"):
            for dtype in (torch.float32, torch.float16):  # K * e = 48 / 24, 160 / 80, 256 / 128 bytes
                case(torch.randn(shape, dtype=dtype), patch, order)
    case(torch.randn(2, 3, 3, 10, 17)[..., 1:-2], (1, 2, 2), "cthw")  # cropped video
    case(torch.randn(2, 3, 3, 10, 14).to(memory_format=torch.channels_last_3d), (1, 2, 2), "thwc")
    case(torch.randn(1, 1100, 1, 2, 40), (1, 2, 2), "cthw")  # 17.6 KB tokens: one per block, rows split
