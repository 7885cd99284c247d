"""dit_fast.diffusion"""
