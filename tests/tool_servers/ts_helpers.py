"""Helpers for tool_servers tests: drawn entity images, a tiny page corpus, a scriptable backend, and servers,
clients and raw peers on 127.0.0.1."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from PIL import Image, ImageDraw

from protocol import ErrorReply, ToolItem, ToolOutbound, ToolRequest, decode, encode
from tool_servers.client import ToolClient
from tool_servers.server import ToolServer

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 200, 30), (160, 50, 200), (30, 190, 200)]
SHAPES = ["circle", "square", "triangle", "cross"]

PAGES = [
    ("Zorblax", "Zorblax is a violet lighthouse keeper from the island of Quell. Zorblax collects brass bells."),
    ("Mirelle Tann", "Mirelle Tann is a glassblower in the city of Oskar. She was born in the year 1742."),
    ("Pondle", "Pondle is a river otter that lives in the Vask marshes and eats copper beetles."),
    ("Quell", "Quell is an island in the northern sea. Its capital is Harrow and its flag is green."),
    ("Harrow", "Harrow is the capital of Quell. Harrow has a famous clock tower built by Mirelle Tann."),
    ("Vask", "The Vask marshes stretch for forty miles. Otters, herons and beetles live in Vask."),
    ("Oskar", "Oskar is a city of glassblowers. The river Lume runs through Oskar to the sea."),
    ("Brass bells", "Brass bells are rung in lighthouses. Collectors prize old brass bells from Quell."),
]


def draw_entity(index: int, size: int = 64) -> Image.Image:
    """A distinct picture per index: shape x colour on a background of another colour."""
    shape = SHAPES[index % len(SHAPES)]
    colour = COLOURS[index % len(COLOURS)]
    background = tuple(255 - c // 2 for c in COLOURS[(index // len(SHAPES) + 2) % len(COLOURS)])
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    a, b = size // 5, size - size // 5
    if shape == "circle":
        draw.ellipse([a, a, b, b], fill=colour)
    elif shape == "square":
        draw.rectangle([a, a, b, b], fill=colour)
    elif shape == "triangle":
        draw.polygon([(size // 2, a), (a, b), (b, b)], fill=colour)
    else:
        draw.rectangle([size // 2 - 6, a, size // 2 + 6, b], fill=colour)
        draw.rectangle([a, size // 2 - 6, b, size // 2 + 6], fill=colour)
    return image


def perturb(image: Image.Image, seed: int) -> Image.Image:
    """A noisy, slightly brighter copy shifted by a couple of pixels (what a user's photo of the entity is)."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, np.float32) * 1.08 + rng.normal(0, 12, (*image.size[::-1], 3))
    pixels = np.roll(pixels, shift=(2, -2), axis=(0, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


NUM_IMAGES = 12


def run(coro: Any) -> Any:
    """Run a coroutine on a fresh event loop (no pytest-asyncio in the venv)."""
    return asyncio.run(coro)


class FakeBackend:
    """A scriptable backend: echoes the query, optionally sleeping or raising, and records its batches."""

    name = "fake"

    def __init__(self, delay_s: float = 0.0, fail: str | None = None) -> None:
        self.delay_s = delay_s
        self.fail = fail  # "batch": search_batch raises; "boom": requests with query "boom" raise
        self.batches: list[int] = []

    def validate(self, args: Mapping[str, Any]) -> None:
        pass

    def search_batch(self, batch: list[Mapping[str, Any]]) -> list[Any]:
        import time

        self.batches.append(len(batch))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail == "batch":
            raise RuntimeError("index file vanished")
        return [RuntimeError("boom requested") if args.get("query") == "boom"
                else [ToolItem(title=str(args.get("query")))] for args in batch]

    def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def serving(backends, **kwargs):
    server = ToolServer(backends, **kwargs)
    endpoint = await server.start()
    try:
        yield server, endpoint
    finally:
        await server.stop(timeout_s=5.0)


@contextlib.asynccontextmanager
async def client_of(*endpoints, **kwargs):
    client = ToolClient(list(endpoints), **kwargs)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def raw_peer(endpoint):
    """A bare DEALER, for sending frames a ToolClient never would."""
    socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        yield socket
    finally:
        socket.close()


async def exchange(socket, *frames: bytes, timeout_s: float = 2.0):
    await socket.send_multipart(list(frames))
    reply = await asyncio.wait_for(socket.recv(), timeout_s)
    return decode(reply, ToolOutbound)


def request(id="r1", tool="text_search", args=None, **kwargs) -> bytes:
    return encode(ToolRequest(id=id, tool=tool, args={"query": "otter"} if args is None else args, **kwargs))


def code_of(reply) -> str:
    if isinstance(reply, ErrorReply):
        return reply.code
    return "ok" if reply.ok else reply.error.code
