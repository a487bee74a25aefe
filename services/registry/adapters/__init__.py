"""The registry's ports on real infrastructure: Postgres and the artifact store."""
