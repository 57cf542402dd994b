"""Machines without an agent: ssh targets of ``shoal run``/``copy``/``rcopy`` (asyncssh).

The fan-out runs in the CLI process, one asyncio loop, one connection per host: the user's
keys never leave their machine (docs/cli.md, docs/security.md).

- ``targets``: pure: ``-H`` specs and the inventory file into ``SshTarget``s, and the
  remote command line (each argv word quoted for the remote POSIX shell).
- ``hostkeys``: the host key policy (unknown keys refused unless accepted explicitly).
- ``connect``: one connection with that policy; asyncssh's errors become one reason each.
- ``fanout``: the ssh leg of a run: the same events an agent sends, from ssh channels.
- ``sftp``: the ssh leg of ``copy``/``rcopy``.
- ``wheelhouse``: the wheels ``agent install`` ships (shoal and its dependencies, from here).
- ``agent_install``: ``shoal agent install``/``uninstall``, host by host;
  ``agent_remote``: the stdlib-only script the host's Python runs for it.
"""
