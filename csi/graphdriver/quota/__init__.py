"""Size limits of directory layers: XFS project quota (xfs) and the per-layer policy (limits)."""
