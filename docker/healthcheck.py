"""Container healthcheck for docker-compose.yml (exit 0: healthy).

`healthcheck.py master`: the master's /health answers 200 (every worker joined; 503 while one is
missing). `healthcheck.py worker`: the worker holds an established TCP connection to the master's
worker port (it is fetching its shards or has joined). Ports from MASTER_HTTP_PORT (8000) and
MASTER_PORT (5555). Standard library only: the image has no curl or procps.
"""

import os
import sys
import urllib.request

ESTABLISHED = "01"


def master() -> bool:
    port = int(os.environ.get("MASTER_HTTP_PORT", "8000"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as r:
            return r.status == 200
    except OSError:
        return False


def worker() -> bool:
    port = int(os.environ.get("MASTER_PORT", "5555"))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl local_address rem_address st ...
            if fields[3] == ESTABLISHED and int(fields[2].rsplit(":", 1)[1], 16) == port:
                return True
    return False


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role not in ("master", "worker"):
        sys.exit("usage: healthcheck.py master|worker")
    sys.exit(0 if (master() if role == "master" else worker()) else 1)
