"""Layer diffs: the one OCI layer-tar codec (ocitar) and the naive differ that walks two trees."""
