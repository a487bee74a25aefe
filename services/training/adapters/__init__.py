"""Training's adapters: Postgres repositories, the artifact store and the process pool."""
