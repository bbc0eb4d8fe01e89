"""Dosage rule parameters: agency defaults, and the effective values for one zone."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from services.dosage.core.schedule import WeeklySchedule


class DosageParams(BaseModel):
    """Agency defaults. Seconds and metres, as agencies state them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exit_buffer_m: float = Field(25.0, ge=0, allow_inf_nan=False)
    exit_confirm_s: float = Field(60.0, ge=0, allow_inf_nan=False)
    max_gap_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    max_accuracy_m: float = Field(50.0, gt=0, allow_inf_nan=False)
    min_visit_s: float = Field(120.0, ge=0, allow_inf_nan=False)
    target_s: float = Field(900.0, gt=0, allow_inf_nan=False)
    max_visit_s: float = Field(1200.0, gt=0, allow_inf_nan=False)
    revisit_s: float = Field(7200.0, gt=0, allow_inf_nan=False)

    @property
    def exit_confirm_ms(self) -> int:
        return seconds_to_ms(self.exit_confirm_s)

    @property
    def max_gap_ms(self) -> int:
        return seconds_to_ms(self.max_gap_s)

    @property
    def revisit_ms(self) -> int:
        return seconds_to_ms(self.revisit_s)

    def rules_for(
        self,
        target_s: float | None = None,
        min_visit_s: float | None = None,
        max_visit_s: float | None = None,
        schedule: WeeklySchedule | None = None,
    ) -> ZoneRules:
        """Per-zone overrides win over the agency defaults."""
        return ZoneRules(
            min_visit_ms=seconds_to_ms(self.min_visit_s if min_visit_s is None else min_visit_s),
            target_ms=seconds_to_ms(self.target_s if target_s is None else target_s),
            max_visit_ms=seconds_to_ms(self.max_visit_s if max_visit_s is None else max_visit_s),
            schedule=schedule,
        )


@dataclass(frozen=True, slots=True)
class ZoneRules:
    """The thresholds that judge one zone's visits, in integer milliseconds (exact comparisons)."""

    min_visit_ms: int
    target_ms: int
    max_visit_ms: int
    # When the zone is patrolled (None: always). Visits count either way; only the live
    # status reads it.
    schedule: WeeklySchedule | None = None


def seconds_to_ms(seconds: float) -> int:
    return round(seconds * 1000)
