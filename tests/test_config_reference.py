"""docs/configuration.md is generated from the settings model (worker/config_reference.py) and kept in
sync: the committed file equals a fresh rendering, every variable it names sets its setting, and every
`NOTELLM_*` variable the other docs name exists in it."""
from __future__ import annotations

import json
import re
import subprocess
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, SecretStr

from worker import config_reference as ref
from worker.config import BatchSettings, Settings

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "configuration.md"
STALE_HINT = "docs/configuration.md is stale: run scripts/config-reference (and commit the result)"

# Documents whose NOTELLM_* variables must be settings of the reference.
DOCS = ["README.md", "docs/operations.md", "docs/design-notes.md", "Dockerfile"]
# NOTELLM_* variables that are not settings, and the file that reads each (so this list cannot go stale).
NOT_SETTINGS = {
    "NOTELLM_KAFKA_HEAP": "scripts/kafka",
    "NOTELLM_KAFKA_DIR": "scripts/kafka",
    "NOTELLM_KAFKA_PORT": "scripts/kafka",
    "NOTELLM_TEST_KAFKA": "tests/conftest.py",
    "NOTELLM_TEST_MILVUS": "tests/conftest.py",
    "NOTELLM_PYTHON": "scripts/setup",
    "NOTELLM_CACHE_DIR": "notellm/base_models.py",
}
_VAR = re.compile(r"NOTELLM_[A-Z0-9_]+\*?")


@pytest.fixture(scope="module")
def rows():
    return ref.rows()


@pytest.fixture
def clean_env(monkeypatch, rows):
    for r in rows:
        monkeypatch.delenv(r.env, raising=False)
    return monkeypatch


# -- the committed file is what the model renders --------------------------------------------------
def test_committed_reference_is_fresh():
    assert REFERENCE.exists(), "docs/configuration.md is missing: run scripts/config-reference"
    assert REFERENCE.read_text(encoding="utf-8") == ref.render(), STALE_HINT


def test_rendering_is_deterministic_and_ignores_the_environment(clean_env):
    first = ref.render()
    clean_env.setenv("NOTELLM_KAFKA__GROUP_ID", "from-env")
    clean_env.setenv("NOTELLM_BATCH__LINGER_MS", "7")
    assert ref.render() == first
    assert "from-env" not in first


def _extended_settings():
    """Settings with one new top-level setting and one new setting in the batch section."""

    class Batch2(BatchSettings):
        new_knob_ms: int = Field(5, ge=1, le=99, description="a knob nobody documented")

    class Settings2(Settings):
        batch: Batch2 = Batch2()
        brand_new: Literal["a", "b"] = "a"

    return Settings2


def test_a_new_setting_makes_the_committed_file_stale():
    """What the freshness test relies on: a setting added to the model changes the rendering."""
    s2 = _extended_settings()
    new = ref.render(s2)
    assert new != REFERENCE.read_text(encoding="utf-8")
    row = next(r for r in ref.rows(s2) if r.env == "NOTELLM_BATCH__NEW_KNOB_MS")
    assert (row.type_text, row.default_text, row.constraints) == ("int", "`5`", "≥ 1, ≤ 99")
    assert "| `NOTELLM_BATCH__NEW_KNOB_MS` | `int` | `5` | ≥ 1, ≤ 99 |  | a knob nobody documented |" in new
    assert '| `NOTELLM_BRAND_NEW` | `"a" \\| "b"` | `a` |' in new


def test_every_setting_has_one_row(rows):
    leaves = list(ref._leaves(Settings))
    assert sorted(r.path for r in rows) == sorted(p for p, _ in leaves)
    assert len({r.env for r in rows}) == len(rows)
    documented = re.findall(r"^\| `(NOTELLM_[A-Z0-9_]+)` \|", REFERENCE.read_text(encoding="utf-8"), re.M)
    assert documented == [r.env for r in rows], STALE_HINT


# -- every variable of the reference sets its setting ------------------------------------------------
def _get(s, path):
    for p in path:
        s = getattr(s, p)
    return s


def _plain(v):
    return v.get_secret_value() if isinstance(v, SecretStr) else v


def _within(info, v) -> bool:
    for m in info.metadata:
        for attr, ok in (("ge", lambda b: v >= b), ("gt", lambda b: v > b), ("le", lambda b: v <= b),
                         ("lt", lambda b: v < b)):
            b = getattr(m, attr, None)
            if b is not None and not ok(b):
                return False
    return True


