-- Unfiltered history paging orders visits by (started_at, unit_id, zone_id): keep it an
-- index scan on a large table.
CREATE INDEX IF NOT EXISTS visits_time ON visits (started_at, unit_id, zone_id);
