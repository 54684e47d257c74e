from tests.workspaces.conftest import *  # noqa

def test_probe(pool_daemon, bb_image, users, wsname):
    d = pool_daemon
    u = users.make()
    ws = create(d, u, wsname)
    ns = f"den{d.instance}-{ws['id']}"
    print(ns_exec(ns, "setpriv", "--reuid", "624288", "--regid", "624288", "--clear-groups", "/bin/busybox", "ping", "-c1", "127.0.0.1"))
    print(ns_exec(ns, "setpriv", "--reuid", "624288", "--regid", "624288", "--clear-groups", "python3", "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); print('ok')"))
    pid = init_pid(d, ws["id"])
    print(subprocess.run(["nsenter", "-t", str(pid), "-n", "cat", "/proc/sys/net/ipv4/ping_group_range"], capture_output=True, text=True))
    print(subprocess.run(["ls", "-l", f"/proc/{pid}/ns/net", f"/var/run/netns/{ns}"], capture_output=True, text=True))
    print(subprocess.run(["stat", "-L", "-c", "%i", f"/proc/{pid}/ns/net", f"/var/run/netns/{ns}"], capture_output=True, text=True))
    d.call("workspace.delete", ref=ws["ref"])
