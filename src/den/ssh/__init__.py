"""The SSH gateway: the den shell, shells, commands, sftp and port forwarding
into workspaces, over the OpenSSH client people already have.

One module per concern: ``server`` (listener, host keys, authentication),
``target`` (what a login name means), ``shell`` (the den shell), ``session``
(a shell or command inside a workspace), ``sftp`` and ``sftp_worker`` (the
sftp subsystem, served from inside the workspace), ``forward`` (``ssh -L``),
``table`` (the live sessions), ``info`` (``den info``, ``den ssh-config``).
"""
