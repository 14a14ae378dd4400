"""The contract for tools on the bus (proto/tools.py): a spec survives the trip through micro's
endpoint metadata unchanged, and whatever is not a valid tool is refused with a reason."""

from __future__ import annotations

import msgspec
import pytest

from proto import tools as tl
from services.tools import demo

SPECS = [
    tl.ToolSpec(name="t"),
    tl.ToolSpec(name="get_weather-2", description="The weather: «ça va», ☀",
                parameters={"type": "object", "required": ["city"],
                            "properties": {"city": {"type": "string"},
                                           "days": {"type": "integer", "minimum": 1}}},
                timeout_ms=1, cancellable=True),
    tl.ToolSpec(name="x" * 64, timeout_ms=tl.MAX_TIMEOUT_MS),
    *(tool.spec for tool in demo.TOOLS),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name[:20])
def test_a_spec_survives_the_endpoint_metadata(spec: tl.ToolSpec) -> None:
    metadata = spec.metadata()
    assert all(isinstance(v, str) for v in metadata.values())  # micro's metadata: strings
    # …and as $SRV.INFO carries it: JSON text of the endpoint.
    wire = msgspec.json.decode(msgspec.json.encode({"subject": tl.subject(spec.name),
                                                    "metadata": metadata}))
    assert tl.ToolSpec.from_endpoint(wire["subject"], wire["metadata"]) == spec


def test_absent_metadata_means_the_defaults() -> None:
    for metadata in (None, {}):
        spec = tl.ToolSpec.from_endpoint("tools.ping", metadata)
        assert spec.name == "ping" and spec.description == ""
        assert spec.timeout_ms == tl.DEFAULT_TIMEOUT_MS and not spec.cancellable
        assert spec.parameters["type"] == "object"


@pytest.mark.parametrize("name", ["", "a.b", "a b", "x" * 65, "a>", "*", "tool\n", "ä"])
def test_bad_tool_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="bad tool name"):
        tl.subject(name)
    with pytest.raises(ValueError, match="not a tool subject"):
        tl.ToolSpec.from_endpoint(f"tools.{name}", {})


@pytest.mark.parametrize("subject", ["voicebus.llm.r1.sessions", "tools", "tools.", "tool.x",
                                     "tools.a.b", "TOOLS.x", "$SRV.INFO"])
def test_subjects_that_are_not_tools_are_refused(subject: str) -> None:
    with pytest.raises(ValueError, match="not a tool subject"):
        tl.ToolSpec.from_endpoint(subject, {})


@pytest.mark.parametrize("metadata, reason", [
    ({"parameters": "{not json"}, "bad metadata"),
    ({"parameters": "[]"}, "JSON Schema object"),
    ({"parameters": '{"type": "string"}'}, "JSON Schema object"),
    ({"parameters": '{"properties": {}}'}, "JSON Schema object"),
    ({"timeout_ms": "soon"}, "bad metadata"),
    ({"timeout_ms": "1.5"}, "bad metadata"),
    ({"timeout_ms": "0"}, "timeout_ms"),
    ({"timeout_ms": "-5"}, "timeout_ms"),
    ({"timeout_ms": "600001"}, "timeout_ms"),
])
def test_bad_metadata_is_refused(metadata: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        tl.ToolSpec.from_endpoint("tools.t", metadata)


def test_cancellable_is_only_an_explicit_true() -> None:
    assert tl.ToolSpec.from_endpoint("tools.t", {"cancellable": "TRUE"}).cancellable
    for word in ("false", "", "yes", "1"):
        assert not tl.ToolSpec.from_endpoint("tools.t", {"cancellable": word}).cancellable


def test_a_request_is_json_with_its_call_id_and_its_arguments() -> None:
    request = tl.ToolRequest(session="s1", turn=3, call_id="call_7", arguments={"a": [1, "b"]})
    assert msgspec.json.decode(msgspec.json.encode(request), type=tl.ToolRequest) == request
    # Arguments default to none; a newer caller's extra fields do not break an older tool.
    bare = msgspec.json.decode(b'{"session": "s", "turn": 1, "call_id": "c", "new": 1}',
                               type=tl.ToolRequest)
    assert bare.arguments == {}
    with pytest.raises(msgspec.ValidationError, match="call_id"):
        msgspec.json.decode(b'{"session": "s", "turn": 1}', type=tl.ToolRequest)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"session": "s", "turn": 1, "call_id": "c", "arguments": [1]}',
                            type=tl.ToolRequest)
