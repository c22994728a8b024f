"""Kernel primitives with no strata terms: mounts, tree copies, filesystem facts, pipe streams, sqlite group commit."""
