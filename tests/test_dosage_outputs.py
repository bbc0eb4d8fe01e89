"""What the dosage service publishes for a status change: the zone-status record and the audit
event, built once from the board's snapshot."""

from __future__ import annotations

from services.dosage.core.events import status_row
from services.dosage.service import DosageService, DosageSettings
from tests.test_board import T0, board, ended, started


def test_dosage_publishes_each_status_as_status_row_builds_it() -> None:
    """The service takes the status from the status event's data (not building the row twice):
    the record must be status_row's, key for key and in its order."""
    service = DosageService(DosageSettings())
    b = board()
    changes = b.apply(started("u1", T0)) + b.apply(started("u2", T0 + 5_000))
    changes += b.apply(ended("u1", T0, T0 + 1_000_000, T0 + 1_300_000)) + b.advance(T0 + 9_000_000)
    assert len(changes) >= 3
    for change, out in zip(changes, service._changes(changes), strict=True):
        want = status_row(change.snapshot)
        assert out.status == want and list(out.status) == list(want)
        assert out.audit is not None and out.audit["data"]["previous_status"] == str(
            change.previous
        )
