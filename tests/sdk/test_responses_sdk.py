"""The real `openai` SDK's Responses API (`client.responses`) against cascade: answers,
streams, tools, kept state across a fallback to another provider, and every object and
event checked against OpenAI's published schemas."""

import json

import openai
import pytest

from test_openai_sdk import http

TOOLS = [{"type": "function", "name": "get_weather", "description": "Get the weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def dump(obj):
    return json.loads(obj.model_dump_json(exclude_unset=True))


EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}


def raw_events(gw, body):
    """The wire events of a streamed Responses request: (event line, data), in order."""
    status, text = http("POST", gw.base + "/v1/responses", dict(body, stream=True))
    assert status == 200, text
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "):
            out.append((lines[0][7:], json.loads(lines[1][6:])))
        else:
            assert block.strip() == "", block
    return out


def check_events(schemas, events):
    for name, data in events:
        assert data["type"] == name
        schemas(EVENT_SCHEMAS[name], data)


def raw_json(raw):
    return json.loads(raw.http_response.text)


def test_answer_falls_back_and_matches_the_schema(gw, client, schemas):
    gw.knobs("p", "status=500")
    raw = client.responses.with_raw_response.create(model="main", input="hello", instructions="be brief")
    r = raw.parse()
    assert r.output_text == "Hello from s! This is a mock answer."
    assert r.model == "s" and r.status == "completed" and r.id.startswith("resp_")
    assert raw.headers["x-cascade-model"] == "secondary"
    assert raw.headers["x-cascade-fallbacks"] == "1"
    assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    body = raw_json(raw)
    schemas("Response", body)
    assert body["instructions"] == "be brief"
    # The system instruction went upstream as the first chat message.
    sent = gw.bodies("s")[-1]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}


def test_stream_events_in_order_and_schema(gw, client, schemas):
    gw.knobs("p", "status=503")
    stream = client.responses.create(model="main", input="hello", stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello from s! This is a mock answer."
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens > 0
    schemas("Response", dump(final))
    gw.knobs("p", "status=503")
    check_events(schemas, raw_events(gw, {"model": "main", "input": "hello"}))


def test_stream_failing_after_first_content_ends_with_response_failed(gw, client):
    gw.knobs("p", "chunks=6,cut_after=2")
    events = list(client.responses.create(model="main", input="hello", stream=True))
    kinds = [e.type for e in events]
    assert "response.output_text.delta" in kinds
    assert kinds[-1] == "response.failed", kinds
    assert events[-1].response.status == "failed"
    assert gw.calls("s") == 0


def test_failure_events_match_the_schema(gw, schemas):
    gw.knobs("p", "chunks=6,cut_after=2")
    events = raw_events(gw, {"model": "main", "input": "hello"})
    assert [n for n, _ in events][-2:] == ["error", "response.failed"]
    check_events(schemas, events)


def test_tools_and_a_follow_up_with_the_tool_output(gw, client, schemas):
    raw = client.responses.with_raw_response.create(model="main", input="weather in Paris?", tools=TOOLS)
    r = raw.parse()
    schemas("Response", raw_json(raw))
    call = next(i for i in r.output if i.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    # The follow-up sends only the tool's output; cascade supplies the earlier turn.
    gw.knobs("p", "no_tools")
    r2 = client.responses.create(
        model="main", previous_response_id=r.id, tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert r2.output_text.startswith("Hello from p")
    sent = gw.bodies("p")[-1]["messages"]
    assert sent[0] == {"role": "user", "content": "weather in Paris?"}
    assert sent[1]["tool_calls"][0]["id"] == call.call_id
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}


def test_streamed_tool_call(gw, client, schemas):
    events = list(client.responses.create(model="main", input="weather?", tools=TOOLS, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"}
    check_events(schemas, raw_events(gw, {"model": "main", "input": "weather?", "tools": TOOLS}))


def test_previous_response_id_across_providers_and_tenants(gw, client, gateway):
    first = client.responses.create(model="cross", input="My name is Ada.", store=True)
    assert first.model == "p"
    # The second turn is served by the Anthropic target, with the whole conversation.
    gw.knobs("p", "status=500")
    second = client.responses.create(model="cross", input="What is my name?", previous_response_id=first.id)
    assert second.model == "claude-x"
    sent = gw.bodies("claude-x")[-1]["messages"]
    texts = json.dumps(sent)
    assert "My name is Ada." in texts and "Hello from p" in texts and "What is my name?" in texts
    # Another credential cannot see it.
    other = openai.OpenAI(base_url=gateway.base + "/v1", api_key="someone-else", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="cross", input="x", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)


def test_retrieve_and_delete(gw, client, schemas):
    r = client.responses.create(model="main", input="keep me")
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    schemas("Response", dump(got))
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    # store: false keeps nothing.
    gone = client.responses.create(model="main", input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(gone.id)


def test_builtin_tools_are_dropped_unless_required(gw, client):
    raw = client.responses.with_raw_response.create(
        model="main", input="hi", tools=[{"type": "web_search"}] + TOOLS, tool_choice="auto")
    assert raw.headers["x-cascade-dropped-tools"] == "web_search"
    sent = gw.bodies("p")[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="main", input="hi", tools=[{"type": "web_search"}],
                                tool_choice={"type": "web_search"})
    assert "web_search" in err.value.message


def test_json_schema_output(gw, client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
              "required": ["city", "temp"], "additionalProperties": False}
    r = client.responses.create(model="main", input="weather as JSON",
                                text={"format": {"type": "json_schema", "name": "w", "schema": schema, "strict": True}})
    parsed = json.loads(r.output_text)
    assert set(parsed) == {"city", "temp"}
    assert gw.bodies("p")[-1]["response_format"]["type"] == "json_schema"


def test_bad_input_is_an_openai_error(gw, client, schemas):
    status, text = http("POST", gw.base + "/v1/responses", {"model": "main"})
    assert status == 400
    schemas("ErrorResponse", json.loads(text))
    assert json.loads(text)["error"]["param"] == "input"
    status, text = http("POST", gw.base + "/v1/responses", b"{not json")
    assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"
