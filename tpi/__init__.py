"""tpi: tensor-parallel inference of language models on a cluster of small devices.

``from tpi import LocalCluster`` loads the master's side on first use only, so that a worker
(``tpi worker``), which imports ``tpi.worker``, loads nothing of it.
"""

__all__ = ["LocalCluster", "ClusterError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from tpi import cluster

        return getattr(cluster, name)
    raise AttributeError(f"module 'tpi' has no attribute {name!r}")
