"""Fixtures: a real `cascade serve` process with its built-in mock provider, on free
127.0.0.1 ports, plus validators for OpenAI's published schemas."""

import json
import os
import shutil
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPENAPI = pathlib.Path(
    os.environ.get("CASCADE_OPENAPI", ROOT.parent / "shared" / "openai-openapi" / "openapi.yaml")
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """
server:
  listen: 127.0.0.1:{port}
  request_timeout: 20s
  attempt_timeout: 5s
  passthrough: mock
# One gateway serves every test: keep retries, breakers and health ordering out of the
# way so each test sees exactly the calls it causes (tests/resilience.rs covers them).
retry: {{ max_retries: 0 }}
breaker: {{ consecutive_failures: 1000000, min_calls: 1000000 }}
health: {{ min_calls: 1000000 }}
mock:
  listen: 127.0.0.1:{mock_port}
store: {{ path: "{db}", flush_interval: 50ms }}
providers:
  mock: {{ kind: openai, base_url: "http://127.0.0.1:{mock_port}/v1", api_key: "sk-sdk-test-SECRET" }}
  dead: {{ kind: openai_compatible, base_url: "http://127.0.0.1:{dead_port}/v1" }}
  claude: {{ kind: anthropic, base_url: "http://127.0.0.1:{mock_port}", api_key: "sk-ant-sdk-SECRET" }}
  google: {{ kind: gemini, base_url: "http://127.0.0.1:{mock_port}", api_key: "goog-sdk-SECRET" }}
  azure: {{ kind: azure_openai, base_url: "http://127.0.0.1:{mock_port}/az", api_key: "az-sdk-SECRET", api_version: "2024-10-21" }}
models:
  primary:   {{ provider: mock, model_id: p, max_tokens: 256, context_window: 8000 }}
  secondary: {{ provider: mock, model_id: s, context_window: 8000 }}
  slow:      {{ provider: mock, model_id: slow, attempt_timeout: 500ms }}
  unreachable: {{ provider: dead, model_id: gone }}
  sonnet:    {{ provider: claude, model_id: claude-x, max_tokens: 512 }}
  flash:     {{ provider: google, model_id: gemini-x }}
  emb-openai: {{ provider: mock, model_id: te3, kind: embedding, dimensions: 8, embedding_space: te3, cost_per_1k_input: 0.02 }}
  emb-azure:  {{ provider: azure, model_id: te3-deploy, kind: embedding, dimensions: 8, embedding_space: te3 }}
  emb-gemini: {{ provider: google, model_id: gem-emb, kind: embedding, dimensions: 8 }}
chains:
  main: [primary, secondary]
  timeouts: [slow, secondary]
  offline: [unreachable, secondary]
  cross: [primary, sonnet, flash]
  claude_first: [sonnet, primary]
  emb: [emb-openai, emb-azure]
  emb_gemini: [emb-gemini]
"""


class Gateway:
    def __init__(self, base, mock):
        self.base = base
        self.mock = mock

    def knobs(self, model, spec):
        req = urllib.request.Request(f"{self.mock}/_mock/knobs/{model}", data=spec.encode(), method="POST")
        urllib.request.urlopen(req).read()

    def reset(self):
        urllib.request.urlopen(urllib.request.Request(f"{self.mock}/_mock/reset", data=b"", method="POST")).read()

    def calls(self, model):
        return json.loads(urllib.request.urlopen(f"{self.mock}/_mock/calls").read()).get(model, 0)

    def bodies(self, model):
        """The request bodies the mock received for a model id, oldest first, parsed."""
        raw = json.loads(urllib.request.urlopen(f"{self.mock}/_mock/bodies/{model}").read())
        return [json.loads(b) for b in raw]

    def last_headers(self):
        return json.loads(urllib.request.urlopen(f"{self.mock}/_mock/last_headers").read())


@pytest.fixture(scope="session")
def gateway():
    binary = os.environ.get("CASCADE_BIN", str(ROOT / "target" / "debug" / "cascade"))
    port, mock_port, dead_port = free_port(), free_port(), free_port()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    state = tempfile.mkdtemp(prefix="cascade-sdk-")
    db = os.path.join(state, "cascade.db")
    cfg.write(CONFIG.format(port=port, mock_port=mock_port, dead_port=dead_port, db=db))
    cfg.close()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([binary, "serve", "--config", cfg.name], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(base + "/readyz").read()
            urllib.request.urlopen(f"http://127.0.0.1:{mock_port}/_mock/calls").read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError("gateway did not start: " + log.read().decode())
            time.sleep(0.05)
    gw = Gateway(base, f"http://127.0.0.1:{mock_port}")
    gw.log = log
    gw.db = db
    yield gw
    proc.terminate()
    proc.wait(timeout=10)
    os.unlink(cfg.name)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def gw(gateway):
    gateway.reset()
    return gateway


@pytest.fixture
def client(gateway):
    import openai

    return openai.OpenAI(base_url=gateway.base + "/v1", api_key="client-key", max_retries=0)


@pytest.fixture
def anthropic_client(gateway):
    import anthropic

    return anthropic.Anthropic(base_url=gateway.base, api_key="client-key", max_retries=0)


def honour_nullable(node):
    """The spec is 3.1 but still says `nullable: true` in places; JSON Schema 2020-12
    ignores that keyword, so turn it into a `null` type as the SDK generators do."""
    if isinstance(node, list):
        return [honour_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: honour_nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            node["type"] = types + ["null"]
            if "enum" in node:
                node["enum"] = node["enum"] + [None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="session")
def schemas():
    """validate(name, instance) against components.schemas.<name> of OpenAI's spec."""
    if not OPENAPI.exists():
        if os.environ.get("CI"):
            pytest.fail(f"OpenAI spec not found at {OPENAPI}")
        pytest.skip(f"OpenAI spec not found at {OPENAPI}")
    import jsonschema
    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec = honour_nullable(yaml.load(OPENAPI.read_text(), Loader=loader))
    uri = "urn:openai-openapi"
    registry = Registry().with_resource(uri, Resource.from_contents(spec, default_specification=DRAFT202012))

    def validate(name, instance):
        assert name in spec["components"]["schemas"], name
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": f"{uri}#/components/schemas/{name}"}
        jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)

    return validate