def _sample(path, info) -> tuple[str, Any]:
    """A valid value different from the default: (environment text, the value Settings should hold)."""
    tp, default = info.annotation, info.get_default(call_default_factory=True)
    args = [ref._unannotated(a)[0] for a in (typing.get_args(tp) if ref._union_args(tp) else (tp,))
            if a is not type(None)]
    lits = [v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
    if int in args and lits:                                  # int | "auto"
        return ("64", 64) if isinstance(default, str) else (lits[0], lits[0])
    if float in args and lits:                                # float | "auto"
        return ("2.5", 2.5) if isinstance(default, str) else (lits[0], lits[0])
    if lits:
        v = next(v for v in lits if v != default)
        return v, v
    t = args[0]
    if t is bool:
        return ref.value_text(not default), not default
    if t in (int, float) and default is None:  # unset by default: twice its lower bound
        lo = next((b for m in info.metadata for b in (getattr(m, "ge", None), getattr(m, "gt", None))
                   if b is not None), 0)
        v = t(lo * 2 or 64)
        return ref.value_text(v), v
    if t in (int, float):
        for v in (default * 2, default + 1, default / 2, default - 1):
            v = t(v)
            if v != default and _within(info, v):
                return ref.value_text(v), v
    if t is SecretStr:
        return "s3cret-sample", "s3cret-sample"
    if t is Path:
        return "/srv/sample-model", Path("/srv/sample-model")
    if typing.get_origin(t) is dict:
        return json.dumps({"fetch.min.bytes": "1"}), {"fetch.min.bytes": "1"}
    if t is str:
        return "sample-value", "sample-value"
    raise AssertionError(f"no sample value for {'.'.join(path)}: {tp!r} (teach _sample this type)")


# settings whose sample value is valid only with another one set (a model validator checks the pair)
_HTTPS = {"NOTELLM_MILVUS__URI": "https://milvus.example:19530"}
_COMPANIONS = {("milvus", "write_process"): {"NOTELLM_MILVUS__URI": "http://milvus.example:19530"},
               ("milvus", "tls_ca_path"): _HTTPS, ("milvus", "tls_server_name"): _HTTPS,
               ("milvus", "tls_client_cert_path"): {**_HTTPS, "NOTELLM_MILVUS__TLS_CA_PATH": "/ca.pem",
                                                    "NOTELLM_MILVUS__TLS_CLIENT_KEY_PATH": "/c.key"},
               ("milvus", "tls_client_key_path"): {**_HTTPS, "NOTELLM_MILVUS__TLS_CA_PATH": "/ca.pem",
                                                   "NOTELLM_MILVUS__TLS_CLIENT_CERT_PATH": "/c.pem"}}


@pytest.mark.parametrize("path", [p for p, _ in ref._leaves(Settings)], ids=".".join)
def test_the_variable_sets_the_setting(path, clean_env, rows):
    row = next(r for r in rows if r.path == path)
    info = dict(ref._leaves(Settings))[path]
    text, want = _sample(path, info)
    for k, v in _COMPANIONS.get(path, {}).items():
        clean_env.setenv(k, v)
    clean_env.setenv(row.env, text)
    got = _get(Settings(), path)
    assert _plain(got) == want, f"{row.env}={text!r} gave {got!r}: the reference names the wrong variable"


@pytest.mark.parametrize("path", [p for p, _ in ref._leaves(Settings)], ids=".".join)
def test_the_documented_default_is_a_valid_value(path, clean_env, rows):
    row = next(r for r in rows if r.path == path)
    info = dict(ref._leaves(Settings))[path]
    default = info.get_default(call_default_factory=True)
    if default is None or path in ref._DYNAMIC_DEFAULTS:
        assert row.default_text in ("unset", ref._DYNAMIC_DEFAULTS.get(path))
        return
    text = ref.value_text(default)
    assert row.default_text == f"`{text}`"
    clean_env.setenv(row.env, text)
    assert _get(Settings(), path) == default


def test_misspellings_behave_as_the_reference_says(clean_env):
    text = REFERENCE.read_text(encoding="utf-8")
    assert "`NOTELLM_KAFKA__NO_SUCH_SETTING`) stops the worker" in text
    assert "`NOTELLM_KAFKA_BOOTSTRAP_SERVERS` with one underscore, is silently ignored" in text
    clean_env.setenv("NOTELLM_KAFKA_BOOTSTRAP_SERVERS", "typo:9092")
    assert Settings().kafka.bootstrap_servers == "127.0.0.1:9092"
    clean_env.setenv("NOTELLM_KAFKA__NO_SUCH_SETTING", "1")
    with pytest.raises(ValueError, match="no_such_setting"):
        Settings()


# -- types, defaults, constraints -------------------------------------------------------------------
def test_readable_types_defaults_and_constraints(rows):
    by_env = {r.env: r for r in rows}
    assert by_env["NOTELLM_BATCH__MAX_BATCH_NOTES"].type_text == 'int | "auto"'
    assert by_env["NOTELLM_KAFKA__AUTO_OFFSET_RESET"].type_text == '"earliest" | "latest"'
    pw = by_env["NOTELLM_KAFKA__SASL_PASSWORD"]
    assert (pw.type_text, pw.default_text) == ("secret", "unset")
    assert by_env["NOTELLM_MODEL__DIR"].type_text == "path"
    assert by_env["NOTELLM_KAFKA__EXTRA"].default_text == "`{}`"
    assert by_env["NOTELLM_MILVUS__VISIBILITY_PROBE"].default_text == "`true`"
    assert by_env["NOTELLM_MILVUS__TIMEOUT_S"].default_text == "`30`"
    assert by_env["NOTELLM_KAFKA__DLQ_MAX_VALUE_BYTES"].constraints == "≥ 1024, ≤ 655360"
    assert by_env["NOTELLM_HTTP__PORT"].description == "0 = no HTTP server"
    assert ref.type_text(SecretStr | None) == "secret" and ref.type_text(dict[str, str]) == "JSON object (str → str)"

    class Local(BaseModel):
        n: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
        t: float = Field(3.0, gt=0, le=9)

    assert ref.type_text(Local.model_fields["n"].annotation) == 'int | "auto"'
    assert ref.constraints_text(Local.model_fields["n"]) == "int ≥ 1"
    assert ref.constraints_text(Local.model_fields["t"]) == "> 0, ≤ 9"
    assert ref.default_text(("t",), Local.model_fields["t"]) == "`3`"

    class WithSecretDefault(BaseModel):
        key: SecretStr = SecretStr("hunter2")

    shown = ref.default_text(("key",), WithSecretDefault.model_fields["key"])
    assert "hunter2" not in shown and shown == "(secret)"


def test_section_docstrings_introduce_their_sections():
    text = REFERENCE.read_text(encoding="utf-8")
    lifecycle = text.split("## lifecycle", 1)[1].split("## ", 1)[0]
    assert "waits at most `drain_s` for in-flight batches" in lifecycle


# -- CLI flags ----------------------------------------------------------------------------------------
def test_cli_flags_are_derived_from_worker_cli(rows):
    flags = ref.cli_flags()
    assert flags[("kafka", "bootstrap_servers")] == ("--bootstrap",)
    assert flags[("kafka", "group_id")] == ("--group",)
    assert flags[("model", "dir")] == ("--model", "--new-model (backfill)")
    assert flags[("batch", "max_batch_notes")] == ("--max-batch-notes",)
    assert flags[("http", "port")] == ("--http-port",)
    assert ("kafka", "sasl_password") not in flags


def test_every_documented_flag_really_sets_its_setting(clean_env):
    """Independently of the probe: parse `notellm worker <action> FLAG VALUE` with the real parser."""
    import argparse

    from worker import cli

    parser = argparse.ArgumentParser(prog="notellm worker")
    cli.configure(parser)
    required = {"replay": ["--from-offsets", "0:0"]}
    for path, flags in ref.cli_flags().items():
        info = dict(ref._leaves(Settings))[path]
        text, want = _sample(path, info)
        for f in flags:
            flag, _, where = f.partition(" ")
            action = where.strip("()").split(", ")[0] if where else "run"
            args = parser.parse_args([action, *required.get(action, []), flag, text])
            assert _plain(_get(cli.settings_from(args), path)) == want, f"{flag} {text} did not set {path}"


def test_a_configuration_flag_that_sets_nothing_is_an_error(monkeypatch):
    from worker import cli

    real = cli.settings_from

    def forgets_linger(args):
        ns = vars(args).copy()
        ns.pop("linger_ms", None)
        return real(type(args)(**ns))

    monkeypatch.setattr(cli, "settings_from", forgets_linger)
    with pytest.raises(RuntimeError, match="--linger-ms"):
        ref.cli_flags()


# -- other documents name only real settings ---------------------------------------------------------
def _known(name: str, envs: set[str]) -> bool:
    """A setting's variable, a documented non-setting variable, or a prefix of settings written as
    `NOTELLM_RETRY__*` or `NOTELLM_KAFKA__...` (the match then ends in `*` or `__`)."""
    if name.endswith(("*", "__")):
        return any(e.startswith(name.rstrip("*")) for e in envs)
    return name in envs or name in NOT_SETTINGS


def _names_in(rel: str) -> set[str]:
    return set(_VAR.findall((REPO / rel).read_text(encoding="utf-8")))


def test_docs_name_only_real_settings(rows):
    assert (REPO / "docs" / "operations.md").exists()
    envs = {r.env for r in rows}
    files = DOCS  # the manifests' variables are checked by tests/test_manifests.py
    unknown = []
    for rel in files:
        if not (REPO / rel).exists():
            continue
        unknown += [f"{rel}: {name}" for name in sorted(_names_in(rel)) if not _known(name, envs)]
    assert not unknown, ("variables that are not settings (see docs/configuration.md; a new non-setting "
                         "variable goes into NOT_SETTINGS here): " + ", ".join(unknown))


def test_the_non_setting_variables_are_really_read_where_listed():
    for name, rel in NOT_SETTINGS.items():
        assert name in (REPO / rel).read_text(encoding="utf-8"), f"{name} is no longer read by {rel}"
        assert name not in {r.env for r in ref.rows()}


def test_the_doc_check_catches_a_typo(tmp_path, rows):
    """The same check as above on a made-up document: one-underscore and unknown names are caught."""
    doc = tmp_path / "doc.md"
    doc.write_text("set NOTELLM_KAFKA_BOOTSTRAP_SERVERS and NOTELLM_BATCH__LINGER and NOTELLM_RETRY__* and "
                   "NOTELLM_NOPE__* and `NOTELLM_KAFKA__...` and `NOTELLM_KAFK__...` and NOTELLM_TEST_KAFKA",
                   encoding="utf-8")
    envs = {r.env for r in rows}
    names = set(_VAR.findall(doc.read_text(encoding="utf-8")))
    bad = {n for n in names if not _known(n, envs)}
    assert bad == {"NOTELLM_KAFKA_BOOTSTRAP_SERVERS", "NOTELLM_BATCH__LINGER", "NOTELLM_NOPE__*", "NOTELLM_KAFK__"}


# -- the script ------------------------------------------------------------------------------------------
def test_script_writes_and_checks(tmp_path):
    script = REPO / "scripts" / "config-reference"
    out = tmp_path / "configuration.md"
    out.write_text("# stale\n", encoding="utf-8")
    p = subprocess.run([script, "--check", "--out", out], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "is stale: run scripts/config-reference" in p.stderr and "+# Configuration reference" in p.stdout
    assert out.read_text(encoding="utf-8") == "# stale\n"
    p = subprocess.run([script, "--out", out], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.read_text(encoding="utf-8") == ref.render()
    p = subprocess.run([script, "--check", "--out", out], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([script, "--check"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr  # the committed docs/configuration.md, from any directory


# -- docs/operations.md: metric names and alert expressions -----------------------------------------------
OPERATIONS = REPO / "docs" / "operations.md"
RULES = REPO / "deploy" / "components" / "monitoring" / "prometheusrule.yaml"


def _exposed_metric_names() -> set[str]:
    """Series names as prometheus_client exposes them (counters `_total`, histograms `_bucket/_count/_sum`),
    plus histogram family names (prose names a histogram by its family)."""
    from worker.metrics import Metrics

    names = set()
    for fam in Metrics().registry.collect():
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names |= {fam.name, *(fam.name + s for s in ("_bucket", "_count", "_sum"))}
        else:
            names.add(fam.name)
    return names


def test_operations_names_only_exposed_metrics():
    exposed = _exposed_metric_names()
    assert "notellm_consumed_total" in exposed and "notellm_consumed" not in exposed
    named = set(re.findall(r"\bnotellm_[a-z_]+", OPERATIONS.read_text(encoding="utf-8")))
    unknown = sorted(n for n in named if n not in exposed)
    assert not unknown, f"docs/operations.md names metrics the worker does not expose: {unknown}"


def _ws(text: str) -> str:
    return " ".join(text.split())


def test_operations_quotes_every_alert_of_the_prometheusrule():
    assert RULES.exists(), f"{RULES.relative_to(REPO)} is missing"
    import yaml

    doc = _ws(OPERATIONS.read_text(encoding="utf-8"))
    rules = [r for g in yaml.safe_load(RULES.read_text(encoding="utf-8"))["spec"]["groups"] for r in g["rules"]
             if "alert" in r]
    assert rules
    stale = []
    for r in rules:
        head = f"`{r['alert']}` ({r['labels']['severity']}"
        if head not in doc or _ws(r["expr"]) not in doc:
            stale.append(r["alert"])
    assert not stale, f"docs/operations.md does not quote these alerts of {RULES.relative_to(REPO)} as they are: {stale}"
