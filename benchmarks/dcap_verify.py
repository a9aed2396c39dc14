"""Cost of quote verification per handshake message: migsgx's own verifier alone (before
DCAP) against the verification of record (freshness, CRL, migsgx's checks, dcap-qvl).

Each side of a migration handshake verifies two quotes (its own, the peer's), so the
handshake grows by twice the difference.  Prints JSON: min/median/max seconds per call.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from migsgx.sgx.ca import ProvisioningCA
from migsgx.sgx.collateral import Collateral
from migsgx.sgx.dcap import verify_dcap
from migsgx.sgx.platform import EmulatedPlatform
from migsgx.sgx.quote import verify_quote
from migsgx.sgx.structs import ReportBody

RUNS = 7
CALLS = 50


def _measure(fn: Callable[[], object]) -> dict[str, float]:
    runs = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        runs.append((time.perf_counter() - t0) / CALLS)
    return {"min": min(runs), "median": statistics.median(runs), "max": max(runs)}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="migsgx-bench-dcap-"))
    ca = ProvisioningCA.init(root / "ca")
    host = EmulatedPlatform.init(root / "a", ca, host_id="a")
    body = ReportBody(mr_enclave=bytes(32), mr_signer=bytes(32), isv_prod_id=1, isv_svn=1)
    quote = host.quote(body, bytes(64))
    roots = [ca.certificate]
    result = {
        "runs": RUNS,
        "calls_per_run": CALLS,
        "own_verifier_seconds": _measure(lambda: verify_quote(quote, roots)),
        "dcap_of_record_seconds": _measure(
            lambda: verify_dcap(quote, [Collateral.from_json(c) for c in host.collateral()], roots)
        ),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
