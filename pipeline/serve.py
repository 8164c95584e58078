"""`python -m pipeline serve --engine OUT`: an OpenAI-style completions server on localhost for either backend.

Endpoints: GET /health, POST /v1/completions {prompt, max_tokens, temperature, top_p, top_k, seed, stream}.
One engine serves requests one at a time (a TensorRT execution context is not re-entrant, and on 2 CPU cores
ONNX Runtime gains nothing from overlapping requests); at most `max_pending` wait, the rest get 503 at once.
Every bad request gets a 4xx with the reason; an error inside one request is a 500 for that request only.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline import PipelineError
from pipeline.generation import Sampling, generate_ids, tokenizer_pad, tokenizer_stops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 64 << 10
    max_tokens: int = 512  # per request
    max_seq_len: int = 1024  # prompt + generated tokens
    max_pending: int = 4  # requests admitted at once (running + waiting)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def engine_path(target: str | Path) -> Path:
    """OUT folder -> its TensorRT plan when this machine can run it, else its Q/DQ ONNX; a file is taken as is."""
    target = Path(target)
    if target.is_file():
        return target
    if not target.is_dir():
        raise PipelineError(f"--engine {target}: no such file or folder; pass the OUT folder of `make engine`")
    from trt_builder.compat import unavailable_reason

    plan, onnx = target / "model.plan", target / "quantized.onnx"
    if plan.is_file() and unavailable_reason() is None:
        return plan
    if onnx.is_file():
        return onnx
    raise PipelineError(f"{target} holds neither model.plan nor quantized.onnx: run `make engine OUT={target}` first")


def _number(body: dict, key: str, kind, default, low, high):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(400, f"'{key}' = {value} is outside [{low}, {high}]")
    return kind(value)


def parse_request(body: dict, limits: ServeLimits) -> tuple[str, int, Sampling, bool]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest(400, "'prompt' must be a non-empty string (one prompt per request)")
    max_tokens = _number(body, "max_tokens", int, 16, 1, limits.max_tokens)
    temperature = _number(body, "temperature", float, 1.0, 0.0, 10.0)
    top_p = _number(body, "top_p", float, 1.0, 1e-6, 1.0)
    top_k = _number(body, "top_k", int, 0, 0, 1 << 20)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(400, f"'seed' must be an integer, got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(400, f"'stream' must be true or false, got {stream!r}")
    return prompt, max_tokens, Sampling(temperature, top_k, top_p, seed), stream


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine, model_name: str, limits: ServeLimits = ServeLimits()):
        super().__init__(address, CompletionHandler)
        if engine.tokenizer is None:
            raise PipelineError("the engine folder has no tokenizer/: re-run `python -m pipeline export`")
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.admission = threading.BoundedSemaphore(limits.max_pending)
        self.engine_lock = threading.Lock()

    def encode(self, prompt: str, max_tokens: int) -> list[int]:
        """Prompt ids, refused before any response starts (a stream cannot turn into a 400 once it has begun)."""
        ids = self.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BadRequest(400, "the prompt encodes to no tokens")
        if len(ids) + max_tokens > self.limits.max_seq_len:
            raise BadRequest(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the server's "
                                  f"max sequence of {self.limits.max_seq_len} tokens")
        return ids

    def complete(self, ids: list[int], max_tokens: int, sampling: Sampling, on_token=None) -> dict:
        tokenizer = self.engine.tokenizer
        stops = tokenizer_stops(tokenizer)
        sampling = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed, stops)
        with self.engine_lock:
            tokens = generate_ids(self.engine, [ids], max_tokens, sampling, tokenizer_pad(tokenizer), on_token)[0]
        stopped = bool(tokens) and tokens[-1] in stops
        text = tokenizer.decode(tokens[:-1] if stopped else tokens)
        return {"text": text, "finish_reason": "stop" if stopped else "length",
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                          "total_tokens": len(ids) + len(tokens)}}


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route the per-request line through logging, not stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": {"message": message, "code": status}})

    def do_GET(self):
        if self.path == "/health":
            engine = self.server.engine
            self._send_json(200, {"status": "ok", "backend": engine.backend, "engine": engine.path.name,
                                  "model": self.server.model_name})
        else:
            self._error(404, f"no route GET {self.path}; try /health or POST /v1/completions")

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest(411, "a Content-Length header is required")
        if int(length) > self.server.limits.max_body_bytes:
            raise BadRequest(413, f"request body of {length} bytes exceeds {self.server.limits.max_body_bytes}")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return body

    def do_POST(self):
        if self.path != "/v1/completions":
            self.close_connection = True
            return self._error(404, f"no route POST {self.path}; use /v1/completions")
        # One handler may serve several requests on a keep-alive connection: a fresh id for each.
        self._request_id, self._created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not self.server.admission.acquire(blocking=False):
            self.close_connection = True
            return self._error(503, f"server busy: {self.server.limits.max_pending} requests already admitted; retry")
        try:
            prompt, max_tokens, sampling, stream = parse_request(self._read_json(), self.server.limits)
            ids = self.server.encode(prompt, max_tokens)
            if stream:
                self._stream(ids, max_tokens, sampling)
            else:
                result = self.server.complete(ids, max_tokens, sampling)
                self._send_json(200, self._completion(result["text"], result["finish_reason"], result["usage"]))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left (e.g. stopped reading a stream): stop, nothing to send
            log.info("client %s disconnected; generation stopped", self.address_string())
        except BadRequest as e:
            self.close_connection = True
            self._error(e.status, str(e))
        except PipelineError as e:
            self.close_connection = True
            self._error(400, str(e))
        except Exception as e:  # one request's failure must not take the server down
            log.exception("request failed")
            self.close_connection = True
            self._error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            self.server.admission.release()

    def _completion(self, text: str, finish_reason: str | None, usage: dict | None = None) -> dict:
        """One response body or stream chunk; every chunk of a request carries the request's id and time."""
        payload = {"id": self._request_id, "object": "text_completion", "created": self._created,
                   "model": self.server.model_name,
                   "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
        if usage is not None:
            payload["usage"] = usage
        return payload

    def _stream(self, ids: list[int], max_tokens: int, sampling: Sampling) -> None:
        """Server-sent events, one per token: the text a token adds (decoded over all tokens so far, so multi-byte
        characters split across tokens arrive whole), then a final event with finish_reason, then [DONE]."""
        tokenizer, tokens, sent = self.server.engine.tokenizer, [], [""]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def on_token(_row: int, token: int) -> None:
            if token == tokenizer.eos_token_id:
                return
            tokens.append(token)
            text = tokenizer.decode(tokens)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return
            delta, sent[0] = text[len(sent[0]):], text
            self._event(self._completion(delta, None))

        result = self.server.complete(ids, max_tokens, sampling, on_token)
        self._event(self._completion(result["text"][len(sent[0]):], result["finish_reason"], result["usage"]))
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(target: str, host: str, port: int, limits: ServeLimits) -> None:
    from pipeline.runtime import load

    path = engine_path(target)
    engine = load(path)
    try:
        server = CompletionServer((host, port), engine, path.parent.name, limits)
    except OSError as e:
        raise PipelineError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from None
    log.info("serving %s (%s) on http://%s:%d/v1/completions", path, engine.backend, host, server.server_port)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, systemd: stop like Ctrl-C, closing the socket
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("server stopped")
    finally:
        server.server_close()
