-- Transfers another process runs next to the server (a `konsil import`),
-- with that process's id. While it lives, the server's start-up pass leaves
-- the transfer's notes in transfers_unaudited alone: the import stores its
-- own event at its end. The row goes with that event, or, once the process
-- is gone without one (killed), with the start-up pass's event.
CREATE TABLE transfers_running (
    transfer_id INTEGER PRIMARY KEY,
    pid         INTEGER NOT NULL,
    started_ms  INTEGER NOT NULL
);
