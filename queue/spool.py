"""mailqueue: the replicated spool state machine (built in a later issue)."""
