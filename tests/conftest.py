"""Shared test settings and helpers.

Hypothesis profiles sized for a 2-core CI machine; the map names from the registry; the
save/pickle/deepcopy round trip that every module must survive.

Profiles (``--hypothesis-profile=NAME`` or the ``HYPOTHESIS_PROFILE`` variable): ``ci``
(the default, sized for a 2-core CI machine), ``dev`` (a few hundred cases per property)
and ``long`` (10^5 cases per property, for the adversarial suite:
``pytest tests/functional/test_adversarial.py --hypothesis-profile=long``; hours on two
cores, so run it with ``-k`` per map in parallel processes).
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import torch
from hypothesis import HealthCheck, settings
from torch import nn

from convexmix.functional._registry import DETERMINISTIC

#: every deterministic map name a layer or parametrization takes, in the registry's order
#: (the sampling maps have tests of their own).
MAP_NAMES: list[str] = list(DETERMINISTIC)


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
settings.register_profile(
    "long",
    max_examples=100_000,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
