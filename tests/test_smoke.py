from tests.conftest import Daemon


def test_health_over_socket(daemon: Daemon) -> None:
    assert daemon.call("rpc.health")["status"] == "ok"


def test_member_over_socket(daemon: Daemon, name: str) -> None:
    daemon.call("user.create", name=name)
    resp = daemon.call_as(name, "auth.whoami")
    assert resp["result"]["name"] == name
    assert resp["result"]["role"] == "member"
    daemon.call("user.delete", name=name)
