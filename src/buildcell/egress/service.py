"""One cell's egress service: serves the listeners bound inside its network namespace.

It runs an asyncio loop in a thread of the supervisor for as long as the cell lives:
the proxy and transparent listeners go to ``EgressProxy``, the resolver's sockets to
``DnsResponder``. Names are resolved on the host (or pinned by the operator with
``--add-host``); the cell itself never talks to any resolver but this one. Closing the
service cancels every connection and closes every socket, which also frees the cell's
network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import resource
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from buildcell import _log
from buildcell._fs import Closing
from buildcell.allowlist import EgressPolicy
from buildcell.egress.audit import Attempt, EgressStats
from buildcell.egress.dns import DnsAnswer, DnsResponder, SyntheticAddresses
from buildcell.egress.listener import Listener
from buildcell.egress.proxy import EgressProxy
from buildcell.errors import SandboxError

__all__ = ["MAX_CONNECTIONS", "MAX_NOISY_EVENTS", "EgressService"]

log = _log.get(__name__)

#: Connections served at once per cell; beyond it new ones are closed at once.
MAX_CONNECTIONS = 1024

#: Denials and DNS queries recorded as events per cell; beyond it they are only counted
#: (a hostile build could otherwise grow the audit trail without bound).
MAX_NOISY_EVENTS = 2000


class _EventBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used < self.limit:
                self.used += 1
                return True
            self.dropped += 1
            return False


Emit = Callable[..., Any]


def _raise_nofile() -> None:
    """Lift the soft descriptor limit to the hard one: each tunnel holds six descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class EgressService(Closing):
    """Serves ``listeners`` (sockets bound in the cell's namespace) under ``policy``.

    Args:
        policy: the cell's allowlist.
        listeners: each ``Listener`` with its socket, as ``receive_listeners`` returned.
        emit: ``emit(event, **fields)`` for ``net.allow``, ``net.deny`` and ``dns.query``.
        pinned: names the operator pinned to addresses (``--add-host``), resolved without
            asking the host's resolver. They still pass the address guard, unless the
            policy grants the pin (:meth:`EgressPolicy.with_pins`).
        scrub: applied to every name and path before it is recorded (secret redaction).
        idle_timeout: tunnels with no traffic for this long are closed.

    Raises:
        SandboxError: the service thread could not start.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        listeners: Sequence[tuple[Listener, socket.socket]],
        *,
        emit: Emit,
        pinned: Mapping[str, str] | None = None,
        scrub: Callable[[str], str] = lambda text: text,
        idle_timeout: float = 300.0,
    ) -> None:
        self.policy = policy
        self.stats = EgressStats()
        self.addresses = SyntheticAddresses()
        self._listeners = list(listeners)
        self._emit = emit
        self._pinned = dict(pinned or {})
        self._scrub = scrub
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: set[socket.socket] = set()
        self._started = threading.Event()
        self._closed = False
        self._budget = _EventBudget(MAX_NOISY_EVENTS)
        self.proxy = EgressProxy(
            policy,
            resolve=self._resolve,
            name_for=self.addresses.name_for,
            record=self._record,
            idle_timeout=idle_timeout,
        )
        self.dns = DnsResponder(policy.allows_name, self.addresses, self._record_dns)
        _raise_nofile()
        self._thread = threading.Thread(target=self._run, name="buildcell-egress", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as e:
            self._close_sockets()
            raise SandboxError(f"cannot start the egress service: {e}") from e
        if not self._started.wait(timeout=30):
            self.close()
            raise SandboxError("the egress service did not start")

    # -- audit -------------------------------------------------------------------------

    def _text(self, text: str) -> str:
        """Scrubbed first, cut after: a secret across the cut is still redacted whole."""
        return self._scrub(text)[:256]

    def _record(self, attempt: Attempt) -> None:
        # Everything the cell chose (names, paths, and the reasons quoting them) is text
        # a hostile build controls: it is scrubbed of secret values before it is kept.
        attempt.host = self._text(attempt.host)
        for name in ("path", "reason", "suggestion", "add_host", "error"):
            value = getattr(attempt, name)
            if value is not None:
                setattr(attempt, name, self._text(value))
        first = self.stats.add(attempt)
        if attempt.allowed:
            self._emit("net.allow", **attempt.event_fields())
        elif first:
            # The first denial of each destination is always recorded (and shown live by
            # the CLI): at most one per row of the summary, which is bounded itself.
            self._emit("net.deny", **attempt.event_fields(), first=True)
        elif self._budget.take():
            self._emit("net.deny", **attempt.event_fields())

    def _record_dns(self, answer: DnsAnswer) -> None:
        self.stats.add_dns(refused=not answer.allowed)
        if not self._budget.take():
            return
        fields: dict[str, Any] = {
            "name": self._text(answer.name),
            "qtype": answer.qtype,
            "rcode": answer.rcode,
            "allowed": answer.allowed,
            "transport": answer.transport,
        }
        if answer.address is not None:
            fields["address"] = answer.address
        self._emit("dns.query", **fields)

    # -- resolution --------------------------------------------------------------------

    async def _resolve(self, host: str, port: int) -> list[str]:
        pinned = self._pinned.get(host)
        if pinned is not None:
            return [pinned]
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        seen: list[str] = []
        for family, _type, _proto, _name, addr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                text = str(ipaddress.ip_address(addr[0]))
                if text not in seen:
                    seen.append(text)
        return seen

    # -- serving -----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        for listener, sock in self._listeners:
            self._spawn(self._serve(listener, sock))
        self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._cancel_all())
            # A lookup still running in the resolver's thread is not waited for.
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("egress handler failed", exc_info=task.exception())

    async def _serve(self, listener: Listener, sock: socket.socket) -> None:
        if listener.role == "dns":
            if listener.transport == "udp":
                await self.dns.serve_udp(sock)
            else:
                await self.dns.serve_tcp(sock)
            return
        while True:
            await self._readable(sock)
            try:
                # accept() itself, not loop.sock_accept(): a cancellation right after
                # an accept can then never drop the new socket unclosed.
                client, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                log.debug("accept on %s failed: %s", listener, e)
                await asyncio.sleep(0.05)
                continue
            client.setblocking(False)
            if len(self._tasks) >= MAX_CONNECTIONS:
                client.close()
                continue
            # Owned by the service until its handler ends: a handler cancelled before it
            # ever ran still has its socket closed (by _cancel_all).
            self._clients.add(client)
            if listener.role == "proxy":
                self._spawn(self._own(client, self.proxy.serve_proxy(client)))
            else:
                self._spawn(self._own(client, self.proxy.serve_transparent(client, listener.port)))

    async def _readable(self, sock: socket.socket) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_reader(sock.fileno(), wake)
        try:
            await ready
        finally:
            self._loop.remove_reader(sock.fileno())

    async def _own(self, client: socket.socket, work: Any) -> None:
        try:
            await work
        finally:
            self._clients.discard(client)
            client.close()

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in list(self._clients):
            client.close()
        self._clients.clear()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for _listener, sock in self._listeners:
            sock.close()

    @property
    def connections(self) -> int:
        """Connections (and listeners) being served now."""
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        """True once the thread has stopped and every listener is closed."""
        return (
            self._closed
            and not self._thread.is_alive()
            and all(sock.fileno() == -1 for _listener, sock in self._listeners)
        )

    def close(self) -> None:
        """Stop serving: every connection is closed, every listener too. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        else:
            self._close_sockets()
        # After the handlers ended: the ones cancelled above have been counted too.
        if self._budget.dropped:
            self._emit(
                "net.suppressed",
                recorded=self._budget.used,
                suppressed=self._budget.dropped,
                message=f"{self._budget.dropped} further denials and DNS queries were only "
                "counted, not recorded one by one",
            )
