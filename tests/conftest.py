"""Shared test settings and helpers.

Hypothesis profiles sized for a 2-core CI machine; the map names from the registry; the
save/pickle/deepcopy round trip that every module must survive.
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import torch
from hypothesis import HealthCheck, settings
from torch import nn

from convexmix.functional._registry import MAPS

#: every map name a layer or parametrization takes, in the registry's order.
MAP_NAMES: list[str] = list(MAPS)


def round_trips(module: nn.Module) -> list[nn.Module]:
    """Three independent copies of ``module``: torch.save/load, pickle, and deepcopy."""
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return [
        torch.load(buf, weights_only=False),
        pickle.loads(pickle.dumps(module)),
        copy.deepcopy(module),
    ]


settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
