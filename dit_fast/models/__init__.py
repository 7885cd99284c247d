"""dit_fast.models"""
