"""Kernels behind ``convex_combination`` (private): nothing else in convexmix knows them."""
