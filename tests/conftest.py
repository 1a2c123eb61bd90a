"""Test-wide environment: offline hubs, no telemetry, a private Prefect home per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
if "PREFECT_HOME" not in os.environ:  # removed when the session ends: each run's would otherwise stay in /tmp
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="distac-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on loopback; clients find it through AWS_ENDPOINT_URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback S3 server; yields its s3:// URI."""
    import boto3
    import fsspec

    name = f"distac-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    fsspec.filesystem("s3").invalidate_cache()
    yield f"s3://{name}"


# --------------------------------------------------------------------------------------------- pipeline

TINY_PROFILE = os.path.join(os.path.dirname(__file__), os.pardir, "profiles", "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A tiny random BERT directory (usable as an hf_text ``name_or_path``), built once per session."""
    from distac.models.text import create_random_encoder

    return create_random_encoder(tmp_path_factory.mktemp("tiny-encoder"))


def _deep_update(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture(scope="session")
def make_tiny_params(tiny_encoder):
    """``make_tiny_params(directory, **overrides) -> path``: profiles/tiny.yaml with the tiny encoder, its
    storage root and MLflow store inside ``directory``, and nested ``overrides`` applied."""
    import yaml

    def make(directory, name: str = "params.yaml", **overrides) -> str:
        with open(TINY_PROFILE, encoding="utf-8") as handle:
            params = yaml.safe_load(handle)
        params["model"]["name_or_path"] = tiny_encoder
        params["storage"]["root"] = os.path.join(str(directory), "storage")
        params["mlflow"]["tracking_uri"] = f"sqlite:///{os.path.join(str(directory), 'mlflow.db')}"
        _deep_update(params, overrides)
        path = os.path.join(str(directory), name)
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(params, handle, sort_keys=False)
        return path

    return make


def pytest_unconfigure(config):
    """Prefect stops its temporary API server at interpreter exit and logs that to a console pytest has
    already closed; mute that one farewell instead of printing a logging traceback after the summary."""
    import logging

    logging.getLogger("prefect").disabled = True
