"""The validation service: the promotion gate between a registered candidate and live traffic."""
