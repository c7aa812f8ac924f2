"""Domain errors -> rich google.rpc status (no server; the wire round trip is in
test_common_grpc.py)."""

from __future__ import annotations

import grpc
import pytest
from crm_common.errors import (
    ERROR_DOMAIN,
    Aborted,
    AlreadyExists,
    CrmError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Validator,
    to_rpc_status,
)
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st

DETAILS_KEY = "grpc-status-details-bin"


def unpack(status: grpc.Status) -> status_pb2.Status:
    (key, value), *rest = status.trailing_metadata
    assert key == DETAILS_KEY
    assert not rest
    return status_pb2.Status.FromString(value)


def details_of(status: status_pb2.Status, message_type: type) -> list:
    found = []
    for detail in status.details:
        if detail.Is(message_type.DESCRIPTOR):
            message = message_type()
            detail.Unpack(message)
            found.append(message)
    return found


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument.single("a", "b"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (Aborted("x"), grpc.StatusCode.ABORTED),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_each_error_maps_to_its_code(error: CrmError, code: grpc.StatusCode) -> None:
    status = to_rpc_status(error)
    assert status.code == code
    assert status.details == error.message
    assert unpack(status).code == code.value[0]


def test_invalid_argument_packs_every_field_violation() -> None:
    error = InvalidArgument(
        [
            FieldViolation("agent.capacity", "must be 1..50"),
            FieldViolation("intent_car_ids[3]", "must be > 0"),
        ]
    )
    status = to_rpc_status(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "agent.capacity: must be 1..50" in status.details
    (bad_request,) = details_of(unpack(status), error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("agent.capacity", "must be 1..50"),
        ("intent_car_ids[3]", "must be > 0"),
    ]


def test_invalid_argument_needs_a_violation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        InvalidArgument([])


def test_long_violation_lists_are_summarised() -> None:
    error = InvalidArgument([FieldViolation(f"f{i}", "bad") for i in range(5)])
    assert error.message.endswith("and 2 more")
    assert len(error.violations) == 5


def test_reason_is_sent_as_error_info() -> None:
    status = unpack(to_rpc_status(NotFound("task 7 not found", reason="TASK_NOT_FOUND")))
    (info,) = details_of(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("TASK_NOT_FOUND", ERROR_DOMAIN)
    assert not details_of(status, error_details_pb2.BadRequest)


def test_failed_precondition_packs_violations_and_reason() -> None:
    error = FailedPrecondition(
        "task 9 is not offered to agent 3",
        violations=[PreconditionViolation("TASK_STATUS", "task/9", "task is IN_PROGRESS")],
        reason="TASK_NOT_OFFERED",
        metadata={"task_id": "9"},
    )
    status = unpack(to_rpc_status(error))
    (failure,) = details_of(status, error_details_pb2.PreconditionFailure)
    assert failure.violations[0].subject == "task/9"
    (info,) = details_of(status, error_details_pb2.ErrorInfo)
    assert info.metadata["task_id"] == "9"


def test_validator_reports_every_violation_at_once() -> None:
    v = Validator()
    assert v.require(True, "agent.id", "must be > 0")
    assert not v.require(False, "agent.capacity", "must be 1..50")
    cars = v.at("intent_car_ids")
    cars.require(False, "[3]", "must be > 0")
    v.at("agent").at("cities").add("[0]", "unknown city")
    with pytest.raises(InvalidArgument) as caught:
        v.check()
    assert [(x.field, x.description) for x in caught.value.violations] == [
        ("agent.capacity", "must be 1..50"),
        ("intent_car_ids[3]", "must be > 0"),
        ("agent.cities[0]", "unknown city"),
    ]


def test_validator_passes_when_clean_and_works_as_context_manager() -> None:
    Validator().check()
    with pytest.raises(InvalidArgument), Validator() as v:
        v.require(False, "name", "must not be empty")
    with Validator() as v:
        v.require(True, "name", "must not be empty")


@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=40), st.text(max_size=200)), min_size=1, max_size=20
    )
)
def test_any_violations_survive_status_serialisation(pairs: list[tuple[str, str]]) -> None:
    status = unpack(to_rpc_status(InvalidArgument([FieldViolation(f, d) for f, d in pairs])))
    (bad_request,) = details_of(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == pairs
