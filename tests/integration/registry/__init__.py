"""Registry integration tests: real Kafka, real Postgres, real artifact store."""
