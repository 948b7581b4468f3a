"""Where rank 0's scalars go (``logging.backends``): TensorBoard (``OUTPUT/tb``), JSON lines (``OUTPUT/log.jsonl``),
Weights & Biases and MLflow. Every sink gets the same scalars (``kind/key`` at the optimizer step) and, once, the
resolved config as the run's parameters. W&B and MLflow are optional extras, imported only when chosen; a resumed run
continues the same W&B run / MLflow run: its id is kept in ``OUTPUT/<backend>_run_id``.
"""

from __future__ import annotations

import abc
import json
import os
from typing import Any, Dict, List, Optional, Sequence, TextIO

from conv2former.errors import UserError

BACKENDS = ("tensorboard", "jsonl", "wandb", "mlflow")
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # backend -> (module, pip extra)


class Sink(abc.ABC):
    """One destination of the scalars; ``flush`` and ``close`` do nothing unless the destination needs them."""

    @abc.abstractmethod
    def log(self, kind: str, step: int, values: Dict[str, float]) -> None: ...

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class TensorBoardSink(Sink):
    def __init__(self, output: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(output, "tb"))

    def log(self, kind: str, step: int, values: Dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class JsonlSink(Sink):
    def __init__(self, output: str) -> None:
        self.file: TextIO = open(os.path.join(output, "log.jsonl"), "a")

    def log(self, kind: str, step: int, values: Dict[str, float]) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _run_id_file(output: str, backend: str) -> str:
    return os.path.join(output, f"{backend}_run_id")


def _stored_run_id(output: str, backend: str) -> Optional[str]:
    path = _run_id_file(output, backend)
    return open(path).read().strip() if os.path.exists(path) else None


def _store_run_id(output: str, backend: str, run_id: str) -> None:
    with open(_run_id_file(output, backend), "w") as f:
        f.write(run_id + "\n")


class WandbSink(Sink):
    """One W&B run per output folder (offline with ``WANDB_MODE=offline``, as in the tests)."""

    def __init__(self, output: str, project: str, name: str, config: Dict[str, Any]) -> None:
        import wandb

        stored = _stored_run_id(output, "wandb")
        self.run = wandb.init(project=project, name=name, dir=output, id=stored, resume="allow" if stored else None,
                              config=config if stored is None else None)  # fmt: skip
        if stored is None:
            _store_run_id(output, "wandb", self.run.id)

    def log(self, kind: str, step: int, values: Dict[str, float]) -> None:
        self.run.log({f"{kind}/{key}": value for key, value in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink(Sink):
    """One MLflow run per output folder, in ``logging.mlflow_tracking_uri`` (default: MLflow's own, from
    MLFLOW_TRACKING_URI or ./mlruns)."""

    def __init__(self, output: str, experiment: str, name: str, config: Dict[str, Any], uri: Optional[str]) -> None:
        import mlflow

        if uri:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        stored = _stored_run_id(output, "mlflow")
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_id=stored, run_name=None if stored else name)
        if stored is None:
            _store_run_id(output, "mlflow", self.run.info.run_id)
            mlflow.log_params(_flat(config))  # (parameters cannot change: logged when the run starts)

    def log(self, kind: str, step: int, values: Dict[str, float]) -> None:
        self.mlflow.log_metrics({f"{kind}/{key}": float(value) for key, value in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flat(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (MLflow's parameters are flat), values as strings of at most 500."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


def check_backends(backends: Sequence[str]) -> None:
    """A one-line error for an unknown backend, or a chosen one whose package is not installed."""
    import importlib.util

    for backend in backends:
        if backend not in BACKENDS:
            raise UserError(f"logging.backends: unknown {backend!r}: choose among {', '.join(BACKENDS)}")
        if backend in EXTRAS and importlib.util.find_spec(EXTRAS[backend][0]) is None:
            raise UserError(
                f"logging.backends: {backend} needs the {backend} package: pip install -e '.[{EXTRAS[backend][1]}]'"
            )


def open_sinks(
    backends: Sequence[str], output: str, project: str, name: str, config: Dict[str, Any], mlflow_uri: Optional[str]
) -> List[Sink]:
    """The chosen sinks (rank 0)."""
    check_backends(backends)
    sinks: List[Sink] = []
    for backend in backends:
        try:
            if backend == "tensorboard":
                sinks.append(TensorBoardSink(output))
            elif backend == "jsonl":
                sinks.append(JsonlSink(output))
            elif backend == "wandb":
                sinks.append(WandbSink(output, project, name, config))
            else:
                sinks.append(MlflowSink(output, project, name, config, mlflow_uri))
        except Exception as err:  # noqa: BLE001 - the service's own error (credentials, a store it refuses), in one line
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(f"logging.backends: {backend} could not start its run ({first})") from None
    return sinks
