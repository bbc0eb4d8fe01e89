"""Output contracts: closed visits, zone periods, live zone status and the CloudEvents envelope.

The core builds these as plain dicts on the hot path; tests validate them against these models,
and `dosewatch schemas` exports them as JSON Schema for consumers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Seconds = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VisitRecord(_Strict):
    """One closed visit: a row of `visits.jsonl` and the data of `dosewatch.visit.ended`."""

    unit_id: str
    zone_id: str
    started_at: AwareDatetime
    ended_at: AwareDatetime = Field(description="the visit's last inside-or-near ping")
    duration_s: Seconds
    end_reason: Literal["exited", "signal_lost", "end_of_input", "zone_changed"]
    qualified: bool = Field(description="duration_s >= min_visit_s: counts toward dosage")
    target_met: bool = Field(description="duration_s >= target_s")
    overstay: bool = Field(description="duration_s > max_visit_s")


class VisitProgress(_Strict):
    """Data of `dosewatch.visit.started`, `.target_met` and `.overstay`."""

    unit_id: str
    zone_id: str
    started_at: AwareDatetime
    last_in: AwareDatetime
    duration_s: Seconds
    target_s: Seconds
    max_visit_s: Seconds


class ZonePeriodRecord(_Strict):
    """Dosage of one zone in one shift: a row of `zone_periods.jsonl`."""

    zone_id: str
    period_start: AwareDatetime
    period_end: AwareDatetime
    presence_s: Seconds = Field(description="merged presence clipped to the shift (patrol-minutes)")
    officer_s: Seconds = Field(description="sum of qualified visits clipped (officer-minutes)")
    visits: Annotated[int, Field(ge=0)] = Field(
        description="presence periods starting in the shift"
    )
    dosed_visits: Annotated[int, Field(ge=0)] = Field(description="of those, lasting >= target_s")


class UnitPresence(_Strict):
    unit_id: str
    since: AwareDatetime


class ZoneStatus(_Strict):
    """Live status of one zone, as consoles and MDTs receive it."""

    zone_id: str
    status: Literal["active", "met", "overstay", "due", "satisfied", "inactive"]
    as_of: AwareDatetime
    occupied_since: AwareDatetime | None
    elapsed_s: Seconds
    remaining_s: Seconds = Field(description="time still needed to reach the target")
    target_s: Seconds
    units_present: list[str]
    units: list[UnitPresence] = Field(description="each unit present and when it arrived")
    last_dosed_end: AwareDatetime | None
    shift: ZonePeriodRecord = Field(description="totals of the shift containing as_of")
    previous_status: str | None = None


class CloudEvent(_Strict):
    """CloudEvents 1.0, JSON structured mode. `id` is deterministic: repeats are duplicates."""

    specversion: Literal["1.0"]
    id: str
    source: str
    type: Literal[
        "dosewatch.visit.started",
        "dosewatch.visit.target_met",
        "dosewatch.visit.overstay",
        "dosewatch.visit.ended",
        "dosewatch.zone.status_changed",
        "dosewatch.zone.changed",
        "dosewatch.zone.edited",
        "dosewatch.key.created",
        "dosewatch.key.revoked",
    ]
    time: AwareDatetime
    subject: str = Field(description="the zone id (the key id for key events)")
    datacontenttype: Literal["application/json"] = "application/json"
    data: dict[str, Any]
    streamclock: AwareDatetime | None = Field(
        None, description="extension: the emitting stream's clock (visit events)"
    )


class RejectedPing(_Strict):
    """A row of `rejected.jsonl`: the input line (and array index) and every problem found."""

    line: Annotated[int, Field(ge=1)]
    index: Annotated[int, Field(ge=0)] | None = None
    errors: list[dict[str, str]]
    raw: str
