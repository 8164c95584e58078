"""The completions server on a tiny exported decoder: real HTTP on localhost, answers equal to the engine's own
generate, streaming that adds up to the same text, and 4xx/503 with reasons for bad or excess requests."""

from __future__ import annotations

import http.client
import json
import threading

import onnx_ir as ir
import pytest
import torch

from calibration.architectures import spec_for_model_type
from calibration.stats import quantizable_linears
from exporters.onnx_export import export_model
from pipeline import PipelineError
from pipeline.runtime import TOKENIZER, load
from pipeline.serve import CompletionServer, ServeLimits, engine_path
from tests.conftest import tiny_model

LIMITS = ServeLimits(max_body_bytes=2048, max_tokens=24, max_seq_len=64, max_pending=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("serve")
    model = tiny_model(outliers=False)
    names = list(quantizable_linears(model, spec_for_model_type("llama")))
    ir.save(export_model(model, torch.float32, 21, names), out / "quantized.onnx")
    tokenizer.save_pretrained(out / TOKENIZER)
    engine = load(engine_path(out))
    srv = CompletionServer(("127.0.0.1", 0), engine, "tiny", LIMITS)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    return response.status, payload


def test_health_and_a_completion_equal_to_the_engine(server):
    status, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["backend"] == "onnxruntime"
    status, body = request(server, "POST", "/v1/completions",
                           {"prompt": "The quick brown", "max_tokens": 12, "temperature": 0})
    assert status == 200, body
    answer = json.loads(body)
    expected = server.engine.generate("The quick brown", max_new_tokens=12)
    assert answer["choices"][0]["text"] == expected and answer["object"] == "text_completion"
    assert answer["usage"]["completion_tokens"] <= 12 and answer["usage"]["prompt_tokens"] > 0


def test_streamed_chunks_add_up_to_the_completion(server):
    body = {"prompt": "SmoothQuant migrates", "max_tokens": 10, "temperature": 0.8, "seed": 7}
    _, whole = request(server, "POST", "/v1/completions", body)
    status, stream = request(server, "POST", "/v1/completions", {**body, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in stream.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == json.loads(whole)["choices"][0]["text"]
    assert chunks[-1]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("body, status, reason", [
    ({"max_tokens": 4}, 400, "'prompt' must be a non-empty string"),
    ({"prompt": "x", "max_tokens": 0}, 400, "'max_tokens' = 0 is outside"),
    ({"prompt": "x", "max_tokens": 25}, 400, "'max_tokens' = 25 is outside"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "'max_tokens' must be an integer"),
    ({"prompt": "x", "temperature": -1}, 400, "'temperature' = -1 is outside"),
    ({"prompt": "x", "top_p": 0}, 400, "'top_p' = 0 is outside"),
    ({"prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"prompt": "word " * 60, "max_tokens": 20}, 400, "exceeds the server's max sequence of 64"),
    ({"prompt": "word " * 60, "max_tokens": 20, "stream": True}, 400, "exceeds the server's max sequence of 64"),
])
def test_bad_requests_get_4xx_with_the_reason(server, body, status, reason):
    got, payload = request(server, "POST", "/v1/completions", body)
    assert got == status and reason in json.loads(payload)["error"]["message"]


def test_malformed_oversized_and_misrouted_requests(server):
    status, payload = request(server, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in payload
    status, payload = request(server, "POST", "/v1/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in payload
    status, payload = request(server, "POST", "/v1/completions", raw=b"x" * 4096)
    assert status == 413 and "exceeds 2048" in payload
    assert request(server, "GET", "/v1/models")[0] == 404
    assert request(server, "POST", "/v1/chat", {"prompt": "x"})[0] == 404
    assert request(server, "GET", "/health")[0] == 200  # still serving after all of the above


def test_requests_beyond_the_admission_bound_get_503(server):
    for _ in range(LIMITS.max_pending):
        server.admission.acquire()
    try:
        status, payload = request(server, "POST", "/v1/completions", {"prompt": "x"})
        assert status == 503 and "server busy" in payload
    finally:
        for _ in range(LIMITS.max_pending):
            server.admission.release()
    assert request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_engine_folder_errors(tmp_path):
    with pytest.raises(PipelineError, match="no such file or folder"):
        engine_path(tmp_path / "nowhere")
    with pytest.raises(PipelineError, match="neither model.plan nor quantized.onnx"):
        engine_path(tmp_path)


def test_the_cli_server_answers_and_stops_cleanly_on_sigterm(server, tmp_path):
    """`python -m pipeline serve` as a process: it serves the OUT folder and exits 0 on SIGTERM (docker stop)."""
    import signal
    import subprocess
    import sys
    import time

    out = server.engine.path.parent
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--engine", str(out), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 120
        while "serving" not in line and time.time() < deadline:
            line = proc.stderr.readline()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "The quick", "max_tokens": 3}))
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0 and "server stopped" in rest


def test_a_client_leaving_mid_stream_does_not_hurt_the_server(server):
    """More departures than admission slots: if a departed request kept its slot, the server would answer 503
    forever after; each slot must come back once its generation stops."""
    import socket
    import time

    def served_within(seconds: float) -> bool:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200:
                return True
            time.sleep(0.2)
        return False

    body = json.dumps({"prompt": "The quick brown", "max_tokens": 24, "stream": True}).encode()
    for _ in range(LIMITS.max_pending + 1):
        assert served_within(30)
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    assert served_within(30) and request(server, "GET", "/health")[0] == 200
