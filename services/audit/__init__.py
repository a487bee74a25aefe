"""The audit service: every event of the platform kept once, in order, hash-chained and signed.

It reads every audited topic (and the dead letters) in its own consumer group, appends each record to an
append-only trail whose row hash chains to the previous row, signs the head of the chain every so often
(AuditCheckpoint on ``mlops.audit`` and an export file), and answers queries, causal traces, verification
and exports over HTTP. ``docs/audit.md`` is the contract for readers outside the platform.
"""
