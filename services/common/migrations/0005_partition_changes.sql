-- A partition's state as a log of saves: one row per partition per save, holding the keys
-- that changed ({key: value, or null for a deleted key}, as orjson bytes), where
-- partition_state took one upserted row per key. A snapshot row holds every key and makes
-- the rows before it (and the partition's rows in partition_state) obsolete; they are
-- deleted in the transaction that writes it.
CREATE TABLE IF NOT EXISTS partition_changes (
    consumer  text    NOT NULL,
    topic     text    NOT NULL,
    partition integer NOT NULL,
    seq       bigint  GENERATED ALWAYS AS IDENTITY,
    snapshot  boolean NOT NULL,
    changes   bytea   NOT NULL,
    PRIMARY KEY (consumer, topic, partition, seq)
);
-- Compact JSON already, written often and read only on a restore: not worth compressing.
ALTER TABLE partition_changes ALTER COLUMN changes SET STORAGE EXTERNAL;
