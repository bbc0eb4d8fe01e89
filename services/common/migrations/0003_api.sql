-- The dispatch API: API keys, zone version history, and a hash chain over the audit log.

-- Keys are random 256-bit secrets, so a plain SHA-256 of the secret is enough to store them
-- (no password stretching needed); `key_id` is the public part shown in listings and logs.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      text        PRIMARY KEY,
    secret_hash bytea       NOT NULL,
    role        text        NOT NULL CHECK (role IN ('dispatcher', 'mdt', 'auditor', 'admin')),
    unit_id     text,
    label       text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL DEFAULT '',
    revoked_at  timestamptz,
    CHECK ((role = 'mdt') = (unit_id IS NOT NULL))
);

-- Every version of every zone, as written: who changed what, and when.
CREATE TABLE IF NOT EXISTS zone_versions (
    zone_id     text        NOT NULL,
    version     integer     NOT NULL,
    op          text        NOT NULL CHECK (op IN ('create', 'update', 'delete')),
    feature     jsonb       NOT NULL,
    changed_by  text        NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (zone_id, version)
);

-- Hash chain: hash = sha256(prev_hash || seq || '|' || event_id || '|' || event::text), with
-- prev_hash of the first row = 32 zero bytes. The trigger assigns seq under a lock held to
-- commit, so seq order is commit order: a reader paging by seq never skips a row that
-- commits late. `dosewatch audit verify` and GET /v1/audit/verify recompute the chain.
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS prev_hash bytea;
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS hash bytea;
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS actor text;

CREATE OR REPLACE FUNCTION audit_log_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last bytea;
BEGIN
    PERFORM pg_advisory_xact_lock(7428301);
    SELECT hash INTO last FROM audit_log ORDER BY seq DESC LIMIT 1;
    NEW.seq := nextval(pg_get_serial_sequence('audit_log', 'seq'));
    NEW.prev_hash := coalesce(last, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    NEW.hash := sha256(NEW.prev_hash
        || convert_to(NEW.seq::text || '|' || NEW.event_id || '|' || NEW.event::text, 'UTF8'));
    RETURN NEW;
END $$;

-- Rows written before the chain existed get theirs now, in seq order.
ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change;
DO $$
DECLARE
    r record;
    last bytea := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
BEGIN
    FOR r IN SELECT seq, event_id, event::text AS body FROM audit_log WHERE hash IS NULL ORDER BY seq LOOP
        UPDATE audit_log SET prev_hash = last,
            hash = sha256(last || convert_to(r.seq::text || '|' || r.event_id || '|' || r.body, 'UTF8'))
            WHERE seq = r.seq
            RETURNING hash INTO last;
    END LOOP;
END $$;
ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_change;

DROP TRIGGER IF EXISTS audit_log_chain ON audit_log;
CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_chain();

-- Readers of /v1/ws/audit wake on this instead of polling.
CREATE OR REPLACE FUNCTION audit_log_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dosewatch_audit', NEW.seq::text);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS audit_log_notify ON audit_log;
CREATE TRIGGER audit_log_notify AFTER INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_notify();
