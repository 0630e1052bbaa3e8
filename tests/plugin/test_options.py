"""Options: ini / TOML / environment / command line / marker / call, and their precedence."""

from __future__ import annotations

import json

import pytest

from pytest_gradcheck.settings import Defaults, read_defaults, resolve

ENGINE_NAMES = ("atol", "rtol", "mode", "kinks", "device", "seed")

INI_SOURCES = {
    "pytest.ini": lambda p, body: p.makeini("[pytest]\n" + body),
    "ini_options": lambda p, body: p.makepyprojecttoml("[tool.pytest.ini_options]\n" + _toml_strings(body)),
    "native toml": lambda p, body: p.makepyprojecttoml("[tool.pytest]\n" + _toml_native(body)),
}
INI_BODY = (
    "gradcheck_atol = 0.25\ngradcheck_mode = full\ngradcheck_kinks = fail\ngradcheck_server = inihost:1\n"
)


def _toml_strings(body: str) -> str:
    return "".join(f'{k} = "{v}"\n' for k, v in (line.split(" = ") for line in body.splitlines()))


def _toml_native(body: str) -> str:
    lines = (line.split(" = ") for line in body.splitlines())
    return "".join(f"{k} = {v}\n" if k.endswith("atol") else f'{k} = "{v}"\n' for k, v in lines)


@pytest.mark.parametrize("source", sorted(INI_SOURCES))
def test_ini_sources(pytester: pytest.Pytester, source: str) -> None:
    INI_SOURCES[source](pytester, INI_BODY)
    defaults = read_defaults(pytester.parseconfig(), environ={})
    assert defaults == Defaults(
        options={"atol": 0.25, "mode": "full", "kinks": "fail"}, server="inihost:1", remote="prefer"
    )


def test_command_line_beats_env_beats_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n" + INI_BODY)
    env = {"GRADCHECK_SERVER": "envhost:2"}
    assert read_defaults(pytester.parseconfig(), environ=env).server == "envhost:2"
    config = pytester.parseconfig(
        "--gradcheck-server=clihost:3", "--gradcheck-atol=0.5", "--gradcheck-mode=fast"
    )
    defaults = read_defaults(config, environ=env)
    assert defaults.server == "clihost:3"
    assert defaults.options == {"atol": 0.5, "mode": "fast", "kinks": "fail"}


def test_built_in_defaults_pass_nothing(pytester: pytest.Pytester) -> None:
    assert read_defaults(pytester.parseconfig(), environ={}) == Defaults(
        options={}, server=None, remote="never"
    )


def test_remote_policy(pytester: pytest.Pytester) -> None:
    env = {"GRADCHECK_SERVER": "h:1"}
    assert read_defaults(pytester.parseconfig(), environ=env).remote == "prefer"
    assert read_defaults(pytester.parseconfig("--gradcheck-remote=never"), environ=env).remote == "never"
    with pytest.raises(pytest.UsageError, match="needs a server"):
        read_defaults(pytester.parseconfig("--gradcheck-remote=require"), environ={})


def test_resolve_call_beats_markers_beats_defaults() -> None:
    defaults = Defaults(options={"atol": 1.0, "rtol": 1.0, "mode": "full"}, server="h:1", remote="prefer")
    closest, outer = (
        ((), {"atol": 0.1, "kinks": "fail"}),
        ((), {"atol": 0.2, "rtol": 0.2, "remote": "require"}),
    )
    call = {"atol": 0.01, "params": {"k": 2}, "input_names": ("a",)}
    resolved = resolve(defaults, [closest, outer], call, ENGINE_NAMES)
    assert resolved.options == {"atol": 0.01, "rtol": 0.2, "mode": "full", "kinks": "fail"}
    assert resolved.remote == "require"
    assert resolved.params == {"k": 2}
    assert resolved.input_names == ["a"]


def test_resolve_rejects_bad_keywords() -> None:
    with pytest.raises(TypeError, match=r"'atoll' in @pytest.mark.gradcheck"):
        resolve(Defaults(), [((), {"atoll": 1})], {}, ENGINE_NAMES)
    with pytest.raises(TypeError, match=r"'input_names' in @pytest.mark.gradcheck"):
        resolve(Defaults(), [((), {"input_names": ["x"]})], {}, ENGINE_NAMES)
    with pytest.raises(TypeError, match="keyword options only"):
        resolve(Defaults(), [((1e-3,), {})], {}, ENGINE_NAMES)
    with pytest.raises(ValueError, match="needs a server"):
        resolve(Defaults(), [], {"remote": "require"}, ENGINE_NAMES)
    with pytest.raises(ValueError, match="expected one of"):
        resolve(Defaults(server="h:1", remote="prefer"), [], {"remote": "sometimes"}, ENGINE_NAMES)


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("gradcheck_mode = fastest", "*gradcheck_mode = 'fastest': expected one of auto, full, fast*"),
        ("gradcheck_atol = -1", "*gradcheck atol must be >= 0, got -1.0*"),
        ("gradcheck_remote = require", "*--gradcheck-remote=require needs a server*"),
    ],
)
def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester, ini: str, message: str) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_help_has_its_own_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "gradient checks (assert_grads fixture):",
            "*--gradcheck-atol=FLOAT*",
            "*--gradcheck-rtol=FLOAT*",
            "*--gradcheck-mode={auto,full,fast}*",
            "*--gradcheck-kinks={allow,fail}*",
            "*--gradcheck-device={auto,cpu,cuda}*",
            "*--gradcheck-server=ADDR*",
            "*--gradcheck-remote={prefer,require,never}*",
        ]
    )
    result.stdout.fnmatch_lines(["*gradcheck_atol (float):*", "*gradcheck_server (string):*"])


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    pytester.runpytest("--markers").stdout.fnmatch_lines(["@pytest.mark.gradcheck(**options):*"])


