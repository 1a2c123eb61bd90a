"""The pipeline layer: params (``params``), the stage table (``table``), the run store (``store``), the
runner (``runner``), the stage functions (``stages``), the report (``report``) and ``dvc.yaml``'s
generator (``dvc``). Plain library code: Prefect, MLflow and DVC call into it, never the reverse."""

from distac.pipeline.params import PipelineParams, load_params, parse_params
from distac.pipeline.runner import StageResult, UpstreamError, is_done, run_stage
from distac.pipeline.store import RunStore
from distac.pipeline.table import STAGES, TABLE, Plan, Scope, Stage, StageRef, fingerprint, ref

__all__ = ["PipelineParams", "load_params", "parse_params", "StageResult", "UpstreamError", "is_done", "run_stage",
           "RunStore", "STAGES", "TABLE", "Plan", "Scope", "Stage", "StageRef", "fingerprint", "ref"]
