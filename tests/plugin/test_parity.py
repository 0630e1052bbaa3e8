"""One test file, run in-process and against a real server: the same verdicts, the same names.

The server (``server_address`` in conftest) registers ``plugin_sample_ops``; with
``--gradcheck-remote=require`` every check below must run there, or the run fails.
"""

from __future__ import annotations

import pytest

PARITY_SUITE = """
import pytest
import torch

from plugin_sample_ops import Bilinear, LogSumExp, ScaledSoftmax, leaky

torch.manual_seed(0)
X = torch.randn(3, 4, dtype=torch.float64)


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("keepdim", [False, True])
def test_function_with_dim(assert_grads, dim, keepdim):
    report = assert_grads(LogSumExp.apply, X, dim, keepdim)
    assert [p.input for p in report.pairs] == ["inputs[0]"]


def test_tuple_and_float_positional(assert_grads):
    assert_grads(ScaledSoftmax.apply, X, (1,), 0.5, input_names=["x", "dims", "scale"])


def test_constant_keywords(assert_grads):
    assert_grads(leaky, X, fn_kwargs={"alpha": 0.2, "mode": "double"})


def test_registered_module(assert_grads):
    module = Bilinear(3, out=2).double()
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    report = assert_grads(module, x, y, 2, input_names=["x", "y", "power"])
    assert sorted(p.input for p in report.pairs) == ["bias", "weight", "x", "y"]


def test_module_with_a_frozen_parameter(assert_grads):
    module = Bilinear(2, out=1, bias=False).double()
    module.weight.requires_grad_(False)
    report = assert_grads(module, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert sorted(p.input for p in report.pairs) == ["inputs[0]", "inputs[1]"]


def test_registered_name_with_params(assert_grads):
    report = assert_grads("plugin_sample_ops:leaky", X, params={"alpha": 0.3})
    assert report.function == "plugin_sample_ops:leaky"


def test_registered_name_with_a_positional_dim(assert_grads):
    assert_grads("plugin_sample_ops:LogSumExp", X, 1, False)


def test_planted_bug_fails_the_same_way(assert_grads):
    from gradcheck_svc import GradientMismatch
    from plugin_sample_ops import BadCube

    with pytest.raises(GradientMismatch, match=r"output\\[2\\] / inputs\\[0\\]\\[2\\] +9 +27"):
        assert_grads(BadCube.apply, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
"""

N_PARITY = 13


def test_the_suite_is_green_locally(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_parity_suite=PARITY_SUITE)
    result = pytester.runpytest()
    result.assert_outcomes(passed=N_PARITY)
    result.stdout.fnmatch_lines(
        [f"{N_PARITY} checks run, 1 failed, 0 kinks seen", f"where: {N_PARITY} local"]
    )


def test_the_same_suite_is_green_on_the_server(pytester: pytest.Pytester, server_address: str) -> None:
    pytester.makepyfile(test_parity_suite=PARITY_SUITE)
    result = pytester.runpytest(f"--gradcheck-server={server_address}", "--gradcheck-remote=require")
    result.assert_outcomes(passed=N_PARITY)
    result.stdout.fnmatch_lines(
        [f"{N_PARITY} checks run, 1 failed, 0 kinks seen", f"where: {N_PARITY} on {server_address}"]
    )
    assert "ran locally" not in result.stdout.str()


def test_what_cannot_travel_is_named_in_one_line(pytester: pytest.Pytester, server_address: str) -> None:
    pytester.makepyfile(
        """
        import torch
        from plugin_sample_ops import Unregistered, leaky

        X = torch.randn(3, dtype=torch.float64)

        def test_object_argument(assert_grads):
            assert_grads(leaky, X, fn_kwargs={"alpha": object()})

        def test_tensor_keyword(assert_grads):
            assert_grads(leaky, X, fn_kwargs={"alpha": X})

        def test_module_without_init_args(assert_grads):
            assert_grads(Unregistered(), X)

        def double(x):
            return 2 * x

        def test_unregistered_function(assert_grads):
            assert_grads(double, X)
        """
    )
    result = pytester.runpytest(f"--gradcheck-server={server_address}", "--gradcheck-remote=require")
    result.assert_outcomes(failed=4)
    prefix = f"E       Failed: gradcheck: * cannot run on server {server_address}"
    result.stdout.fnmatch_lines(
        [f"{prefix} (keyword argument 'alpha' is a builtins.object, which cannot travel) *"],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(
        [f"{prefix} (keyword argument 'alpha' is a tensor: pass tensors positionally to check remotely) *"]
    )
    result.stdout.fnmatch_lines(
        [
            f"{prefix} (module Unregistered does not declare its constructor arguments "
            "(gradcheck_init_args())) *"
        ]
    )
    result.stdout.fnmatch_lines([f"{prefix} (double is not registered on the server) *"])


def test_prefer_runs_what_cannot_travel_locally_and_says_why(
    pytester: pytest.Pytester, server_address: str
) -> None:
    pytester.makepyfile(
        """
        import torch
        from plugin_sample_ops import cast_sine

        def test_lambda(assert_grads):
            assert_grads(lambda x: x.sin(), torch.ones(2, dtype=torch.float64))

        def test_dtype_argument(assert_grads):
            assert_grads(cast_sine, torch.ones(2), torch.float64)
        """
    )
    result = pytester.runpytest(f"--gradcheck-server={server_address}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "ran locally, the server cannot run them: 2 checks",
            "  *::test_dtype_argument (cast_sine: argument inputs[[]1[]] is a torch.dtype, "
            "which cannot travel)",
            "  *::test_lambda (*<lambda>: lambda)",
        ]
    )


def test_registered_names_resolve_without_a_server(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import torch
        from gradcheck_svc import UnknownFunctionError

        X = torch.randn(4, dtype=torch.float64)

        def test_module_function(assert_grads):
            report = assert_grads("plugin_sample_ops:scaled_sine", X)
            assert report.function == "plugin_sample_ops:scaled_sine"

        def test_autograd_function_by_class_name(assert_grads):
            assert_grads("plugin_sample_ops:LogSumExp", X.reshape(2, 2), 0, False)

        def test_module_class_by_name_keeps_its_own_parameters(assert_grads):
            report = assert_grads("plugin_sample_ops:Unregistered", X)
            assert report.function == "plugin_sample_ops:Unregistered"

        def test_no_attribute_walks(assert_grads):
            with pytest.raises(UnknownFunctionError, match="no registered function named"):
                assert_grads("plugin_sample_ops:BadCube.apply", X)

        def test_only_what_the_module_exposes(assert_grads):
            with pytest.raises(UnknownFunctionError, match="plugin_sample_ops does not expose 'torch'"):
                assert_grads("plugin_sample_ops:torch", X)

        def test_missing_module(assert_grads):
            with pytest.raises(UnknownFunctionError, match="cannot import no_such_module"):
                assert_grads("no_such_module:f", X)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=6)
