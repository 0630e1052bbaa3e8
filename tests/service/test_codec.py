"""Tensors, values, options and reports through protobuf and back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradcheck_svc import codec
from gradcheck_svc.errors import InvalidRequestError, LimitExceededError
from gradcheck_svc.options import CheckOptions
from gradcheck_svc.report import Check, ElementError, PairReport, Report, Status
from gradcheck_svc.specs import SampledInput, SamplingSpec, sample_points
from gradcheck_svc.v1 import gradcheck_pb2 as pb

LIMIT = 1_000_000


@pytest.mark.parametrize("dtype", list(codec.DTYPES.values()), ids=str)
def test_tensor_round_trip_every_dtype(dtype: torch.dtype) -> None:
    source = (torch.arange(12, dtype=torch.float64).reshape(3, 4) - 5).to(dtype)
    back = codec.decode_tensor(codec.encode_tensor(source), max_elements=LIMIT)
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back, source)


def test_tensor_layout_is_c_contiguous_little_endian() -> None:
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float32).t()  # non-contiguous view
    msg = codec.encode_tensor(t)
    assert msg.dtype == pb.DTYPE_FLOAT32 and list(msg.shape) == [2, 2]
    assert msg.data == torch.tensor([1.0, 3.0, 2.0, 4.0]).numpy().astype("<f4").tobytes()


@pytest.mark.parametrize(
    "view",
    [
        torch.arange(6.0).reshape(2, 3)[:, ::2],  # strided
        torch._neg_view(torch.arange(3.0)),  # lazily negated
        torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),  # lazily conjugated
    ],
    ids=["strided", "negated", "conjugated"],
)
def test_views_travel_as_their_values(view: torch.Tensor) -> None:
    back = codec.decode_tensor(codec.encode_tensor(view), max_elements=LIMIT)
    assert torch.equal(back, view.resolve_conj().resolve_neg())


def test_scalar_empty_and_requires_grad() -> None:
    scalar = codec.decode_tensor(
        codec.encode_tensor(torch.tensor(9.0, requires_grad=True)), max_elements=LIMIT
    )
    assert scalar.shape == () and scalar.item() == 9.0 and scalar.requires_grad
    empty = codec.decode_tensor(codec.encode_tensor(torch.zeros(0, 3)), max_elements=LIMIT)
    assert empty.shape == (0, 3)


def test_decoded_tensor_owns_writable_memory() -> None:
    msg = codec.encode_tensor(torch.ones(4))
    t = codec.decode_tensor(msg, max_elements=LIMIT)
    t.add_(1)  # would fail or corrupt the message if it aliased the immutable bytes
    assert msg.data == torch.ones(4).numpy().tobytes()


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "t.dtype"),
        (pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "t.dtype"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, -1], data=b""), "t.shape[1]"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"\0" * 8), "t.data"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[], data=b"\0" * 4), "t.data"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 40, data=b"\0" * 4), "t.shape"),
    ],
)
def test_invalid_tensors_name_the_field(msg: pb.Tensor, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        codec.decode_tensor(msg, max_elements=LIMIT, field="t")
    assert info.value.field == field


@pytest.mark.parametrize(
    "shape",
    [[10**6, 10**6], [2**62, 2**62, 2**62], [2**63 - 1, 2**63 - 1], [LIMIT + 1]],
    ids=["1e12", "overflows-int64", "max-int64", "limit+1"],
)
def test_oversized_shapes_are_refused_before_allocation(shape: list[int]) -> None:
    msg = pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=shape, data=b"")
    with pytest.raises(LimitExceededError, match="max_tensor_elements"):
        codec.decode_tensor(msg, max_elements=LIMIT)


def test_zero_dim_does_not_excuse_huge_dims() -> None:
    assert codec.validate_shape([0, LIMIT], LIMIT) == 0
    with pytest.raises(LimitExceededError, match=r"shape\[1\]: dimension"):
        codec.validate_shape([0, 2**62], LIMIT)  # torch cannot even lay out its strides


def test_values() -> None:
    for value in [None, True, False, 0, -7, 2**62, 1.5, math.inf, "tanh", [1, 2, 3], [1.0, "a", None]]:
        assert codec.decode_value(codec.encode_value(value)) == value
    with pytest.raises(TypeError):
        codec.encode_value({"a": 1})
    deep = codec.encode_value([[[[[1]]]]])
    with pytest.raises(InvalidRequestError):
        codec.decode_value(deep)


def test_options_round_trip_only_what_was_set() -> None:
    options = {"atol": 1e-6, "mode": "full", "kinks": "fail", "seed": 3, "order": 2, "forward_ad": False}
    msg = codec.encode_options(options)
    assert codec.decode_options(msg) == options
    assert codec.decode_options(pb.Options()) == {}
    assert codec.decode_options(codec.encode_options(CheckOptions(device="cuda", upcast=True))) == {
        "device": "cuda",
        "upcast": True,
    }
    with pytest.raises(ValueError, match="unknown check option 'atoll'"):
        codec.encode_options({"atoll": 1})


def test_options_message_mirrors_check_options() -> None:
    """Every engine option has a field, so nothing a user can set in-process is lost remotely."""
    fields = {f.name for f in pb.Options.DESCRIPTOR.fields}
    assert set(CheckOptions.model_fields) <= fields


def full_report() -> Report:
    """A Report with every field set to a non-default value."""
    element = ElementError(
        output_index=[1, 2],
        input_index=[0],
        output_part="re",
        input_part="im",
        analytic=1.5,
        numeric=-2.25,
        error_bar=1e-9,
        tolerance=3e-7,
        kink=True,
    )
    pair = PairReport(
        output="output[1]",
        input="x",
        check=Check.SECOND_ORDER,
        status=Status.NONFINITE,
        mode="fast",
        output_shape=[2, 3],
        input_shape=[4],
        dtype="complex64",
        max_abs_error=math.inf,
        max_rel_error=0.5,
        max_error_ratio=7.0,
        elements_checked=24,
        elements_failed=3,
        kinks=1,
        worst=[element, element],
        analytic=[1.0, math.nan],
        numeric=[],
        error_bars=[0.1, 0.2],
        nondeterminism=0.0,
        taylor_rates=[2.0, 1.99],
        error_map=[],
        message="something odd",
    )
    return Report(
        ok=False,
        pairs=[
            pair,
            PairReport(
                output="o",
                input="w",
                status=Status.PASS,
                mode="full",
                output_shape=[],
                input_shape=[],
                dtype="float32",
            ),
        ],
        dtype="complex64",
        device="cuda:0",
        mode="fast",
        scheme="taylor",
        order=2,
        function="sin(x)",
        point=3,
        error="fn raised",
        notes=["a", "b"],
        options={"atol": 1e-3, "mode": "fast", "seed": 4, "forward_ad": True, "chunk_size": None},
        timings={"total_s": 0.25, "numeric_s": 0.125},
        served_by="replica-a",
    )


def _same(a: Report, b: Report) -> bool:
    # NaN != NaN, so compare JSON forms (NaN serialises alike); map order is not part of the contract.
    return json.dumps(a.model_dump(mode="json"), sort_keys=True) == json.dumps(
        b.model_dump(mode="json"), sort_keys=True
    )


def test_report_round_trip_is_exact() -> None:
    report = full_report()
    back = codec.decode_report(pb.Report.FromString(codec.encode_report(report).SerializeToString()))
    assert _same(back, report)
    assert back.pairs[1].analytic is None and back.pairs[0].numeric == [] and back.pairs[0].error_map == []


def test_report_enums_round_trip() -> None:
    """Strings of the model travel as the request's enums: mixed dtypes, Taylor mode, exact device."""
    taylor = PairReport(
        output="output",
        input="x",
        check=Check.TAYLOR,
        status=Status.PASS,
        mode="taylor",
        output_shape=[],
        input_shape=[],
        dtype="bfloat16",
    )
    report = Report(
        ok=True,
        pairs=[taylor],
        dtype="complex128,float32",
        device="cuda:1",
        mode="taylor",
        scheme="taylor",
        timings={"total_s": 1.5},
    )
    msg = codec.encode_report(report)
    assert list(msg.dtypes) == [pb.DTYPE_FLOAT32, pb.DTYPE_COMPLEX128]
    assert msg.device == pb.DEVICE_CUDA and msg.device_name == "cuda:1"
    assert msg.mode == pb.MODE_UNSPECIFIED and msg.scheme == pb.SCHEME_TAYLOR
    assert msg.pairs[0].dtype == pb.DTYPE_BFLOAT16 and msg.timings["total"].seconds == 1
    assert codec.decode_report(pb.Report.FromString(msg.SerializeToString())) == report


