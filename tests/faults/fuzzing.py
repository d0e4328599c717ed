"""Seeded generators of malformed requests for every listener forage opens (the fault suite's fuzz, issue 13 item 5f).

ZMQ listeners (the tool server's ROUTER, the learner's trajectory and weights ROUTERs) get `zmq_messages`: lists of
frames (one DEALER message each), built from a listener's valid messages (`Template`) by these classes, in turn:

  random bytes · a valid message cut short · a valid message with bytes flipped · random msgpack · a field given a
  value of a random type · a required field missing · a field out of range (the template's own list) · extra or
  missing frames (several payload frames, an empty frame, a REQ-style empty delimiter) · valid msgpack of the wrong
  shape (another listener's message, an array, a scalar, a nested map);

and every OVERSIZED_EVERY-th message instead is oversized but under the listener's hard cap (random bytes, or a valid
message padded with a long string). The HTTP faces of the gateway get `http_bodies` (bodies, content types and tool
names in the same spirit). Everything is drawn from one `random.Random(seed)`, so a failure reproduces.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

ZMQ_KINDS = ("random_bytes", "truncated", "bit_flips", "random_msgpack", "wrong_type", "missing_field",
             "out_of_range", "multipart", "wrong_shape")
OVERSIZED_EVERY = 97  # one message in 97 is oversized (they are big: keep the whole run's traffic in the tens of MB)

_encode = msgspec.msgpack.encode


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-encodable value: scalars of every type, strings, bytes, protocol words, lists, maps."""
    kind = rng.randrange(9 if depth < 2 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([rng.randint(-2**63, 2**63 - 1), rng.randint(-3, 3), 2**64 - 1])
    if kind == 3:
        return rng.choice([rng.uniform(-1e9, 1e9), float("nan"), float("inf"), -0.0])
    if kind == 4:
        return "".join(rng.choice("ab cé\u00ff\u4e2d\n\x00") for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.randbytes(rng.randrange(24))
    if kind == 6:
        return rng.choice(["tool_request", "stats_request", "group", "admission_request", "admission_release",
                           "weight_query", "text_search", "image_search", "", "id"])
    if kind == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(random_value(rng, depth + 1)): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


@dataclass
class Template:
    """What one listener accepts: `valid` messages (maps as on the wire), `required` fields a message cannot lack,
    `out_of_range(rng, n)` -> a message of the right type with a field out of range, and `foreign` messages (valid
    messages of other listeners, wrong here)."""

    valid: list[dict[str, Any]]
    required: list[str]
    out_of_range: Callable[[random.Random, int], dict[str, Any]]
    foreign: list[dict[str, Any]] = field(default_factory=list)
    max_frame_bytes: int = 64 * 1024  # the biggest frame the listener answers (oversized ones stay below `cap`)
    cap: int = 64 * 1024  # ZMQ drops a bigger frame's connection unread: the fuzz never reaches it


def zmq_messages(count: int, template: Template, seed: int) -> list[list[bytes]]:
    """`count` malformed DEALER messages (each a list of frames) for a listener described by `template`."""
    rng = random.Random(seed)
    messages = []
    for n in range(count):
        if n % OVERSIZED_EVERY == OVERSIZED_EVERY - 1:
            messages.append([_oversized(rng, template)])
            continue
        kind = ZMQ_KINDS[n % len(ZMQ_KINDS)]
        message = dict(rng.choice(template.valid))
        if "id" in message:
            message["id"] = f"{kind[:3]}{n}"
        if kind == "random_bytes":
            frames = [rng.randbytes(rng.randrange(64))]
        elif kind == "truncated":
            full = _encode(message)
            frames = [full[: rng.randrange(len(full))]]
        elif kind == "bit_flips":
            frame = bytearray(_encode(message))
            for _ in range(rng.randint(1, 4)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            frames = [bytes(frame)]
        elif kind == "random_msgpack":
            frames = [_encode(random_value(rng))]
        elif kind == "wrong_type":
            message[rng.choice(sorted(message))] = random_value(rng)
            frames = [_encode(message)]
        elif kind == "missing_field":
            del message[rng.choice([f for f in template.required if f in message])]
            frames = [_encode(message)]
        elif kind == "out_of_range":
            frames = [_encode(template.out_of_range(rng, n))]
        elif kind == "multipart":
            payload = _encode(message)
            frames = rng.choice([
                [rng.randbytes(8) for _ in range(rng.randint(2, 4))],  # several payload frames
                [payload, payload],  # a valid message, twice in one
                [b""],  # an empty frame
                [b"", payload],  # a REQ peer's empty delimiter, then a valid message
                [b"", b"", payload],  # two delimiters
                [payload, b""],  # a trailing empty frame
            ])
        else:  # wrong_shape
            shape = rng.randrange(4)
            if shape == 0 and template.foreign:
                frames = [_encode(rng.choice(template.foreign))]
            elif shape == 1:
                frames = [_encode(list(message.values()))]  # an array where a map belongs
            elif shape == 2:
                frames = [_encode(random_value(rng, depth=2))]  # a scalar
            else:
                frames = [_encode({"type": message.get("type"), "payload": message})]  # nested one level down
        messages.append(frames)
    return messages


def _oversized(rng: random.Random, template: Template) -> bytes:
    """Over `max_frame_bytes` when the listener has a soft limit under its cap, else big; always under the cap."""
    soft_limit = template.max_frame_bytes < template.cap - 1024
    size = rng.randrange(template.max_frame_bytes + 1 if soft_limit else template.cap // 2, template.cap - 256)
    if rng.random() < 0.5:
        return rng.randbytes(size)
    message = dict(rng.choice(template.valid))
    message["padding"] = "p" * size  # an unknown field: ignored by the decoder, so only the size is wrong
    frame = _encode(message)
    return frame[: template.cap - 64]  # a cut-off one is undecodable: answered all the same


# ------------------------------------------------------------------------------------------------ templates


def tool_server_template(max_frame_bytes: int, cap: int, max_query_chars: int) -> Template:
    """The tool server (text_search only; its replica serves no other tool)."""
    valid = [{"type": "tool_request", "v": 1, "id": "f", "tool": "text_search", "args": {"query": "otter"},
              "deadline_ms": 2000},
             {"type": "stats_request", "v": 1, "id": "s"}]

    def out_of_range(rng: random.Random, n: int) -> dict[str, Any]:
        message = {**valid[0], "id": f"o{n}"}
        name, value = rng.choice([
            ("args", {"query": random_value(rng)}), ("args", {"image": rng.randbytes(40)}),
            ("args", {"image": "not bytes"}), ("args", {"query": ""}), ("args", {}),
            ("args", {"query": "x", "extra": 1}), ("args", {"query": "q" * (max_query_chars + 1)}),
            ("tool", f"unknown_tool_{n}"), ("tool", ""), ("deadline_ms", rng.choice([0, -5, 10**12, -2**63])),
            ("v", rng.choice([0, 2, 99, -1])), ("token", "unexpected"), ("id", "i" * 5000),
        ])
        message[name] = value
        return message

    foreign = [{"type": "admission_request", "v": 1, "actor_id": "a", "request_id": "r"},
               {"type": "tool_reply", "v": 1, "id": "x", "ok": True, "items": []},
               {"type": "weight_query", "v": 1, "actor_id": "a", "have_version": 0}]
    return Template(valid, ["type", "id", "tool", "args"], out_of_range, foreign, max_frame_bytes, cap)


def _ndarray(dtype: str, values: list[int | float]) -> dict[str, Any]:
    import numpy as np

    array = np.asarray(values, dtype=dtype)
    return {"dtype": dtype, "shape": list(array.shape), "data": array.tobytes()}


def _trajectory(length: int) -> dict[str, Any]:
    return {"token_ids": _ndarray("int32", list(range(1, length + 1))),
            "loss_mask": _ndarray("uint8", [0] + [1] * (length - 1)),
            "behaviour_logprobs": _ndarray("float32", [0.0] + [-0.5] * (length - 1)),
            "versions": _ndarray("int32", [-1] + [0] * (length - 1))}


def trajectory_template(cap: int) -> Template:
    """The learner's trajectory endpoint: admissions, releases and groups."""
    group = {"type": "group", "v": 1, "group_id": "g", "actor_id": "a", "prompt_id": "p",
             "trajectories": [_trajectory(3), _trajectory(4)]}
    valid = [{"type": "admission_request", "v": 1, "actor_id": "a", "request_id": "r"},
             {"type": "admission_release", "v": 1, "actor_id": "a", "request_id": "r", "reason": "fuzz"},
             group]

    def out_of_range(rng: random.Random, n: int) -> dict[str, Any]:
        broken = _trajectory(3)
        name = rng.choice(sorted(broken))
        choice = rng.randrange(8)
        if choice == 0:
            broken[name] = {**broken[name], "dtype": rng.choice(["int99", "object", "", "<f8", "complex64"])}
        elif choice == 1:
            broken[name] = {**broken[name], "shape": rng.choice([[-1], [2**31], [2**62], [3, 3], [], [0]])}
        elif choice == 2:
            broken[name] = {**broken[name], "data": broken[name]["data"][:-1]}  # data shorter than its shape
        elif choice == 3:
            broken[name] = _trajectory(5)[name]  # per-token arrays of different lengths
        elif choice == 4:
            return {**group, "group_id": f"g{n}", "v": rng.choice([0, 2, 2**32])}
        elif choice == 5:
            return {**valid[0], "request_id": f"r{n}", "v": rng.choice([0, 3, -7])}
        elif choice == 6:
            return {**group, "group_id": f"g{n}", "trajectories": [{**_trajectory(3), "reward": "high"}]}
        else:
            return {**group, "group_id": f"g{n}", "trajectories": [broken] * rng.randint(1, 3) + ["not a map"]}
        return {**group, "group_id": f"g{n}", "trajectories": [broken]}

    foreign = [{"type": "weight_query", "v": 1, "actor_id": "a", "have_version": 0},  # served on the weights socket
               {"type": "tool_request", "v": 1, "id": "x", "tool": "text_search", "args": {"query": "q"}},
               {"type": "group_ack", "v": 1, "group_id": "g", "accepted": True}]
    return Template(valid, ["type", "actor_id", "request_id", "group_id", "prompt_id", "trajectories"],
                    out_of_range, foreign, cap, cap)


def weights_template(cap: int) -> Template:
    """The learner's weights endpoint: WeightQuery only."""
    valid = [{"type": "weight_query", "v": 1, "actor_id": "a", "have_version": 0}]

    def out_of_range(rng: random.Random, n: int) -> dict[str, Any]:
        name, value = rng.choice([
            ("have_version", rng.choice([-2**63, -2, -1, 2**63 - 1, 2**64 - 1, -2**31])),
            ("v", rng.choice([0, 2, 255])), ("actor_id", "a" * rng.randrange(1, 4000)), ("token", "unexpected"),
        ])
        return {**valid[0], name: value}

    foreign = [{"type": "admission_request", "v": 1, "actor_id": "a", "request_id": "r"},
               {"type": "weight_bucket", "v": 1, "version": 1, "index": 0, "num_buckets": 1, "tensors": []},
               {"type": "stats_request", "v": 1, "id": "s"}]
    return Template(valid, ["type", "actor_id", "have_version"], out_of_range, foreign, cap, cap)


# ------------------------------------------------------------------------------------------------ HTTP


HTTP_KINDS = ("random_bytes", "truncated_json", "wrong_shape", "wrong_type", "out_of_range", "content_type",
              "unknown_tool", "deep_nesting")


@dataclass(frozen=True)
class HttpRequest:
    """One fuzzed POST: the body, its Content-Type and the tool named in the path."""

    body: bytes
    content_type: str = "application/json"
    tool: str = "text_search"


def http_requests(count: int, seed: int, max_body_bytes: int) -> list[HttpRequest]:
    """`count` malformed POSTs for the gateway's JSON face (/v1/tools/{tool}); every OVERSIZED_EVERY-th one is a
    body just under `max_body_bytes` (valid JSON of the right shape with a query far over the tool's limit, or not
    JSON)."""
    rng = random.Random(seed)
    valid = {"query": "otter"}
    requests = []
    for n in range(count):
        if n % OVERSIZED_EVERY == OVERSIZED_EVERY - 1:
            size = rng.randrange(max_body_bytes // 2, max_body_bytes - 64)
            body = (json.dumps({"query": "q" * size}).encode() if rng.random() < 0.5 else rng.randbytes(size))
            requests.append(HttpRequest(body))
            continue
        kind = HTTP_KINDS[n % len(HTTP_KINDS)]
        if kind == "random_bytes":
            requests.append(HttpRequest(rng.randbytes(rng.randrange(1, 64))))
        elif kind == "truncated_json":
            full = json.dumps({"query": f"otter {n}", "image": "aGVsbG8="}).encode()
            requests.append(HttpRequest(full[: rng.randrange(1, len(full))]))
        elif kind == "wrong_shape":  # JSON, but not an object of arguments
            value = rng.choice([[1, 2], "otter", 42, None, True, [{"query": "otter"}], 1.5e308])
            requests.append(HttpRequest(json.dumps(value).encode()))
        elif kind == "wrong_type":  # an object whose argument has the wrong type
            value = rng.choice([None, [], {}, {"a": 1}, [1, "x"], rng.randint(-2**63, 2**63), 2**70, True])
            requests.append(HttpRequest(json.dumps({"query": value}).encode()))
        elif kind == "out_of_range":
            args = rng.choice([{"query": ""}, {"query": " "}, {}, {"query": "x", "extra": 1}, {"image": "%%%"},
                               {"image": "aGVsbG8="}, {"image": "data:image/png;base64,!!"}, {"query": "q" * 5000},
                               {"query": "otter", "image": "aGVsbG8="}, {"query": "\ud800"}])
            body = json.dumps(args).encode()
            if rng.random() < 0.3:  # numbers JSON allows in no standard form, or too long to parse
                body = rng.choice([b'{"query": NaN}', b'{"query": -Infinity}', b'{"query": ' + b"9" * 5000 + b"}",
                                   b'{"query": 1e999999}'])
            requests.append(HttpRequest(body))
        elif kind == "content_type":
            requests.append(HttpRequest(json.dumps(valid).encode() if rng.random() < 0.2 else rng.randbytes(16),
                                        rng.choice(["application/x-msgpack", "text/plain", "multipart/form-data",
                                                    "application/octet-stream", ""])))
        elif kind == "unknown_tool":
            tool = rng.choice(["image_searc", "TEXT_SEARCH", "x" * 200, "%00", "stats", f"t{n}"])
            requests.append(HttpRequest(json.dumps(valid).encode(), tool=tool))
        else:  # deep_nesting: a parser that recurses must not fall over
            opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
            deepest = (max_body_bytes - 64) // (len(opener) + len(closer))  # still under the body cap
            depth = min(rng.choice([50, 1000, 20_000, deepest]), deepest)
            requests.append(HttpRequest(opener * depth + b"1" + closer * depth))
    return requests


MCP_KINDS = ("random_bytes", "truncated_json", "not_jsonrpc", "bad_method", "wrong_params", "batch",
             "no_session_call")


def mcp_bodies(count: int, seed: int) -> list[bytes]:
    """`count` malformed JSON-RPC bodies for the gateway's MCP face (POST /mcp, no session): never a valid
    `initialize` (which would open a session per request)."""
    rng = random.Random(seed)
    bodies = []
    for n in range(count):
        kind = MCP_KINDS[n % len(MCP_KINDS)]
        call = {"jsonrpc": "2.0", "id": n, "method": "tools/call",
                "params": {"name": "text_search", "arguments": {"query": "otter"}}}
        if kind == "random_bytes":
            body = rng.randbytes(rng.randrange(1, 64))
        elif kind == "truncated_json":
            full = json.dumps(call).encode()
            body = full[: rng.randrange(1, len(full))]
        elif kind == "not_jsonrpc":
            body = json.dumps(rng.choice([[], {}, 7, "x", None, {"jsonrpc": "1.0", "id": 1, "method": "x"},
                                          {"id": 1, "method": "tools/list"}])).encode()
        elif kind == "bad_method":
            body = json.dumps({"jsonrpc": "2.0", "id": n, "method": rng.choice(["", "nope", 7, None])}).encode()
        elif kind == "wrong_params":
            body = json.dumps({"jsonrpc": "2.0", "id": rng.choice([n, None, [1], {"a": 1}]), "method": "initialize",
                               "params": rng.choice([None, [], "x", {"protocolVersion": 7}])}).encode()
        elif kind == "batch":
            body = json.dumps([call, call]).encode()
        else:  # a call that needs a session, sent without one
            body = json.dumps(call).encode()
        bodies.append(body)
    return bodies
