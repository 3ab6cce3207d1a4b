"""The openai SDK against a chain that crosses wire formats: an OpenAI-format primary
that fails, then an Anthropic-format backup, then a Gemini-format one. Tool calling and
streaming must work on every hop, and every payload must match OpenAI's schemas."""

import json

import pytest

from test_openai_sdk import MESSAGES, stream_chunks

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# Which mock models fail for each hop, and the provider that must answer.
HOPS = [
    ([], "mock", "p"),
    (["p"], "claude", "claude-x"),
    (["p", "claude-x"], "google", "gemini-x"),
]


def fail(gw, models):
    for m in models:
        gw.knobs(m, "status=503" if m == "p" else "status=529" if m == "claude-x" else "status=500")


@pytest.mark.parametrize("failing,provider,model_id", HOPS)
def test_plain_answers_on_every_hop(gw, client, schemas, failing, provider, model_id):
    fail(gw, failing)
    raw = client.chat.completions.with_raw_response.create(model="cross", messages=MESSAGES)
    assert raw.headers["x-cascade-provider"] == provider
    c = raw.parse()
    assert c.choices[0].message.content == f"Hello from {model_id}! This is a mock answer."
    assert c.model == model_id
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    schemas("CreateChatCompletionResponse", json.loads(raw.http_response.text))


@pytest.mark.parametrize("failing,provider,model_id", HOPS)
def test_tool_calls_streamed_and_not_on_every_hop(gw, client, schemas, failing, provider, model_id):
    fail(gw, failing)
    gw.knobs(model_id, "tool=get_weather")
    raw = client.chat.completions.with_raw_response.create(model="cross", messages=MESSAGES, tools=TOOLS)
    assert raw.headers["x-cascade-provider"] == provider
    whole = raw.parse().choices[0]
    assert whole.finish_reason == "tool_calls"
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    schemas("CreateChatCompletionResponse", json.loads(raw.http_response.text))

    raw = client.chat.completions.with_raw_response.create(
        model="cross", messages=MESSAGES, tools=TOOLS, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-cascade-provider"] == provider
    args, names, finish, usage = {}, {}, None, None
    for chunk in raw.parse():
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                names.setdefault(tc.index, tc.function.name)
                args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
            finish = choice.finish_reason or finish
    assert names == {0: "get_weather"}
    assert json.loads(args[0]) == {"city": "Paris"}
    assert finish == "tool_calls"
    assert usage is not None and usage.total_tokens > 0


@pytest.mark.parametrize("failing,provider,model_id", HOPS)
def test_streams_reassemble_like_the_plain_answer(gw, client, schemas, failing, provider, model_id):
    fail(gw, failing)
    plain = client.chat.completions.create(model="cross", messages=MESSAGES).choices[0].message.content
    chunks = stream_chunks(gw, schemas, "cross")
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == plain
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_anthropic_mid_stream_error_reaches_the_sdk(gw, client):
    gw.knobs("p", "status=503")
    gw.knobs("claude-x", "chunks=6,error_event_after=2")
    stream = client.chat.completions.create(model="cross", messages=MESSAGES, stream=True)
    with pytest.raises(Exception):
        for _ in stream:
            pass
    assert gw.calls("gemini-x") == 0
