"""tpi: tensor-parallel inference of language models on a cluster of small devices."""

from tpi.cluster import ClusterError, LocalCluster

__all__ = ["LocalCluster", "ClusterError"]
__version__ = "0.1.0"
