"""The training service: retrain policy, training jobs in a process pool, reproducible scikit-learn models."""
