-- Zones, processing state with its consumer offsets, visit history and the audit log.
CREATE TABLE IF NOT EXISTS zones (
    zone_id     text PRIMARY KEY,
    feature     jsonb       NOT NULL,
    version     integer     NOT NULL DEFAULT 1,
    deleted     boolean     NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Offsets a consumer has fully applied, saved in the same transaction as its state.
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer    text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
);

-- Keyed state of one partition (a unit's open visits, a zone's presence); key '' is the
-- partition's own (its clock).
CREATE TABLE IF NOT EXISTS partition_state (
    consumer    text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    key         text    NOT NULL,
    value       jsonb   NOT NULL,
    PRIMARY KEY (consumer, topic, partition, key)
);

CREATE TABLE IF NOT EXISTS visits (
    unit_id     text             NOT NULL,
    zone_id     text             NOT NULL,
    started_at  timestamptz      NOT NULL,
    ended_at    timestamptz      NOT NULL,
    duration_s  double precision NOT NULL CHECK (duration_s >= 0),
    end_reason  text             NOT NULL,
    qualified   boolean          NOT NULL,
    target_met  boolean          NOT NULL,
    overstay    boolean          NOT NULL,
    PRIMARY KEY (unit_id, zone_id, started_at)
);
CREATE INDEX IF NOT EXISTS visits_zone_time ON visits (zone_id, started_at);

CREATE TABLE IF NOT EXISTS zone_periods (
    zone_id      text             NOT NULL,
    period_start timestamptz      NOT NULL,
    period_end   timestamptz      NOT NULL,
    presence_s   double precision NOT NULL,
    officer_s    double precision NOT NULL,
    visits       integer          NOT NULL,
    dosed_visits integer          NOT NULL,
    PRIMARY KEY (zone_id, period_start)
);

-- Append-only: event ids are deterministic, so a redelivered event is not stored twice.
CREATE TABLE IF NOT EXISTS audit_log (
    seq         bigserial   PRIMARY KEY,
    event_id    text        NOT NULL UNIQUE,
    type        text        NOT NULL,
    subject     text        NOT NULL,
    time        timestamptz NOT NULL,
    event       jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
