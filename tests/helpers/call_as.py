"""Call one method over a unix socket and print the JSON-RPC response.

Run by the tests as another host account: argv is SOCKET METHOD PARAMS_JSON.
"""

import http.client
import json
import socket
import sys


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def main() -> None:
    path, method, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    req = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        req["params"] = params
    conn = UnixConnection(path)
    try:
        conn.request(
            "POST", "/rpc", body=json.dumps(req), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        body = resp.read()
    except PermissionError:
        print(json.dumps({"transport_error": "permission denied"}))
        return
    print(body.decode() if body else json.dumps({"status": resp.status}))


if __name__ == "__main__":
    main()
