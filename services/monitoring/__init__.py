"""Monitoring: drift of live traffic against reference profiles, labelled performance, canary verdicts."""
