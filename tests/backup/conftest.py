"""The backup tests' fixtures: defined in :mod:`registry_support` (a unique module name, so
other folders and the tests import them without clashing with other ``conftest`` modules)."""

from registry_support import driver, registry, registry_basic, registry_token, token_server  # noqa: F401
