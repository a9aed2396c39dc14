"""What hung source enclaves cost the watch before a given-back tree continues.

``N`` enclave connections whose enclaves never answer (socket pairs; the
enclave's end held by this process, as ``holders.watch_holders`` checks with
the kernel), one live application process named in each set.  Timed: the
driver's ``watch_holders`` (every enclave asked at once, one deadline for the
group), paired in the same run with the same asks sent in turn, each with the
5 s bound of one enclave call (how the watch asked before).  Prints JSON:
min / median / max seconds per ``N``, over ``--repeat`` runs, and the load
average.  Needs root (the driver asks which network namespace a socket lives in).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from migsgx.agent.enclave_ask import HUNG_WAIT
from migsgx.agent.holders import watch_holders
from migsgx.agent.watch_ask import tell_all

NONCE = b"benchmark-nonce-0123456789"


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--enclaves", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    results: dict[str, object] = {}
    try:
        for count in args.enclaves:
            group, in_turn = [], []
            for _ in range(args.repeat):
                pairs = [socket.socketpair() for _ in range(count)]
                try:
                    drivers = [driver for driver, _ in pairs]
                    holders = [[os.getpid(), e.fileno(), "0", NONCE.hex()] for _, e in pairs]
                    start = time.perf_counter()
                    watch_holders(drivers, holders, app.pid)
                    group.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    for index, driver in enumerate(drivers):
                        tell_all([(index, driver, os.getpid(), NONCE, [app.pid])], HUNG_WAIT)
                    in_turn.append(time.perf_counter() - start)
                finally:
                    for driver, enclave in pairs:
                        driver.close()
                        enclave.close()
            results[str(count)] = {"at_once": _spread(group), "in_turn": _spread(in_turn),
                                   "runs": {"at_once": group, "in_turn": in_turn}}  # fmt: skip
    finally:
        app.kill()
        app.wait()
    print(json.dumps({"hung_enclaves": results, "loadavg": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
