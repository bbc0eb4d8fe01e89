-- Small facts a service keeps between runs (for example the zone versions it has announced).
CREATE TABLE IF NOT EXISTS service_meta (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);
