"""A synthetic churn world for the demo, the end-to-end tests and the loop benchmark.

Customers have a tenure, a monthly charge, support calls, data usage, a contract type, a payment
method, a region, and any number of extra noise features. Whether they churn follows a logistic model
of those features. Two documented shifts turn the world the model was trained on into the one it
meets later, each on its own or both together:

- **Covariate shift** (``INPUTS_SHIFTED``): prices rise (monthly charges +35 %), customers call support
  more (+1.5 calls), and a new payment method ("crypto") appears. The rule that decides who leaves is
  the same, so a model trained on the reference world stays about as accurate (0.76 against 0.79): only
  the inputs' distributions show it, which is what monitoring's drift tests watch.
- **Concept drift** (``CONCEPT_SHIFTED``): heavy data users, who used to stay, now leave (the usage
  coefficient flips from -0.9 to +1.2). The inputs look as before, so no drift test can see it; the
  same inputs mean something else (accuracy 0.67), which only labelled performance shows and only
  retraining on recent labels can fix.
- ``SHIFTED`` is both at once (accuracy 0.60).

tests/unit/test_scenario.py holds these properties.

Everything is generated from a seed: no download, and the same seed gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

CONTRACTS = ("monthly", "annual", "two-year")
PAYMENTS = ("card", "bank", "paper")
REGIONS = ("north", "south", "east", "west")
TARGET = "churned"


@dataclass(frozen=True)
class Phase:
    """How the world looks in one period."""

    price_factor: float = 1.0
    extra_calls: float = 0.0
    crypto_share: float = 0.0
    usage_effect: float = -0.9


REFERENCE = Phase()
INPUTS_SHIFTED = Phase(price_factor=1.35, extra_calls=1.5, crypto_share=0.15)
CONCEPT_SHIFTED = Phase(usage_effect=1.2)
SHIFTED = Phase(price_factor=1.35, extra_calls=1.5, crypto_share=0.15, usage_effect=1.2)


def base_features(n_noise: int = 0) -> list[tuple[str, str]]:
    """The feature names and types, in model order."""
    features = [
        ("tenure_months", "numeric"),
        ("monthly_charges", "numeric"),
        ("support_calls", "numeric"),
        ("usage_gb", "numeric"),
        ("contract", "categorical"),
        ("payment_method", "categorical"),
        ("region", "categorical"),
    ]
    return features + [(f"signal_{i:02d}", "numeric") for i in range(n_noise)]


def generate(n: int, phase: Phase = REFERENCE, *, seed: int = 0, n_noise: int = 0) -> pd.DataFrame:
    """``n`` customers of the given phase, with the target column ``churned`` (0/1)."""
    rng = np.random.default_rng(seed)
    tenure = rng.gamma(2.0, 12.0, n).clip(0, 120)
    charges = rng.normal(65, 18, n).clip(15, 160) * phase.price_factor
    calls = rng.poisson(1.2 + phase.extra_calls, n).astype(float)
    usage = rng.lognormal(2.5, 0.6, n)
    contract = rng.choice(CONTRACTS, n, p=[0.55, 0.3, 0.15])
    payments = [*PAYMENTS, "crypto"]
    crypto = phase.crypto_share
    p_pay = np.array([0.5, 0.35, 0.15, 0.0]) * (1 - crypto) + np.array([0, 0, 0, crypto])
    payment = rng.choice(payments, n, p=p_pay / p_pay.sum())
    region = rng.choice(REGIONS, n)
    noise = rng.normal(0, 1, (n, n_noise))
    usage_z = (np.log(usage) - 2.5) / 0.6
    logit = (
        -0.4
        - 0.045 * tenure
        + 0.035 * (charges - 65)
        + 0.45 * calls
        + phase.usage_effect * usage_z
        + np.select([contract == "annual", contract == "two-year"], [-0.9, -1.8], 0.0)
        + np.where(payment == "paper", 0.5, 0.0)
        + np.where(payment == "crypto", 0.8, 0.0)
        + (noise[:, : min(3, n_noise)] @ np.array([0.3, -0.2, 0.15][: min(3, n_noise)]) if n_noise else 0.0)
    )
    churned = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pd.DataFrame(
        {
            "tenure_months": tenure.round(1),
            "monthly_charges": charges.round(2),
            "support_calls": calls,
            "usage_gb": usage.round(2),
            "contract": contract,
            "payment_method": payment,
            "region": region,
        }
    )
    for i in range(n_noise):
        frame[f"signal_{i:02d}"] = noise[:, i].round(4)
    frame[TARGET] = churned
    return frame
