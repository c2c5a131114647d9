"""Typed config loading and storage-option handling (shared by every job)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from care_scale.config import load_config, parse_overrides
from care_scale.exceptions import ConfigError
from care_scale.storage import redact, redact_options, to_delta, to_fsspec


@dataclasses.dataclass
class Inner:
    batch_size: int = 64
    backend: Literal["torch", "onnxruntime"] = "torch"


@dataclasses.dataclass
class Outer:
    source: str = ""
    target_mpp: float = 0.5
    keep_patches: bool = False
    mpp_override: float | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    inner: Inner = dataclasses.field(default_factory=Inner)

    def validate(self) -> None:
        if self.target_mpp <= 0:
            raise ConfigError(f"target_mpp must be positive, got {self.target_mpp}")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("source: s3://b/slides\ninner:\n  batch_size: 32\ntags: [a, b]\n")
    cfg = load_config(Outer, str(path), ["inner.backend=onnxruntime", "keep_patches=true",
                                         "mpp_override=0.25"])
    assert cfg.source == "s3://b/slides"
    assert cfg.inner == Inner(batch_size=32, backend="onnxruntime")
    assert cfg.keep_patches is True and cfg.mpp_override == 0.25 and cfg.tags == ["a", "b"]


def test_a_nested_override_keeps_the_fields_own_default():
    """`--set slide_encoder.checkpoint=X` alone keeps the slide encoder's default name (the
    field's default, ModelRef("care_tiny")), not the bare class's empty one."""
    from care_scale.embed import EmbedConfig

    cfg = load_config(EmbedConfig, None, ["slide_encoder.checkpoint=/models/care"])
    assert (cfg.slide_encoder.name, cfg.slide_encoder.checkpoint) == ("care_tiny",
                                                                      "/models/care")
    assert cfg.patch_encoder.name == EmbedConfig().patch_encoder.name
    assert load_config(EmbedConfig, None, ["slide_encoder.name=care"]).slide_encoder.name == "care"


def test_defaults_without_file():
    cfg = load_config(Outer)
    assert cfg == Outer()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.batchsize=3"], "inner.batchsize"),
        (["inner.backend=tensorflow"], "tensorflow"),
        (["inner.batch_size=1.5"], "integer"),
        (["target_mpp=-1"], "positive"),
        (["keep_patches=maybe"], "true/false"),
        (["novalue"], "key=value"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, str(bad))


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"},
                                                                  "d": [1, 2]}


def test_redact_removes_secrets():
    text = ("failed s3://AKIAEXAMPLE:supersecret@bucket/key?X-Amz-Signature=abcdef "
            "aws_secret_access_key=supersecret token: tok123")
    out = redact(text)
    assert "supersecret" not in out and "abcdef" not in out and "tok123" not in out
    assert "bucket/key" in out
    # Presigned S3 v2/v4, GCS and Azure SAS parameters; other parameters are kept.
    url = ("https://h/x.svs?design=a&Signature=S2SIG&AWSAccessKeyId=AKID&X-Goog-Signature=G"
           "&sig=AZSIG&X-Amz-Security-Token=TOK")
    assert redact(url) == ("https://h/x.svs?design=a&Signature=***&AWSAccessKeyId=***"
                           "&X-Goog-Signature=***&sig=***&X-Amz-Security-Token=***")
    opts = redact_options({"aws_secret_access_key": "s", "aws_region": "us-east-1"})
    assert opts == {"aws_secret_access_key": "***", "aws_region": "us-east-1"}


def test_options_translation():
    opts = {"aws_access_key_id": "k", "aws_secret_access_key": "s",
            "aws_endpoint_url": "http://127.0.0.1:9000", "aws_region": "us-east-1"}
    fs = to_fsspec(opts, "s3://b/x")
    assert fs == {"key": "k", "secret": "s",
                  "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000",
                                    "region_name": "us-east-1"}}
    delta = to_delta(opts, "s3://b/t")
    # S3-compatible endpoints need etag conditional puts; http endpoints need allow_http.
    assert delta["aws_conditional_put"] == "etag" and delta["aws_allow_http"] == "true"
    assert to_delta({}, "/tmp/t") == {}


def test_cli_rejects_unknown_command(capsys):
    from care_scale.cli import main

    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err


def test_tissue_settings_are_the_tissue_detectors_own_and_checked_at_parse_time():
    """One definition (care_scale.tissue.TissueParams): an even median kernel is a config
    error before any work, not a failures row for every slide."""
    from care_scale.embed import EmbedConfig
    from care_scale.tissue import TissueParams

    assert isinstance(EmbedConfig().tissue, TissueParams)
    assert load_config(EmbedConfig, None, ["tissue.median_kernel=7"]).tissue.median_kernel == 7
    with pytest.raises(ConfigError, match="median_kernel must be odd"):
        load_config(EmbedConfig, None, ["tissue.median_kernel=4"])


def test_embed_config_validation():
    from care_scale.embed import EmbedConfig

    with pytest.raises(ConfigError, match="target_mpp"):
        load_config(EmbedConfig, None, ["target_mpp=0"])
    with pytest.raises(ConfigError, match="needs source and warehouse"):
        EmbedConfig().require_io()


def test_network_failures_are_named_for_what_happened_not_what_botocore_says():
    """botocore's EndpointConnectionError reads "Could not connect to the endpoint URL" for
    a reset too; the message names the reset (from the error it wraps) and the URI, redacted."""
    from aiohttp import ClientOSError
    from botocore.exceptions import EndpointConnectionError

    from care_scale.storage import network_cause, network_failure

    uri = "https://host/b/k.svs?X-Amz-Signature=s3cr3t&X-Amz-Date=1"
    reset = EndpointConnectionError(endpoint_url=uri,
                                    error=ClientOSError(104, "Connection reset by peer"))
    line = network_failure(reset, uri, None, "reading")
    assert line == "connection reset while reading https://host/b/k.svs?X-Amz-Signature=***" \
        "&X-Amz-Date=1", line
    refused = EndpointConnectionError(endpoint_url=uri, error=ConnectionRefusedError(111, "x"))
    assert network_cause(refused) == "connection refused"
    try:
        try:
            raise TimeoutError("read timed out")
        except TimeoutError as exc:
            raise OSError("Generic S3 error") from exc
    except OSError as chained:
        assert network_cause(chained) == "timed out"
    assert network_cause(ValueError("NoSuchBucket")) is None
