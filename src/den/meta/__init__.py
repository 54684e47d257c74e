"""The metadata service: http://169.254.169.254/ inside every workspace.

How a request reaches den, and how den knows which workspace asks
-----------------------------------------------------------------
den opens a listening TCP socket *inside* each running workspace's network
namespace: a short-lived thread setns()es into the netns (den.net.links.in_netns),
adds 169.254.169.254/32 to the namespace's ``lo``, binds 169.254.169.254 on a
port nothing binds (den.meta.server.inner_port: a socket on port 80 itself
would make the workspace's own bind of 0.0.0.0:80 fail) and puts a NAT rule in
the namespace that sends 169.254.169.254:80 there. The socket stays in that
namespace after the thread ends; the daemon's event loop serves it like any
other (one aiohttp AppRunner for all). A connection from inside is local
delivery within the workspace's own namespace: it never crosses the veth or
the bridge, so the host's egress firewall (den.net.firewall, in the host's
namespace) never sees it.

The workspace is known by *which socket accepted the connection*, never by a
source address: each accepted socket carries its network namespace's cookie
(SO_NETNS_COOKIE), and den maps cookies to the workspaces it opened listeners
for. Spoofing another workspace's address on the bridge gives nothing: the
connection still lands on the asking workspace's own listener. The netns
belongs to the host's user namespace, so the workspace's root has no
CAP_NET_ADMIN over it and cannot remove the address or re-route it.

The listener is opened while a workspace starts (its namespace and address
are den's before crun runs; den's socket is in place when the start returns)
and closed when it stops or is deleted; the daemon re-opens them for running
workspaces when it starts (den.meta.server.start). Should a process inside
take den's port first (IP_FREEBIND, while den is down or in the first
milliseconds of a start), den logs that it cannot listen there: the squatter
answers only its own workspace, which learns nothing it did not know.

Pieces: :mod:`den.meta.server` (listeners, identity, ``META_ROUTES``,
``add_port``), :mod:`den.meta.routes` (the /v1 endpoints), :mod:`den.meta.token`
(the workspace-scoped token).
"""

from __future__ import annotations

ADDRESS = "169.254.169.254"
BUSY_NAME = "den-busy"
# Where den-busy is mounted in every workspace (read-only, from the instance's
# .init tmpfs beside tini). POSIX sh: busybox's wget where it exists (busybox
# images), else bash's /dev/tcp (Debian minbase has neither curl nor wget).
BUSY_PATH = "/usr/local/bin/den-busy"
DEN_BUSY = r"""#!/bin/sh
# den-busy [DURATION] : keep this workspace awake (default 1h; den caps it).
# den-busy --release  : end the lease.   den-busy --status : show it.
# It asks den's metadata service at http://169.254.169.254/v1/busy (with the
# Den-Metadata header its writes need).
case "${1:-}" in
  -h|--help) echo "usage: den-busy [DURATION like 20m, 2h] | --release | --status"; exit 0 ;;
  --release|release) method=POST; path="/v1/busy?for=0" ;;
  --status|status) method=GET; path="/v1/busy" ;;
  *) method=POST; path="/v1/busy?for=${1:-1h}" ;;
esac
if command -v wget >/dev/null 2>&1; then
  if [ "$method" = POST ]; then
    exec wget -qO- --header "Den-Metadata: true" --post-data= "http://169.254.169.254$path"
  fi
  exec wget -qO- --header "Den-Metadata: true" "http://169.254.169.254$path"
fi
if command -v bash >/dev/null 2>&1; then
  exec bash -c '
    exec 3<>/dev/tcp/169.254.169.254/80 || exit 1
    printf "%s %s HTTP/1.0\r\nHost: 169.254.169.254\r\nDen-Metadata: true\r\nContent-Length: 0\r\n\r\n" "$1" "$2" >&3
    IFS=" " read -r _ status _ <&3
    while IFS= read -r line <&3; do [ "${line%$(printf "\r")}" = "" ] && break; done
    cat <&3
    case "$status" in 2*) exit 0 ;; *) exit 1 ;; esac
  ' den-busy "$method" "$path"
fi
echo "den-busy: needs wget or bash" >&2
exit 1
"""
