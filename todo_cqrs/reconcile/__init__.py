"""Reconciliation: the read model checked against the write model, continuously, and repaired
(docs/reconciliation.md). `ranges` finds where they differ from checksums, `sides` computes them in
SQL, `passes` repairs, `retention` keeps the outbox bounded, `service` is the function's tick."""
