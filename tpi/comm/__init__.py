"""Communication between ranks: the allreduce and the master's control of its workers.

base.py (the interfaces: Communicator, ControlPlane, SingleRank, errors), wire.py (messages and
their validation), star.py (the star allreduce's hot path), hub.py (the master's end: socket,
control plane), spoke.py (a worker's end), membership.py (joining, leaving, being lost),
files.py (shard serving), collectives.py with ring.py, tree.py, gloo.py over links.py (the other
allreduces), payload.py, cost.py, trace.py (timing), security.py (CURVE keys).
"""
