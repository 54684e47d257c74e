"""The SSH gateway: the den shell, shells, commands, sftp and port forwarding
into workspaces, over the OpenSSH client people already have.

One module per concern: ``server`` (listener, authentication, the per-address
limit, audit, channel routing), ``hostkeys``, ``quickack`` (no delayed-ACK
stalls in the handshake), ``target`` (what a login name means; resume on
connect), ``link`` (what a connection's channels share), ``table`` (the live
sessions), ``shell`` and ``stdio`` (the den shell: the generated CLI run
in-process), ``session`` (a shell or command inside a workspace), ``relay``
(fds to channels), ``inside`` (the workspace's accounts), ``sftp``,
``sftp_worker``, ``sftp_server`` and ``sftp_wire`` (the sftp subsystem,
served from inside the workspace), ``forward`` (``ssh -L``), ``agent``
(``ssh -A``), ``streamlocal`` (Unix sockets both ways), ``socket_worker`` and
``join`` (workers that make sockets inside a workspace; how workers join it), ``info``
(``den info``, ``den ssh-config``).
"""
