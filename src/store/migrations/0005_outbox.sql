-- Durable outbox of Subscription notifications (rest-hook). A row is
-- written in the same transaction as the change it announces; the
-- delivery worker sends it, retrying with exponential back-off.
CREATE TABLE notification_outbox (
    id INTEGER PRIMARY KEY,
    subscription_id TEXT NOT NULL,
    -- The resource the notification is about, Type/id (id only travels).
    focus TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    -- pending | delivered | abandoned
    state TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX notification_due ON notification_outbox (state, next_attempt_ms);
