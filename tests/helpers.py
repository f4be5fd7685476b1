"""Small helpers shared by the tests (fixtures live in conftest.py)."""
import math


def chi2_critical(df, z=3.29):
    """Upper chi-square quantile by Wilson-Hilferty; z = 3.29 is p ~ 5e-4 (the draws use fixed seeds)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
