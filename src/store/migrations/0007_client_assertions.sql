-- SMART Backend Services: every client assertion's jti is taken once. A row
-- is kept until the assertion expires (after that the assertion itself is
-- refused), so replays are caught across restarts and across gateway nodes
-- sharing one database.
CREATE TABLE client_assertions (
    client_id TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX client_assertions_expiry ON client_assertions (expires_ms);
