"""Container health check: exit 0 only when the service answers 200 on /readyz.

Slim images have no curl; this needs only the standard library. The port follows RECMIX_PORT.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("RECMIX_PORT", "8000")
    timeout = float(os.environ.get("RECMIX_HEALTHCHECK_TIMEOUT", "3"))
    # No proxy: an HTTP(S)_PROXY set for the container must not swallow a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/readyz", timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
