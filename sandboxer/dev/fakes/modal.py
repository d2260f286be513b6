"""A fake Modal control plane: a grpclib server on 127.0.0.1 built on
`modal_proto.api_grpc.ModalClientBase`, answering the RPCs the official `modal` client
sends for apps, images, sandboxes (V1 for GPU, V2 for CPU), poll/wait, terminate, list
by tags and tags (see docs/research/modal-client.md, which has the RPC sequences).

Realistic where it matters: tokens checked on every call, V2 calls need the JWT from
`AuthTokenGet`, id shapes (V1 `sb-` + 22 alphanumerics, V2 otherwise), creates
deduplicated by the client's `x-idempotency-key`, sandboxes that stop at their
`timeout_secs`, list paging by `before_timestamp`. Faults can be injected per RPC:
`fail_next[rpc]` (gRPC errors, raised in order) and `latency_s[rpc]`.

Images are built as Modal builds them (docs/research/modal-client.md §2b):
`ImageGetOrCreate` answers an `im-` id for an image definition and starts its build, or
returns the build of an identical definition (under way: the client joins it; done: its
result, no build); `ImageJoinStreaming` streams the build's log lines from the client's
`last_entry_id`, then its result, in rounds of at most `join_round_s`. A build takes
`build_s`; one whose `FROM` reference contains a word of `unpullable` ("fail") fails the
way a missing registry image does (the reason is in the logs; the result carries no
exception), and is built again when asked for again. `ImageFromId` knows what was built
(and takes ids it never saw for images built before it started), and the build logs are
read back as `image.logs.fetch()` reads them (`ImageBuildChainGet`, `AppCountLogs`,
`AppFetchLogs`). `builds_of(reference)` is what a test counts.

Sandboxes are reachable too: `tunnels()` answers, for each port the create opened, a
loopback server of that sandbox's port (its TCP tunnel too, for `unencrypted_ports`);
`create_connect_token()` mints a token that the fake's connect proxy (`url` of the
token) checks (`Authorization: Bearer`, or `?_modal_connect_token=`) before it answers
for the sandbox's port, with the token's `X-Verified-User-Data`.

It runs on its own thread and event loop (`with FakeModal() as fake: fake.url`), so
tests, the dev command and the worker's loop are independent of it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import string
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from grpclib.server import Server, Stream
from modal._utils.grpc_utils import custom_detail_codec
from modal_proto import api_pb2
from modal_proto.api_grpc import ModalClientBase

from sandboxer.dev.fakes.http import LoopbackHTTP, sandbox_page, send_json

_ALNUM = string.ascii_letters + string.digits
_GS = api_pb2.GenericResult


def _id(prefix: str, length: int = 22) -> str:
    return f"{prefix}-" + "".join(secrets.choice(_ALNUM) for _ in range(length))


def _jwt(ttl_s: float = 3600.0) -> str:
    # The client reads `exp` from the payload and checks no signature.
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'exp': int(time.time() + ttl_s)})}.sig"


@dataclass
class FakeSandbox:
    sandbox_id: str
    version: int  # 1 (GPU) or 2 (CPU)
    app_id: str
    definition: Any  # api_pb2.Sandbox
    tags: dict[str, str]
    created_at: float
    task_id: str
    result: Any = None  # api_pb2.GenericResult once finished
    finished_at: float | None = None

    @property
    def running(self) -> bool:
        return self.result is None

    @property
    def gpu(self) -> tuple[str, int]:
        config = self.definition.resources.gpu_config
        return config.gpu_type, config.count


@dataclass
class FakeImage:
    """One image definition and its build: the log lines so far, then its result."""

    image_id: str
    definition: Any  # api_pb2.Image
    builder_version: str
    #: The app and task the build ran as (where its logs are kept).
    builder_app_id: str
    builder_task_id: str
    started_at: float
    logs: list[Any] = field(default_factory=list)  # api_pb2.TaskLogs; entry id: index + 1
    result: Any = None  # api_pb2.GenericResult once the build ended
    finished_at: float | None = None

    @property
    def reference(self) -> str:
        """What its first line pulls (`FROM <reference>`; a base image's tag for a layer)."""
        return str(self.definition.dockerfile_commands[0]).removeprefix("FROM ").strip()

    @property
    def built(self) -> bool:
        return self.result is not None and self.result.status == _GS.GENERIC_STATUS_SUCCESS

    @property
    def failed(self) -> bool:
        return self.result is not None and not self.built


@dataclass
class FakeModalState:
    """What the fake knows, readable (and faults settable) from tests."""

    token_id: str = "ak-test"  # noqa: S105 - a fake's placeholder
    token_secret: str = "as-test"  # noqa: S105
    sandboxes: dict[str, FakeSandbox] = field(default_factory=dict)
    apps: dict[tuple[str, str], str] = field(default_factory=dict)
    idempotency: dict[str, str] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    fail_next: dict[str, list[GRPCError]] = field(default_factory=dict)
    #: Raised by a create RPC *after* it made the sandbox: the ambiguous failure.
    fail_after_create: list[GRPCError] = field(default_factory=list)
    latency_s: dict[str, float] = field(default_factory=dict)
    #: Connect tokens minted: token -> (sandbox id, port, user metadata).
    connect_tokens: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    #: The loopback server of each opened (sandbox id, port).
    port_servers: dict[tuple[str, int], LoopbackHTTP] = field(default_factory=dict)
    proxy_url: str = ""
    #: Every build, by image id; a definition asked for again is not built again.
    images: dict[str, FakeImage] = field(default_factory=dict)
    #: The image id of each definition (its serialized `api_pb2.Image`, builder version).
    image_definitions: dict[tuple[bytes, str], str] = field(default_factory=dict)
    #: How long a build runs; its log lines are spread over it.
    build_s: float = 0.2
    #: A build whose `FROM` reference contains one of these fails to pull it.
    unpullable: set[str] = field(default_factory=lambda: {"fail"})
    #: The longest one `ImageJoinStreaming` is held (Modal: the request's `timeout`, 55 s);
    #: then it ends without a result and the client joins again from its `last_entry_id`.
    join_round_s: float = 55.0

    def builds_of(self, reference: str) -> list[FakeImage]:
        """The builds of images pulled from `reference`, oldest first."""
        return [image for image in self.images.values() if image.reference == reference]

    def alive(self) -> list[FakeSandbox]:
        return [s for s in self.sandboxes.values() if s.running]

    def fail(self, rpc: str, status: Status, message: str, times: int = 1) -> None:
        """The next `times` calls of `rpc` fail with `status`."""
        self.fail_next.setdefault(rpc, []).extend(GRPCError(status, message) for _ in range(times))


class _Servicer(ModalClientBase):
    def __init__(self, state: FakeModalState) -> None:
        self.state = state
        self._changed = asyncio.Event()
        self._images_changed = asyncio.Event()
        self._builds: set[asyncio.Task[None]] = set()

    async def _recv(self, name: str, stream: Stream[Any, Any]) -> Any:
        request = await stream.recv_message()
        metadata = dict(stream.metadata or {})
        self.state.calls[name] += 1
        if (metadata.get("x-modal-token-id"), metadata.get("x-modal-token-secret")) != (
            self.state.token_id,
            self.state.token_secret,
        ):
            raise GRPCError(Status.UNAUTHENTICATED, "Token ID or secret is invalid")
        if name.endswith("V2") and not metadata.get("x-modal-auth-token"):
            raise GRPCError(Status.UNAUTHENTICATED, "missing x-modal-auth-token")
        if self.state.latency_s.get(name):
            await asyncio.sleep(self.state.latency_s[name])
        if self.state.fail_next.get(name):
            raise self.state.fail_next[name].pop(0)
        return request

    def _sandbox(self, sandbox_id: str) -> FakeSandbox:
        sandbox = self.state.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        if (
            sandbox.running
            and 0 < sandbox.definition.timeout_secs < time.time() - sandbox.created_at
        ):
            self._finish(sandbox, _GS.GENERIC_STATUS_TIMEOUT)  # its own timeout passed
        return sandbox

    def _handle_metadata(self, sandbox: FakeSandbox) -> Any:
        metadata = api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id)
        if sandbox.result is not None:
            metadata.result.CopyFrom(sandbox.result)
        return metadata

    def _finish(self, sandbox: FakeSandbox, status: Any, exitcode: int = 0) -> None:
        if sandbox.result is None:
            sandbox.result = api_pb2.GenericResult(status=status, exitcode=exitcode)
            sandbox.finished_at = time.time()
            self._changed.set()
            self._changed = asyncio.Event()

    # -- apps and images --------------------------------------------------------------

    async def AppGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("AppGetOrCreate", stream)
        key = (request.environment_name, request.app_name)
        if key not in self.state.apps:
            if request.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App '{request.app_name}' not found")
            self.state.apps[key] = _id("ap")
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=self.state.apps[key]))

    async def EnvironmentGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("EnvironmentGetOrCreate", stream)
        settings = api_pb2.EnvironmentSettings(image_builder_version="2025.06")
        metadata = api_pb2.EnvironmentMetadata(
            name=request.deployment_name or "main", settings=settings
        )
        await stream.send_message(
            api_pb2.EnvironmentGetOrCreateResponse(environment_id=_id("en"), metadata=metadata)
        )

    async def ImageGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("ImageGetOrCreate", stream)
        commands = request.image.dockerfile_commands
        if not request.app_id:
            raise GRPCError(Status.INVALID_ARGUMENT, "app_id required")
        if not commands or not commands[0].startswith("FROM "):
            raise GRPCError(Status.INVALID_ARGUMENT, "An image definition starts with FROM")
        for base in request.image.base_images:
            known = self.state.images.get(base.image_id)
            if known is not None and not known.built:
                raise GRPCError(Status.FAILED_PRECONDITION, f"Image {base.image_id} is not built")
        key = (request.image.SerializeToString(deterministic=True), request.builder_version)
        image = self.state.images.get(self.state.image_definitions.get(key, ""))
        # An identical definition reuses its build, under way or done; a failed one is
        # built again.
        if image is None or request.force_build or image.failed:
            image = self._start_build(request, key)
        response = api_pb2.ImageGetOrCreateResponse(image_id=image.image_id)
        if image.built:  # the client joins no build
            response.result.CopyFrom(image.result)
            response.metadata.CopyFrom(self._image_metadata(image))
        await stream.send_message(response)

    async def ImageJoinStreaming(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("ImageJoinStreaming", stream)
        image = self._image(request.image_id)
        sent = int(request.last_entry_id or 0)
        if image.result is not None and not request.include_logs_for_finished:
            sent = len(image.logs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(request.timeout or 55.0, self.state.join_round_s)
        while True:
            changed = self._images_changed  # before looking: a change after it wakes us
            if len(image.logs) > sent:
                lines, sent = image.logs[sent:], len(image.logs)
                await stream.send_message(
                    api_pb2.ImageJoinStreamingResponse(task_logs=lines, entry_id=str(sent))
                )
            if image.result is not None:
                await stream.send_message(
                    api_pb2.ImageJoinStreamingResponse(
                        result=image.result, metadata=self._image_metadata(image), eof=True
                    )
                )
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return  # a round without a result: the client joins again
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=remaining)

    async def ImageFromId(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("ImageFromId", stream)
        image = self.state.images.get(request.image_id)
        if not request.image_id.startswith("im-") or (image is not None and not image.built):
            raise GRPCError(Status.NOT_FOUND, f"Image {request.image_id} not found")
        metadata = self._image_metadata(image) if image else api_pb2.ImageMetadata()
        await stream.send_message(
            api_pb2.ImageFromIdResponse(image_id=request.image_id, metadata=metadata)
        )

    async def ImageBuildChainGet(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("ImageBuildChainGet", stream)
        chain = self._build_chain(self._image(request.image_id))
        await stream.send_message(api_pb2.ImageBuildChainGetResponse(build_steps=chain))

    async def AppCountLogs(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("AppCountLogs", stream)
        width = max(request.bucket_secs, 1)
        counts: dict[int, Counter[str]] = {}
        for _, line in self._app_logs(request):
            start = int(line.timestamp // width) * width  # buckets align to the epoch
            counts.setdefault(start, Counter())[_SOURCES.get(line.file_descriptor, "system")] += 1
        buckets = []
        for start, count in sorted(counts.items()):
            bucket = api_pb2.AppCountLogsResponse.LogBucket(
                stdout_logs=count["stdout"],
                stderr_logs=count["stderr"],
                system_logs=count["system"],
            )
            bucket.bucket_start_at.FromSeconds(start)
            buckets.append(bucket)
        await stream.send_message(
            api_pb2.AppCountLogsResponse(app_id=request.app_id, buckets=buckets)
        )

    async def AppFetchLogs(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("AppFetchLogs", stream)
        batches: dict[str, Any] = {}
        for image, line in self._app_logs(request)[: request.limit or None]:
            batch = batches.setdefault(
                image.image_id,
                api_pb2.TaskLogsBatch(task_id=image.builder_task_id, image_id=image.image_id),
            )
            batch.items.append(line)
        await stream.send_message(api_pb2.AppFetchLogsResponse(batches=list(batches.values())))

    def _image(self, image_id: str) -> FakeImage:
        image = self.state.images.get(image_id)
        if image is None:
            raise GRPCError(Status.NOT_FOUND, f"Image {image_id} not found")
        return image

    @staticmethod
    def _image_metadata(image: FakeImage) -> Any:
        return api_pb2.ImageMetadata(image_builder_version=image.builder_version, workdir="/")

    def _start_build(self, request: Any, key: tuple[bytes, str]) -> FakeImage:
        image = FakeImage(
            image_id=_id("im"),
            definition=request.image,
            builder_version=request.builder_version,
            builder_app_id=_id("ap"),
            builder_task_id=_id("ta"),
            started_at=time.time(),
        )
        self.state.images[image.image_id] = image
        self.state.image_definitions[key] = image.image_id
        task = asyncio.get_running_loop().create_task(self._build(image))
        self._builds.add(task)
        task.add_done_callback(self._builds.discard)
        return image

    async def _build(self, image: FakeImage) -> None:
        """Log the build's lines over `build_s`, then set its result."""
        fails = not image.definition.base_images and any(
            word in image.reference for word in self.state.unpullable
        )
        lines = _build_log(image, fails)
        for source, data in lines:
            await asyncio.sleep(self.state.build_s / len(lines))
            now = time.time_ns()
            image.logs.append(
                api_pb2.TaskLogs(
                    data=data, file_descriptor=source, timestamp=now / 1e9, timestamp_ns=now
                )
            )
            self._notify_images()
        # After its last line (log reads take the build's span, its end excluded); a
        # failed pull's result carries no exception: Modal fills it for a function step.
        image.finished_at = max(time.time(), image.logs[-1].timestamp + 1e-3)
        status = _GS.GENERIC_STATUS_FAILURE if fails else _GS.GENERIC_STATUS_SUCCESS
        image.result = api_pb2.GenericResult(status=status)
        self._notify_images()

    def _notify_images(self) -> None:
        self._images_changed.set()
        self._images_changed = asyncio.Event()

    def cancel_builds(self) -> None:
        for task in list(self._builds):
            task.cancel()

    def _build_chain(self, image: FakeImage) -> list[Any]:
        """The build steps that made `image`, its base images' first."""
        steps = [
            step
            for base in image.definition.base_images
            if base.image_id in self.state.images
            for step in self._build_chain(self.state.images[base.image_id])
        ]
        step = api_pb2.ImageBuildStep(
            image_id=image.image_id,
            builder_app_id=image.builder_app_id,
            builder_task_id=image.builder_task_id,
        )
        step.started_at.FromNanoseconds(int(image.started_at * 1e9))
        step.finished_at.FromNanoseconds(int((image.finished_at or time.time()) * 1e9))
        return [*steps, step]

    def _app_logs(self, request: Any) -> list[tuple[FakeImage, Any]]:
        """The build log lines of app `request.app_id` (a builder's), of its task
        `request.task_id` if one is named, from `request.since` up to `request.until`."""
        since, until = request.since.ToNanoseconds() / 1e9, request.until.ToNanoseconds() / 1e9
        return [
            (image, line)
            for image in self.state.images.values()
            if image.builder_app_id == request.app_id
            and request.task_id in ("", image.builder_task_id)
            for line in image.logs
            if since <= line.timestamp < until
        ]

    async def AuthTokenGet(self, stream: Stream[Any, Any]) -> None:
        await self._recv("AuthTokenGet", stream)
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=_jwt()))

    # -- sandboxes ---------------------------------------------------------------------

    def _create(self, stream: Stream[Any, Any], request: Any, version: int) -> FakeSandbox:
        if not request.app_id:
            raise GRPCError(Status.INVALID_ARGUMENT, "app_id required")
        gpu = request.definition.resources.gpu_config.gpu_type
        if gpu and gpu not in GPU_TYPES:
            raise GRPCError(Status.INVALID_ARGUMENT, f"Unknown GPU type: {gpu}")
        key = str(dict(stream.metadata or {}).get("x-idempotency-key", ""))
        if key and key in self.state.idempotency:  # the client's retry of one create
            return self._created(self.state.sandboxes[self.state.idempotency[key]])
        name = request.definition.name
        if name and any(
            s.app_id == request.app_id and s.definition.name == name for s in self.state.alive()
        ):
            raise GRPCError(Status.ALREADY_EXISTS, f"Sandbox with name '{name}' already exists")
        sandbox_id = _id("sb") if version == 1 else "sb-v2-" + _id("x")[2:]
        sandbox = FakeSandbox(
            sandbox_id=sandbox_id,
            version=version,
            app_id=request.app_id,
            definition=request.definition,
            tags={t.tag_name: t.tag_value for t in request.tags},
            created_at=time.time(),
            task_id=_id("ta"),
        )
        self.state.sandboxes[sandbox_id] = sandbox
        if key:
            self.state.idempotency[key] = sandbox_id
        return self._created(sandbox)

    def _created(self, sandbox: FakeSandbox) -> FakeSandbox:
        if self.state.fail_after_create:
            raise self.state.fail_after_create.pop(0)
        return sandbox

    async def SandboxCreate(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("SandboxCreate", stream)
        sandbox = self._create(stream, request, 1)
        await stream.send_message(
            api_pb2.SandboxCreateResponse(
                sandbox_id=sandbox.sandbox_id, metadata=self._handle_metadata(sandbox)
            )
        )

    async def SandboxCreateV2(self, stream: Stream[Any, Any]) -> None:
        request = await self._recv("SandboxCreateV2", stream)
        sandbox = self._create(stream, request, 2)
        await stream.send_message(
            api_pb2.SandboxCreateV2Response(
                sandbox_id=sandbox.sandbox_id,
                task_id=sandbox.task_id,
                metadata=self._handle_metadata(sandbox),
            )
        )

    async def _get_task_id(self, name: str, stream: Stream[Any, Any]) -> None:
        sandbox = self._sandbox((await self._recv(name, stream)).sandbox_id)
        response = api_pb2.SandboxGetTaskIdResponse(task_id=sandbox.task_id)
        if sandbox.result is not None:
            response.task_result.CopyFrom(sandbox.result)
        await stream.send_message(response)

    async def SandboxGetTaskId(self, stream: Stream[Any, Any]) -> None:
        await self._get_task_id("SandboxGetTaskId", stream)

    async def SandboxGetTaskIdV2(self, stream: Stream[Any, Any]) -> None:
        await self._get_task_id("SandboxGetTaskIdV2", stream)

    async def _wait(self, name: str, stream: Stream[Any, Any]) -> None:
        request = await self._recv(name, stream)
        sandbox = self._sandbox(request.sandbox_id)
        if sandbox.running and request.timeout > 0:  # a long poll: hold it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=request.timeout)
        response = api_pb2.SandboxWaitResponse(metadata=self._handle_metadata(sandbox))
        if sandbox.result is not None:  # unset status means running
            response.result.CopyFrom(sandbox.result)
        await stream.send_message(response)

    async def SandboxWait(self, stream: Stream[Any, Any]) -> None:
        await self._wait("SandboxWait", stream)

    async def SandboxWaitV2(self, stream: Stream[Any, Any]) -> None:
        await self._wait("SandboxWaitV2", stream)

    async def _terminate(self, name: str, stream: Stream[Any, Any]) -> None:
        sandbox = self._sandbox((await self._recv(name, stream)).sandbox_id)
        self._finish(sandbox, _GS.GENERIC_STATUS_TERMINATED, exitcode=137)
        await stream.send_message(api_pb2.SandboxTerminateResponse(existing_result=sandbox.result))

    async def SandboxTerminate(self, stream: Stream[Any, Any]) -> None:
        await self._terminate("SandboxTerminate", stream)

    async def SandboxTerminateV2(self, stream: Stream[Any, Any]) -> None:
        await self._terminate("SandboxTerminateV2", stream)

    async def _list(self, name: str, stream: Stream[Any, Any]) -> None:
        request = await self._recv(name, stream)
        wanted = {t.tag_name: t.tag_value for t in request.tags}
        page = []
        for sandbox in sorted(self.state.sandboxes.values(), key=lambda s: -s.created_at):
            self._sandbox(sandbox.sandbox_id)  # let an expired one stop first
            if (
                (request.app_id and sandbox.app_id != request.app_id)
                or (request.before_timestamp and sandbox.created_at >= request.before_timestamp)
                or (not request.include_finished and not sandbox.running)
                or any(sandbox.tags.get(k) != v for k, v in wanted.items())
            ):
                continue
            page.append(
                api_pb2.SandboxInfo(
                    id=sandbox.sandbox_id,
                    app_id=sandbox.app_id,
                    created_at=sandbox.created_at,
                    tags=[
                        api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sandbox.tags.items()
                    ],
                    task_info=api_pb2.TaskInfo(id=sandbox.task_id, result=sandbox.result),
                    metadata=self._handle_metadata(sandbox),
                )
            )
        # Newest first, 100 a page; the client asks again, older than the last, until empty.
        await stream.send_message(api_pb2.SandboxListResponse(sandboxes=page[:100]))

    async def SandboxList(self, stream: Stream[Any, Any]) -> None:
        await self._list("SandboxList", stream)

    async def SandboxListV2(self, stream: Stream[Any, Any]) -> None:
        await self._list("SandboxListV2", stream)

    async def _tags_get(self, name: str, stream: Stream[Any, Any]) -> None:
        sandbox = self._sandbox((await self._recv(name, stream)).sandbox_id)
        tags = [api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sandbox.tags.items()]
        await stream.send_message(api_pb2.SandboxTagsGetResponse(tags=tags))

    async def SandboxTagsGet(self, stream: Stream[Any, Any]) -> None:
        await self._tags_get("SandboxTagsGet", stream)

    async def SandboxTagsGetV2(self, stream: Stream[Any, Any]) -> None:
        await self._tags_get("SandboxTagsGetV2", stream)

    async def _tags_set(self, name: str, stream: Stream[Any, Any]) -> None:
        request = await self._recv(name, stream)
        self._sandbox(request.sandbox_id).tags = {t.tag_name: t.tag_value for t in request.tags}
        await stream.send_message(empty_pb2.Empty())

    async def SandboxTagsSet(self, stream: Stream[Any, Any]) -> None:
        await self._tags_set("SandboxTagsSet", stream)

    async def SandboxTagsSetV2(self, stream: Stream[Any, Any]) -> None:
        await self._tags_set("SandboxTagsSetV2", stream)

    # -- reaching sandboxes -------------------------------------------------------------

    async def _tunnels(self, name: str, stream: Stream[Any, Any]) -> None:
        sandbox = self._sandbox((await self._recv(name, stream)).sandbox_id)
        tunnels = []
        for spec in sandbox.definition.open_ports.ports:
            server = self.state.port_servers.get((sandbox.sandbox_id, spec.port))
            if server is None:
                server = _port_server(sandbox.sandbox_id, spec.port).__enter__()
                self.state.port_servers[(sandbox.sandbox_id, spec.port)] = server
            port = int(urlsplit(server.base_url).port or 0)
            tunnel = api_pb2.TunnelData(container_port=spec.port, host="127.0.0.1", port=port)
            if spec.unencrypted:
                tunnel.unencrypted_host, tunnel.unencrypted_port = "127.0.0.1", port
            tunnels.append(tunnel)
        await stream.send_message(api_pb2.SandboxGetTunnelsResponse(tunnels=tunnels))

    async def SandboxGetTunnels(self, stream: Stream[Any, Any]) -> None:
        await self._tunnels("SandboxGetTunnels", stream)

    async def SandboxGetTunnelsV2(self, stream: Stream[Any, Any]) -> None:
        await self._tunnels("SandboxGetTunnelsV2", stream)

    async def _connect_token(self, name: str, stream: Stream[Any, Any]) -> None:
        request = await self._recv(name, stream)
        sandbox = self._sandbox(request.sandbox_id)
        if not sandbox.running:
            raise GRPCError(Status.FAILED_PRECONDITION, "Sandbox has finished")
        token = "ct-" + secrets.token_hex(16)
        port = request.port or 8080
        self.state.connect_tokens[token] = (sandbox.sandbox_id, port, request.user_metadata)
        response = api_pb2.SandboxCreateConnectTokenResponse(url=self.state.proxy_url, token=token)
        await stream.send_message(response)

    async def SandboxCreateConnectToken(self, stream: Stream[Any, Any]) -> None:
        await self._connect_token("SandboxCreateConnectToken", stream)

    async def SandboxCreateConnectTokenV2(self, stream: Stream[Any, Any]) -> None:
        await self._connect_token("SandboxCreateConnectTokenV2", stream)

    async def ClientHello(self, stream: Stream[Any, Any]) -> None:
        await self._recv("ClientHello", stream)
        await stream.send_message(api_pb2.ClientHelloResponse())


_STDOUT, _STDERR, _INFO = (
    api_pb2.FILE_DESCRIPTOR_STDOUT,
    api_pb2.FILE_DESCRIPTOR_STDERR,
    api_pb2.FILE_DESCRIPTOR_INFO,
)
#: How `modal image logs` names a line's file descriptor (the counts of `AppCountLogs`).
_SOURCES = {_STDOUT: "stdout", _STDERR: "stderr", _INFO: "system"}


def _build_log(image: FakeImage, fails: bool) -> list[tuple[api_pb2.FileDescriptor.ValueType, str]]:
    """The lines of a build, as Modal's builder prints them: each Dockerfile step, the
    registry pull of a `FROM` that is not a base image, the snapshot."""
    commands = list(image.definition.dockerfile_commands)
    lines = [
        (_INFO, f"Building image {image.image_id}\n"),
        (_STDOUT, f"\n=> Step 0: {commands[0]}\n"),
    ]
    if not image.definition.base_images:
        reference = image.reference
        if fails:
            return [
                *lines,
                (_STDERR, f"Error: reading manifest of {reference}: manifest unknown\n"),
                (_INFO, f"Terminating task due to error: failed to pull {reference}\n"),
            ]
        blob = hashlib.sha256(reference.encode()).hexdigest()
        lines += [
            (_STDOUT, "Getting image source signatures\n"),
            (_STDOUT, f"Copying blob sha256:{blob}\n"),
            (_STDOUT, "Writing manifest to image destination\n"),
        ]
    lines += [(_STDOUT, f"=> Step {n}: {command}\n") for n, command in enumerate(commands[1:], 1)]
    return [
        *lines,
        (_INFO, "Creating image snapshot...\n"),
        (_INFO, f"Finished image build for {image.image_id}\n"),
    ]


#: The GPU types Modal offers (what `gpu=` accepts; others are INVALID_ARGUMENT).
GPU_TYPES = frozenset(
    {"T4", "L4", "A10G", "A10", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H200", "B200"}
)


def _handler(serve: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            serve(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _port_server(sandbox_id: str, port: int) -> LoopbackHTTP:
    """What the sandbox serves on `port`, reached through its tunnel."""

    def serve(http: BaseHTTPRequestHandler) -> None:
        send_json(http, 200, sandbox_page(sandbox_id, port, urlsplit(http.path).path))

    return LoopbackHTTP(_handler(serve))


def _proxy(state: FakeModalState) -> LoopbackHTTP:
    """Modal's connect proxy: a valid connect token reaches its sandbox's port."""

    def serve(http: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(http.path)
        bearer = (http.headers.get("Authorization") or "").removeprefix("Bearer ")
        token = bearer or parse_qs(parts.query).get("_modal_connect_token", [""])[0]
        grant = state.connect_tokens.get(token)
        sandbox = state.sandboxes.get(grant[0]) if grant else None
        if grant is None or sandbox is None or not sandbox.running:
            return send_json(http, 401, {"error": "missing or invalid connect token"})
        sandbox_id, port, user_data = grant
        page = sandbox_page(sandbox_id, port, parts.path, verified_user_data=user_data)
        return send_json(http, 200, page)

    return LoopbackHTTP(_handler(serve))


def _unimplemented(name: str) -> Any:
    async def handler(self: _Servicer, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, f"fake Modal: {name} is not implemented")

    handler.__name__ = name
    return handler


# Every RPC the fake does not implement answers UNIMPLEMENTED (as modal's own test
# helper does), so the abstract servicer can be instantiated.
for _name in list(_Servicer.__abstractmethods__):
    setattr(_Servicer, _name, _unimplemented(_name))
_Servicer.__abstractmethods__ = frozenset()


class FakeModal:
    """The fake server on a free 127.0.0.1 port, on its own thread, while the `with`
    block runs. `state` is what it knows; `url` is for `MODAL_SERVER_URL`."""

    def __init__(self, state: FakeModalState | None = None) -> None:
        self.state = state or FakeModalState()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="fake-modal"
        )
        self._server: Server | None = None
        self._servicer: _Servicer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._proxy = _proxy(self.state).__enter__()
        self.state.proxy_url = self._proxy.base_url
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> int:
        servicer = _Servicer(self.state)  # type: ignore[abstract]  # filled in above
        self._servicer = servicer
        self._server = Server([servicer], status_details_codec=custom_detail_codec)
        await self._server.start("127.0.0.1", 0)
        listening: Any = self._server._server
        return int(listening.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._servicer is not None:
            self._servicer.cancel_builds()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        for server in [self._proxy, *self.state.port_servers.values()]:
            server.__exit__(*exc)