def test_report_defaults_round_trip() -> None:
    report = Report(ok=True)
    assert codec.decode_report(codec.encode_report(report)) == report


# Model field -> wire field where the proto's style names it otherwise (counts end in _count,
# several dtypes are a repeated enum); device_name travels beside the Device enum.
WIRE_NAMES = {"dtype": "dtypes", "elements_checked": "checked_count", "elements_failed": "failed_count"}
WIRE_NAMES |= {"kinks": "kink_count"}


def test_every_report_field_crosses_the_wire() -> None:
    """Fails when report.py grows a field the protocol does not carry yet."""
    for model, message, extra in [
        (Report, pb.Report, {"device_name"}),
        (PairReport, pb.PairReport, set()),
        (ElementError, pb.ElementError, set()),
    ]:
        names = {WIRE_NAMES.get(n, n) for n in model.model_fields}
        if model is not Report:
            names = {n.replace("dtypes", "dtype") for n in names}
        assert names | extra == {f.name for f in message.DESCRIPTOR.fields}, model.__name__
    for member in Status:
        assert pb.Status.Value("STATUS_" + member.name)
    for member in Check:
        assert pb.CheckKind.Value("CHECK_KIND_" + member.name)


def test_sampling_round_trip_and_reproducibility() -> None:
    spec = SamplingSpec(
        inputs=(
            SampledInput("u", (3,), torch.float32, "uniform", low=-1.0, high=2.0),
            SampledInput("v", (), torch.complex128, std=0.5, requires_grad=True),
        ),
        count=3,
        seed=7,
    )
    back = codec.decode_sampling(codec.encode_sampling(spec), max_elements=LIMIT)
    assert back == spec
    first, again = sample_points(spec), sample_points(back)
    assert len(first) == 3 and all(
        torch.equal(a[n], b[n]) for a, b in zip(first, again, strict=True) for n in a
    )
    assert first[0]["u"].dtype == torch.float32 and first[0]["v"].requires_grad
    assert not torch.equal(first[0]["u"], first[1]["u"])
    assert bool(((first[0]["u"] >= -1) & (first[0]["u"] < 2)).all())


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (pb.SamplingSpec(), "sampling.inputs"),
        (
            pb.SamplingSpec(inputs=[pb.SampledInput(name="x", dtype=pb.DTYPE_INT64)]),
            "sampling.inputs[0].dtype",
        ),
        (
            pb.SamplingSpec(
                inputs=[
                    pb.SampledInput(name="x", distribution=pb.Distribution(uniform=pb.Uniform(low=1, high=1)))
                ]
            ),
            "sampling.inputs[0].distribution.uniform",
        ),
        (
            pb.SamplingSpec(
                inputs=[
                    pb.SampledInput(name="x", distribution=pb.Distribution(normal=pb.Normal(std=math.nan)))
                ]
            ),
            "sampling.inputs[0].distribution.normal",
        ),
    ],
)
def test_invalid_sampling(spec: pb.SamplingSpec, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        codec.decode_sampling(spec, max_elements=LIMIT)
    assert info.value.field == field


def test_dtype_names() -> None:
    assert codec.dtype_from_name("float32") is torch.float32
    assert codec.dtype_from_name("torch.complex64") is torch.complex64
    with pytest.raises(ValueError, match="unknown dtype"):
        codec.dtype_from_name("float128")
