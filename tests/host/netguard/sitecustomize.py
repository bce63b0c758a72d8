"""Loaded by the test server's Python (the harness puts this folder on its PYTHONPATH): the
server may talk to the loopback only, as a user's offline machine would let it.

Every other connection or name lookup fails and leaves a `LIDIT-NETWORK-BLOCKED` line in the
server log, so a test can assert that nothing (the pack, transformers, the hub client) even tried.
"""
import socket
import sys

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _local(host) -> bool:
    host = str(host)
    return host in LOCAL_NAMES or host.startswith("127.") or host.startswith("::ffff:127.")


def _refuse(what) -> OSError:
    print(f"LIDIT-NETWORK-BLOCKED {what!r}", file=sys.stderr, flush=True)
    return OSError(f"network access blocked by the test harness: {what!r}")


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        raise _refuse(address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        raise _refuse(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _local(host.decode() if isinstance(host, bytes) else host):
        raise socket.gaierror(socket.EAI_NONAME, str(_refuse(host)))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
print("LIDIT-NETWORK-GUARD active: loopback only", file=sys.stderr, flush=True)
