"""Errors with a stable code (SPEC "Error codes"), raised at the edge that knows and
turned into a `failed` SandboxStatus once, in the consumer."""

from __future__ import annotations

from typing import ClassVar

from pydantic import ValidationError

from schemas import ErrorCode, ErrorInfo


class SandboxerError(Exception):
    """Base of every error that ends up in `SandboxStatus.error`.

    `retryable` errors are retried with backoff until the delivery limit; the others
    fail the request at once. Messages must never contain a secret.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retryable: ClassVar[bool] = False


class InvalidRequest(SandboxerError):
    code = ErrorCode.INVALID_REQUEST


class UnknownProfile(SandboxerError):
    code = ErrorCode.UNKNOWN_PROFILE


class InsufficientCredits(SandboxerError):
    """The tenant's available balance does not cover the hold."""

    code = ErrorCode.INSUFFICIENT_CREDITS


class UnknownExtension(SandboxerError):
    code = ErrorCode.UNKNOWN_EXTENSION


class NoRoute(SandboxerError):
    code = ErrorCode.NO_ROUTE

    def __init__(self, message: str, *, skipped: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        #: (extension_id, why it was skipped), in route order.
        self.skipped = skipped or []


class Forbidden(SandboxerError):
    """The publisher may not act for the tenant it names (its consumer does not list
    it): refused before anything is held, made or stored."""

    code = ErrorCode.FORBIDDEN


class QuotaExceeded(SandboxerError):
    """A limit of the tenant's consumer profile (or an operator's override) is reached:
    concurrency, create rate or a spend cap; the message names it. Never retried."""

    code = ErrorCode.QUOTA_EXCEEDED


class PolicyDenied(SandboxerError):
    """The tenant's consumer profile does not allow this request at all: a profile,
    a GPU type or a TTL it does not permit. Never retried."""

    code = ErrorCode.POLICY_DENIED


class ProviderRejected(SandboxerError):
    """The provider refused the request and provably created nothing."""

    code = ErrorCode.PROVIDER_REJECTED


class ProviderUnavailable(SandboxerError):
    """The provider (or a service on the way to it) failed transiently."""

    code = ErrorCode.PROVIDER_UNAVAILABLE
    retryable = True


class ProviderFailed(SandboxerError):
    """The provider failed and said not to retry, after the request may have taken
    effect: not safe to fall back to another provider (a sandbox might exist, and
    reconciliation finds it by its tags)."""

    code = ErrorCode.PROVIDER_UNAVAILABLE


class IdempotencyConflict(SandboxerError):
    code = ErrorCode.IDEMPOTENCY_CONFLICT


class NotFound(SandboxerError):
    code = ErrorCode.NOT_FOUND


class TemplateFailed(SandboxerError):
    """A template build cannot finish: Packer is missing or failed, or gave no usable
    artifact. Provider build failures are recorded per provider, not raised."""

    code = ErrorCode.TEMPLATE_FAILED


def error_info(exc: Exception) -> ErrorInfo:
    """What a `failed` status says about `exc`: its code and message, or only the type
    of an unexpected error (its text may carry internals)."""
    if isinstance(exc, SandboxerError):
        return ErrorInfo(code=exc.code, message=str(exc)[:1024])
    return ErrorInfo(code=ErrorCode.INTERNAL, message=f"internal error ({type(exc).__name__})")


def validation_problems(exc: ValidationError, prefix: str = "") -> str:
    """`field.path: what is wrong; ...` for each problem pydantic found, at most 900
    characters (it goes into statuses, dead letters and logs)."""
    return "; ".join(
        f"{prefix}{'.'.join(str(p) for p in item['loc']) or 'body'}: {plain_message(item['msg'])}"
        for item in exc.errors()
    )[:900]


def plain_message(msg: str) -> str:
    """A pydantic message without the `Value error, ` its validators' errors start with."""
    return msg.removeprefix("Value error, ")


class ManifestError(Exception):
    """A file in `extensions/` is wrong; the message names the file and the field."""
