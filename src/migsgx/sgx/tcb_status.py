"""The TCB statuses of Intel's TCB info, by name (``docs/spec/collateral.md``).

Apart from :mod:`.collateral` so that a command line can offer them without
importing the X.509 machinery that verifies collateral.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ACCEPTABLE_STATUSES", "REVOKED", "TCB_STATUSES", "UP_TO_DATE"]

UP_TO_DATE: Final = "UpToDate"
REVOKED: Final = "Revoked"
# TCB statuses a verifier may accept besides UpToDate (Revoked is never one).
ACCEPTABLE_STATUSES: Final = (
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)
TCB_STATUSES: Final = (UP_TO_DATE, *ACCEPTABLE_STATUSES, REVOKED)
