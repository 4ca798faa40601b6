"""The one base class of the errors tpi explains to its user.

Owns: ``TpiError``. Every error raised for something the user can act on (a setting, a file, a
peer, a request) derives from it: ``ConfigError``, ``CommError``, ``ClusterError``,
``ShardFileError``, ... The command line prints a ``TpiError`` as one line and lets anything else
show its traceback: that is a bug. Does not know: anything else (it imports nothing).
"""

from __future__ import annotations


class TpiError(Exception):
    """A failure tpi explains in its message: bad input or configuration, a damaged file, a peer
    that failed or was refused. Not a bug."""
