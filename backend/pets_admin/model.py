"""Triton Python-based backend ``pets_admin``: register/update/unregister tasks over HTTP/gRPC.

Installed as ``<backend-dir>/pets_admin/model.py`` (build/install_triton.sh); a model whose
config says ``backend: "pets_admin"`` (model_repository/pets_admin) serves it. A thin shell
over :class:`pets.admin.Admin`: it reads the BYTES inputs TOKEN, ACTION, NAME, MANIFEST and
WEIGHTS and answers RESULT (JSON) or a TritonError. ``execute`` never raises.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from pets.admin import ACTIONS, Admin, AdminError, config_parameters
from pets.protocol import check_stub_numpy

_INPUTS = ("TOKEN", "ACTION", "NAME", "MANIFEST", "WEIGHTS")


def _scalar(request: Any, name: str) -> bytes | None:
    """The single BYTES element of an optional input (None when absent)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = tensor.as_numpy()
    if arr.size != 1:
        raise AdminError(f"input {name} has {arr.size} elements; send exactly one (shape [1])")
    value = arr.reshape(-1)[0]
    return value if isinstance(value, bytes) else bytes(value)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        check_stub_numpy(np.__version__)
        config = json.loads(args["model_config"])
        self.model = config.get("name", "pets_admin")
        self.admin = Admin.from_parameters(
            config_parameters(config), Path(args["model_repository"]).resolve()
        )
        self.actions = pb_utils.MetricFamily(
            name="pets_admin_actions_total",
            description="pets_admin requests per action and outcome (ok or the error code)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._series: dict[tuple[str, str], Any] = {}
        state = "enabled" if self.admin._token else "DISABLED (no token configured)"
        pb_utils.Logger.log_info(
            f"pets_admin: store {self.admin.store}, backbone "
            f"{self.admin.fingerprint}, admin API {state}, pid {os.getpid()}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        action = "invalid"
        try:
            raw = {name: _scalar(request, name) for name in _INPUTS}
            act = (raw["ACTION"] or b"").decode("utf-8", "replace")
            action = act if act in ACTIONS else "invalid"
            result = self.admin.handle(
                raw["TOKEN"], raw["ACTION"], raw["NAME"], raw["MANIFEST"], raw["WEIGHTS"]
            )
        except AdminError as err:
            return self._error(action, err.message, err.code)
        except Exception as exc:  # never raise out of execute
            pb_utils.Logger.log_error(f"pets_admin: {action} failed:\n{traceback.format_exc()}")
            return self._error(
                action,
                f"pets_admin {action} failed: {type(exc).__name__}: {exc}; see the server log",
                "INTERNAL",
            )
        if action != "list" and action != "status":
            pb_utils.Logger.log_info(f"pets_admin: {json.dumps(result)}")
        self._count(action, "ok")
        out = np.array([json.dumps(result).encode()], dtype=np.object_)
        return pb_utils.InferenceResponse([pb_utils.Tensor("RESULT", out)])

    def _error(self, action: str, message: str, code: str) -> Any:
        self._count(action, code)
        err = pb_utils.TritonError(
            message, getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL)
        )
        return pb_utils.InferenceResponse(error=err)

    def _count(self, action: str, outcome: str) -> None:
        try:
            key = (action, outcome)
            if key not in self._series:
                self._series[key] = self.actions.Metric(
                    labels={"model": self.model, "action": action, "outcome": outcome}
                )
            self._series[key].increment(1)
        except Exception as exc:  # metrics must never fail a request
            pb_utils.Logger.log_warn(f"pets_admin: metric update failed: {exc}")
