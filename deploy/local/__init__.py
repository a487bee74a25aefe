"""Local infrastructure without Docker: a single-node Kafka broker and a project-private Postgres."""
