"""The registry: model versions, their stages and lineage, datasets, artifacts and model cards."""
