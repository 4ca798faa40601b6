"""A machine with a worker's install only (`pip install tpi`, no [master] extra): put this folder on
PYTHONPATH and any import of a master's package fails, as it would there. tests/test_cli.py runs
its workers so, and tests/test_cluster.py imports a worker's modules so."""

import sys

from launcher.cli import MASTER_PACKAGES  # noqa: E402  (launcher.cli imports none of them)


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MASTER_PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r} (a worker's install: tests/no_extras)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
