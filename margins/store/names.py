"""A result folder named by what it holds: which estimator measured it, what its values are, and which bound they
give on the true margin (the L2 norm of the smallest perturbation in the subspace that changes the label).

DeepFool and FMN return a perturbation that changes the label, so their margins are upper bounds on the true
margin; the certifier proves that no smaller perturbation changes it, so its values are lower bounds. Folders
written before the estimator was recorded hold DeepFool's margins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

DEFAULT_ESTIMATOR = "deepfool"
ESTIMATOR_NAMES = {"deepfool": "DeepFool", "fmn": "FMN", "certify": "certifier"}
QUANTITIES = {"deepfool": "DeepFool margin", "fmn": "FMN margin", "certify": "certified lower bound"}
BOUNDS = {"deepfool": "upper", "fmn": "upper", "certify": "lower"}


def estimator_of(settings: Mapping[str, Any]) -> str:
    """The estimator of a result folder's settings (`summary.json`'s or a manifest's); DeepFool when unrecorded."""
    return str(settings.get("estimator") or DEFAULT_ESTIMATOR)


def quantity(estimator: str | None) -> str:
    """What an estimator's values are, singular: "DeepFool margin", "FMN margin", "certified lower bound"."""
    estimator = estimator or DEFAULT_ESTIMATOR
    return QUANTITIES.get(estimator, f"{estimator} margin")


def bound(estimator: str | None) -> str:
    """ "upper" (an attack's margin: a label change was found) or "lower" (a certificate)."""
    return BOUNDS.get(estimator or DEFAULT_ESTIMATOR, "upper")


def folder_suffix(estimator: str) -> str:
    """The suffix of a default result folder: none for DeepFool (the paper's), `_<estimator>` otherwise."""
    return "" if estimator == DEFAULT_ESTIMATOR else f"_{estimator}"


def describe_held(before: Mapping[str, Any], now: Mapping[str, Any], limit: int = 3) -> str:
    """What a folder holds against what a run asks for, e.g. "FMN margins, with other settings (estimator: "fmn"
    there, "deepfool" now; max_iter: ...)" or "DeepFool margins, with the same settings"; `before`/`now`: the two
    runs' fingerprints (or settings), the estimator and then the first `limit` other differing keys shown."""
    before, now = json.loads(json.dumps(before)), json.loads(json.dumps(now))
    held = f"{quantity(estimator_of(before))}s"
    diffs = differing(before, now)
    if not diffs:
        return f"{held}, with the same settings"
    diffs.sort(key=lambda k: k != "estimator")  # the estimator first, the rest in name order
    shown = "; ".join(f"{k}: {_short(before.get(k))} there, {_short(now.get(k))} now" for k in diffs[:limit])
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return f"{held}, with other settings ({shown}{more})"


def differing(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ (a missing key counts as None), in name order."""
    return [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
