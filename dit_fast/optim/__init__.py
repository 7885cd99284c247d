"""dit_fast.optim"""
