"""Registered calls with constants and modules, checked by a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import binding_ops
import pytest
import torch

from gradcheck_svc.binding import InitArgs, Input, Portable, bind, portable
from gradcheck_svc.client import Client, Registered
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.server import create_server
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry

X = torch.tensor([[0.3, -0.7, 1.1], [0.2, 0.5, -1.3]], dtype=torch.float64)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    registry = FunctionRegistry.default(load_entry_points=False)
    registry.add_module(binding_ops)
    server, port = create_server(Settings(host="127.0.0.1", port=0, device="cpu"), registry=registry)
    server.start()
    with Client(f"127.0.0.1:{port}") as client:
        yield client
    server.stop(grace=1)


def _send(client: Client, call: Portable) -> object:
    return client.check_points(Registered.of(call), [call.tensors])[0]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    [
        (binding_ops.Softmax.apply, [X, 1], {}),
        (binding_ops.Softmax.apply, [X, 0], {}),
        (binding_ops.power, [X, 3], {"scale": 0.5}),
        (binding_ops.Affine(3, 2).double(), [X], {}),
        (binding_ops.NoArgs(), [X], {}),
    ],
)
def test_remote_report_equals_local(client: Client, fn: object, args: list, kwargs: dict) -> None:
    call = bind(fn, args, kwargs=kwargs)
    local = call.check()
    travelling = portable(call, set(client.capabilities().registered_functions))
    assert isinstance(travelling, Portable), travelling
    remote = _send(client, travelling)
    assert remote.ok and local.ok
    assert [(p.input, p.analytic) for p in remote.pairs] == [(p.input, p.analytic) for p in local.pairs]


def test_a_planted_module_bug_is_caught_remotely(client: Client) -> None:
    module = binding_ops.Affine(3, 2).double()
    with torch.no_grad():
        module.shift.fill_(float("nan"))  # the buffer travels too: a NaN output fails the check
    remote = _send(client, portable(bind(module, [X]), {"binding_ops:Affine"}))  # type: ignore[arg-type]
    assert not remote.ok


@pytest.mark.parametrize(
    ("registered", "point", "message"),
    [
        (Registered("binding_ops:power", arguments=(Input("y"),)), {"x": X}, "names 'y', not in the point"),
        (Registered("binding_ops:power", arguments=(Input("x"), object)), {"x": X}, "cannot send a value"),
        (
            Registered("binding_ops:Affine", init=InitArgs(3, 2), state={"shift": torch.zeros(2)}),
            {"x": X},
            "missing linear.weight, linear.bias",
        ),
        (
            Registered("binding_ops:Affine", init=InitArgs(-1, 2), state={}),
            {"x": X},
            "raised ValueError: n must be positive",
        ),
    ],
)
def test_bad_calls_are_invalid_argument(
    client: Client, registered: Registered, point: dict, message: str
) -> None:
    with pytest.raises((ServiceError, TypeError), match=message) as caught:
        client.check_points(registered, [point])
    if isinstance(caught.value, ServiceError):
        assert caught.value.code == "INVALID_ARGUMENT"


def test_check_registered_sends_constants_in_order(client: Client) -> None:
    report = client.check_registered("binding_ops:Softmax", X, 0)
    local = bind(binding_ops.Softmax.apply, [X, 0]).check()
    assert report.ok and report.pairs[0].analytic == local.pairs[0].analytic
    with pytest.raises(TypeError, match=r"argument inputs\[1\] is a torch\.dtype"):
        client.check_registered("binding_ops:power", X, torch.float64)


def test_a_stuck_constructor_runs_in_a_worker_the_server_can_kill() -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", max_check_seconds=2.0, kill_after_seconds=0.5)
    server, port = create_server(settings, registry_factory=binding_ops.registry)
    assert server.service.workers is not None
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as stuck:
            call = Registered("binding_ops:Stuck", init=InitArgs(), state={})
            with pytest.raises(ServiceError, match="worker process was killed") as caught:
                stuck.check_points(call, [{"x": X}])
            assert caught.value.code == "RESOURCE_EXHAUSTED"
            assert stuck.check("x * 2", x=X).ok  # and the server carries on
    finally:
        server.stop(grace=1)


def test_a_constructor_is_held_to_the_memory_cap_in_a_thread() -> None:
    # Without worker processes the module is built in the server's thread, under the check's guard.
    settings = Settings(host="127.0.0.1", port=0, device="cpu", isolation="thread", max_check_bytes=2**24)
    server, port = create_server(settings, registry_factory=binding_ops.registry)
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            call = Registered("binding_ops:Hungry", init=InitArgs(), state={})
            with pytest.raises(ServiceError) as caught:
                client.check_points(call, [{"x": X}])
            assert caught.value.code == "RESOURCE_EXHAUSTED"
            assert caught.value.reason == "LIMIT_EXCEEDED"
            assert client.check("x * 2", x=X).ok  # and the server carries on
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_builtin_with_a_constant_positional_argument(client: Client, dim: int) -> None:
    # A built-in is sized on the meta device before it runs: its constants go along as they are.
    name = "torch.nn.functional.softmax"
    remote = client.check_points(Registered(name, arguments=(Input("x"), dim)), [{"x": X}])[0]
    local = bind(torch.nn.functional.softmax, [X, dim]).check()
    assert remote.ok and local.ok, remote.error
    assert [p.analytic for p in remote.pairs] == [p.analytic for p in local.pairs]
