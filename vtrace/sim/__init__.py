"""The what-if model: a SimPy replay of emulated and virtio I/O paths (docs/model.md).

``load_config(name_or_path, overrides)`` reads and validates a model from ``models/``;
``simulate(config)`` runs it; ``replay(model, trace=..., overrides=...)`` does both, with
request arrivals from a trace when one is given. Results carry the summary (the
``vtrace replay --json`` object) and the per-request polars frame.
"""

from __future__ import annotations

from vtrace.sim.config import Config, load_config, model_names
from vtrace.sim.engine import SimResult, simulate
from vtrace.sim.run import replay

__all__ = ["Config", "SimResult", "load_config", "model_names", "replay", "simulate"]
