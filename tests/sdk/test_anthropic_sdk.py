"""The real `anthropic` SDK pointed at cascade's `/v1/messages`: an Anthropic target gets
the client's own bytes (cache_control, thinking signatures, betas survive); other targets
get a translation; failover before the first content is invisible, after it an `error`
event; errors use Anthropic's shape and statuses."""

import json

import anthropic
import pytest

from test_openai_sdk import http

MESSAGES = [{"role": "user", "content": "hello"}]
TOOLS = [{"name": "get_weather", "description": "Get the weather",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def test_native_pass_through_keeps_the_clients_bytes(gw, anthropic_client):
    raw = anthropic_client.messages.with_raw_response.create(
        model="claude_first", max_tokens=64,
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig-123"},
                                                    {"type": "text", "text": "yes?"}]},
                  {"role": "user", "content": "go on"}],
        extra_body={"context_management": {"edits": []}},
        extra_headers={"anthropic-beta": "context-management-2025-06-27"},
    )
    m = raw.parse()
    assert m.content[0].text == "Hello from claude-x! This is a mock answer."
    assert m.model == "claude-x" and m.stop_reason == "end_turn"
    assert raw.headers["x-cascade-model"] == "sonnet"
    sent = gw.bodies("claude-x")[-1]
    assert sent["model"] == "claude-x"
    assert sent["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert sent["messages"][1]["content"][0]["signature"] == "sig-123"
    assert sent["context_management"] == {"edits": []}
    h = gw.last_headers()
    assert h["anthropic-beta"] == "context-management-2025-06-27"
    assert h["x-api-key"] == "sk-ant-sdk-SECRET"
    assert "anthropic-version" in h


def test_fallback_to_an_openai_target_is_translated(gw, anthropic_client):
    gw.knobs("claude-x", "status=529")
    raw = anthropic_client.messages.with_raw_response.create(model="claude_first", max_tokens=64, messages=MESSAGES)
    m = raw.parse()
    assert raw.headers["x-cascade-model"] == "primary"
    assert raw.headers["x-cascade-fallbacks"] == "1"
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].text == "Hello from p! This is a mock answer."
    assert m.usage.output_tokens > 0
    sent = gw.bodies("p")[-1]
    assert sent["messages"] == [{"role": "user", "content": "hello"}] and sent["max_tokens"] == 64


@pytest.mark.parametrize("failing", [[], ["claude-x"]])
def test_streams_on_both_targets(gw, anthropic_client, failing):
    for m in failing:
        gw.knobs(m, "status=500")
    with anthropic_client.messages.stream(model="claude_first", max_tokens=64, messages=MESSAGES) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    who = "p" if failing else "claude-x"
    assert text == f"Hello from {who}! This is a mock answer."
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize("failing", [[], ["claude-x"]])
def test_tools_on_both_targets(gw, anthropic_client, failing):
    for m in failing:
        gw.knobs(m, "status=500")
    m = anthropic_client.messages.create(model="claude_first", max_tokens=64, messages=MESSAGES, tools=TOOLS)
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    assert m.stop_reason == "tool_use"
    with anthropic_client.messages.stream(model="claude_first", max_tokens=64, messages=MESSAGES, tools=TOOLS) as s:
        final = s.get_final_message()
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.input == {"city": "Paris"}
    # The tool result goes back, translated or not.
    gw.knobs("claude-x" if not failing else "p", "no_tools")
    follow = anthropic_client.messages.create(
        model="claude_first", max_tokens=64, tools=TOOLS,
        messages=MESSAGES + [{"role": "assistant", "content": [use.model_dump()]},
                             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert follow.content[0].type == "text"


def test_failure_after_first_content_is_an_error_event(gw, anthropic_client):
    gw.knobs("claude-x", "status=500")
    gw.knobs("p", "chunks=6,cut_after=2")
    with pytest.raises(anthropic.APIStatusError):
        with anthropic_client.messages.stream(model="claude_first", max_tokens=64, messages=MESSAGES) as s:
            for _ in s.text_stream:
                pass


def test_all_failed_errors_use_anthropic_shapes(gw, anthropic_client):
    gw.knobs("claude-x", "status=500")
    gw.knobs("p", "status=500")
    with pytest.raises(anthropic.APIStatusError) as err:
        anthropic_client.messages.create(model="claude_first", max_tokens=64, messages=MESSAGES)
    assert err.value.status_code == 529
    body = err.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    # The attempts are in the message, by pool model name.
    assert "sonnet" in body["error"]["message"] and "primary" in body["error"]["message"]
    gw.knobs("claude-x", "status=429,retry_after=7")
    gw.knobs("p", "status=429,retry_after=7")
    with pytest.raises(anthropic.RateLimitError) as err:
        anthropic_client.messages.create(model="claude_first", max_tokens=64, messages=MESSAGES)
    assert err.value.response.headers["retry-after"]
    assert err.value.response.json()["error"]["type"] == "rate_limit_error"


def test_bad_requests_are_anthropic_errors(gw, anthropic_client):
    with pytest.raises(anthropic.NotFoundError) as err:
        anthropic_client.messages.create(model="no-such-chain", max_tokens=8, messages=MESSAGES)
    assert err.value.response.json()["error"]["type"] == "not_found_error"
    status, text = http("POST", gw.base + "/v1/messages", b"{nope")
    assert status == 400
    assert json.loads(text)["type"] == "error" and json.loads(text)["error"]["type"] == "invalid_request_error"


def test_count_tokens(gw, anthropic_client):
    n = anthropic_client.messages.count_tokens(model="claude_first", messages=MESSAGES)
    assert n.input_tokens > 0
    assert gw.calls("claude-x:count_tokens") == 1
    # Without a healthy Anthropic target, cascade estimates.
    status, text = http("POST", gw.base + "/v1/messages/count_tokens", {"model": "main", "messages": MESSAGES})
    assert status == 200 and json.loads(text)["input_tokens"] > 0


def test_models_in_anthropic_shape(gw, anthropic_client):
    ids = [m.id for m in anthropic_client.models.list()]
    assert "claude_first" in ids and "sonnet" in ids