SPY_CONFTEST = """
import json
import pytest
import gradcheck_svc as gc


@pytest.fixture(autouse=True)
def _spy(monkeypatch, request):
    real = gc.check

    def check(fn, *inputs, **options):
        with open("seen.jsonl", "a") as f:
            f.write(json.dumps({"test": request.node.name, **options}) + "\\n")
        return real(fn, *inputs, **options)

    monkeypatch.setattr(gc, "check", check)
"""

PRECEDENCE_TESTS = """
import pytest
import torch

X = torch.tensor([0.5, 1.5], dtype=torch.float64)


def test_no_marker(assert_grads):
    assert_grads(torch.sin, X)


@pytest.mark.gradcheck(atol=0.003, rtol=0.003)
def test_marker(assert_grads):
    assert_grads(torch.sin, X)


@pytest.mark.gradcheck(atol=0.003, rtol=0.003)
def test_call(assert_grads):
    assert_grads(torch.sin, X, atol=0.004)


@pytest.mark.gradcheck(atol=0.005, seed=5)
class TestClassMarker:
    @pytest.mark.gradcheck(atol=0.006)
    def test_closest_marker_wins(self, assert_grads):
        assert_grads(torch.sin, X)
"""


def _seen(pytester: pytest.Pytester) -> dict[str, dict[str, object]]:
    lines = (pytester.path / "seen.jsonl").read_text().splitlines()
    return {d.pop("test"): d for d in map(json.loads, lines)}


def test_precedence_end_to_end(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SPY_CONFTEST)
    pytester.makepyfile(test_precedence=PRECEDENCE_TESTS)
    pytester.makepyprojecttoml(
        '[tool.pytest]\ngradcheck_atol = 0.001\ngradcheck_rtol = 0.001\ngradcheck_mode = "full"\n'
    )

    pytester.runpytest().assert_outcomes(passed=4)  # ini only
    assert _seen(pytester) == {
        "test_no_marker": {"atol": 0.001, "rtol": 0.001, "mode": "full"},
        "test_marker": {"atol": 0.003, "rtol": 0.003, "mode": "full"},
        "test_call": {"atol": 0.004, "rtol": 0.003, "mode": "full"},
        "test_closest_marker_wins": {"atol": 0.006, "rtol": 0.001, "mode": "full", "seed": 5},
    }

    (pytester.path / "seen.jsonl").unlink()
    pytester.runpytest("--gradcheck-atol=0.002", "--gradcheck-kinks=fail").assert_outcomes(passed=4)
    assert _seen(pytester) == {
        "test_no_marker": {"atol": 0.002, "rtol": 0.001, "mode": "full", "kinks": "fail"},
        "test_marker": {"atol": 0.003, "rtol": 0.003, "mode": "full", "kinks": "fail"},
        "test_call": {"atol": 0.004, "rtol": 0.003, "mode": "full", "kinks": "fail"},
        "test_closest_marker_wins": {
            "atol": 0.006,
            "rtol": 0.001,
            "mode": "full",
            "kinks": "fail",
            "seed": 5,
        },
    }


def test_precedence_changes_the_verdict(pytester: pytest.Pytester) -> None:
    """A loose ini tolerance lets a wrong gradient pass; the marker's tight one catches it."""
    pytester.makeini("[pytest]\ngradcheck_atol = 100\ngradcheck_rtol = 100\n")
    pytester.makepyfile(
        """
        import pytest
        import torch

        def wrong(x):  # gradient 3x where 2x is right
            return x**2 + (0.5 * x**2 - (0.5 * x**2).detach())

        X = torch.tensor([1.0], dtype=torch.float64)

        def test_loose(assert_grads):
            assert_grads(wrong, X)

        @pytest.mark.gradcheck(atol=1e-6, rtol=1e-6)
        def test_tight(assert_grads):
            assert_grads(wrong, X)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED *::test_tight - *"])
