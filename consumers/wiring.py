"""How the apps are put together: one place builds the registry, the adapters, the
OpenBao resolver and the router, and the worker's parts on top of them. Workers,
`sandboxer route explain` and `sandboxer reconcile` all use it, so they route alike."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass

from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from adapters.registry import Registry
from adapters.routing import Router
from consumers.claims import Claims
from consumers.delivery import KeepAlive
from consumers.destroy import Destroying
from consumers.extend import Extending
from consumers.lifecycle import Expiry, Lifecycle
from consumers.metering import Metering
from consumers.policy import Policies
from consumers.provision import Provisioning
from consumers.reach import Connecting
from consumers.reconcile import Reconciler
from sandboxer.catalogue import Catalogue
from sandboxer.connect import connection_of
from sandboxer.credits import Ledger
from sandboxer.settings import Settings
from sandboxer.statuses import StatusStore

log = logging.getLogger("sandboxer.wiring")


@dataclass(frozen=True)
class Providers:
    """The validated extensions and the router over their adapters."""

    registry: Registry
    router: Router


async def open_providers(
    settings: Settings, stack: AsyncExitStack, nats: Nats | None = None, *, keys: bool = True
) -> Providers:
    """Load `extensions/`, build one adapter per extension (on the process's NATS
    connection `nats`, if it has one) and, with `keys`, the OpenBao resolver (when
    configured); `stack` closes them. Billing prices with the adapters and needs no key."""
    registry = Registry.load(settings.extensions_dir)
    adapters = registry.build_adapters(settings, nats)
    for adapter in adapters.values():
        stack.push_async_callback(adapter.aclose)
    resolver = None
    if keys and settings.bao is not None:
        from adapters.openbao import CredentialResolver  # hvac only when needed

        resolver = CredentialResolver(settings.bao)
        stack.callback(resolver.close)
    # Provider accounts' slots live in the journal too (docs/policy.md); logical
    # templates' readiness in the catalogue (docs/templates.md).
    js = nats.jetstream(timeout=10.0) if nats is not None else None
    ledger = Ledger(js) if js is not None else None
    catalogue = Catalogue(js) if js is not None else None
    router = Router(adapters, registry.extensions, resolver, ledger, catalogue)
    return Providers(registry, router)


@dataclass(frozen=True)
class WorkerParts:
    """The handlers of a worker and what they share."""

    providers: Providers
    statuses: StatusStore
    lifecycle: Lifecycle
    provisioning: Provisioning
    destroying: Destroying
    extending: Extending
    connecting: Connecting
    ledger: Ledger
    policies: Policies

    def reconciler(self, *, grace_s: float) -> Reconciler:
        return Reconciler(
            self.lifecycle,
            self.statuses,
            grace_s=grace_s,
            ledger=self.ledger,
            policies=self.policies,
        )


async def open_worker(
    settings: Settings, js: JetStreamContext, stack: AsyncExitStack
) -> WorkerParts:
    """Everything a worker (or a reconciliation pass) needs, closed by `stack`."""
    providers = await open_providers(settings, stack, connection_of(js))
    statuses = await StatusStore.open(js)
    keepalive = KeepAlive.for_ack_wait(settings, closed_by=stack)
    lifecycle = Lifecycle(
        settings=settings,
        registry=providers.registry,
        router=providers.router,
        keepalive=keepalive,
        metering=Metering(js, providers.registry, statuses, settings.deployment),
        expiry=Expiry(js),
    )
    ledger = Ledger(js)
    policies = Policies(providers.registry, ledger)
    await policies.start(js)
    stack.push_async_callback(policies.aclose)
    claims = Claims(providers.registry, providers.router, statuses, policies)
    log.info(
        "worker: nats=%s deployment=%s extensions=%s in-flight<=%d openbao=%s",
        settings.nats_where,
        settings.deployment,
        ",".join(providers.router.extension_ids),
        settings.max_in_flight,
        settings.bao.addr if settings.bao else "off",
    )
    return WorkerParts(
        providers=providers,
        statuses=statuses,
        lifecycle=lifecycle,
        provisioning=Provisioning(lifecycle, claims, ledger),
        destroying=Destroying(lifecycle, statuses, policies),
        extending=Extending(lifecycle, statuses, ledger, policies),
        connecting=Connecting(providers.router, statuses),
        ledger=ledger,
        policies=policies,
    )
