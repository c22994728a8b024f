"""The overlay driver and aufs, its predecessor: layout, upper-dir diffs, incremental freezes."""
