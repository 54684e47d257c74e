"""The owner's own account inside a workspace, and which account a session lands in.

Each workspace has a normal account named after its owner's den user (uid and
gid 1000, home /home/NAME, bash when the image has it, passwordless sudo),
made at create by one shell script run as root *inside* the workspace
(``crun exec``): the host never writes into the snapshot through paths the
image controls. ssh, sftp, ``workspace.exec`` and ``code.push`` land in it
through :func:`login_account`; root is ``sudo`` away, or ``ssh root+NAME@host``
and ``exec --user root``.

A workspace without the account (made before den had it, or from an image with
neither useradd nor busybox adduser) keeps working: its sessions land as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from den.backends.base import ExecRequest
from den.backends.inside import NotReadable
from den.db.models import SshKey, User, Workspace
from den.errors import DenError, InvalidParams
from den.ssh import inside
from den.storage.rootfs import DIR_FLAGS, new_file

if TYPE_CHECKING:
    from den.app import App
    from den.backends.base import Spec
    from den.rpc.registry import Context

log = logging.getLogger(__name__)

UID = 1000
ROOT = "root"
_NO_TOOL = 3  # the script's exit status when the image has no way to add a user
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

# Run as root inside: $1 name, $2 comment (display name), $3 public keys (one a
# line), $4 a [user] section for ~/.gitconfig. Pure POSIX sh with coreutils or
# busybox, so that it runs in any image; each step is idempotent, so a clone of
# another user's workspace runs it again (usermod renames its account).
SETUP = r"""
set -u
name=$1 gecos=$2 keys=$3 gitcfg=$4 uid=1000
say() { echo "$*" >&2; }
has() { command -v "$1" >/dev/null 2>&1; }
# name with id $2 in passwd/group file $1 (third field), else nothing
name_of() { [ -f "$1" ] || return 0
  while IFS=: read -r n _ i _; do [ "$i" = "$2" ] && { echo "$n"; return 0; }; done < "$1"; }
field_of() { [ -f /etc/passwd ] || return 0
  while IFS=: read -r n _ _ _ _ h s; do
    [ "$n" = "$1" ] && { [ "$2" = home ] && echo "$h" || echo "$s"; return 0; }
  done < /etc/passwd; }
# printf to the end of file $1, on a line of its own
add() { f=$1; shift; [ -s "$f" ] && [ -n "$(tail -c 1 "$f")" ] && echo >> "$f"; printf "$@" >> "$f"; }
shell=/bin/sh
for s in /bin/bash /usr/bin/bash; do [ -x "$s" ] && { shell=$s; break; }; done

if [ -z "$(field_of "$name" home)" ]; then
  old=$(name_of /etc/passwd $uid)
  if [ -n "$old" ]; then
    # An image's own uid 1000 user (ubuntu, debian, dev...) becomes the owner's:
    # its files stay theirs, and no second account fights over the uid.
    has usermod || { say "uid $uid is $old and the image has no usermod"; exit 3; }
    oldg=$(name_of /etc/group $uid)
    usermod -l "$name" -c "$gecos" -d "/home/$name" -m "$old" >&2 || exit 1
    if [ "$oldg" = "$old" ] && has groupmod; then groupmod -n "$name" "$old" >&2 || exit 1; fi
  else
    # Entries written here, not by useradd/groupadd: those fsync each file they
    # touch (some 200 ms a create on a busy btrfs), and this works in any image.
    [ -w /etc/passwd ] || { say "the image has no writable /etc/passwd"; exit 3; }
    if [ -z "$(name_of /etc/group $uid)" ]; then
      add /etc/group '%s:x:%s:\n' "$name" $uid
      [ -f /etc/gshadow ] && add /etc/gshadow '%s:!::\n' "$name"
    fi
    add /etc/passwd '%s:x:%s:%s:%s:/home/%s:%s\n' "$name" $uid $uid "$gecos" "$name" "$shell"
    [ -f /etc/shadow ] && add /etc/shadow '%s:!:%s:0:99999:7:::\n' "$name" $(($(date +%s) / 86400))
    if [ ! -e "/home/$name" ]; then
      mkdir -p "/home/$name" && chmod 700 "/home/$name" || exit 1
      [ -d /etc/skel ] && cp -a /etc/skel/. "/home/$name/"
      chown -R $uid:$uid "/home/$name"
    fi
  fi
fi
home=$(field_of "$name" home)
ids=$(id -u "$name"):$(id -g "$name")
[ -n "$home" ] && [ "$home" != / ] || { say "$name has no home"; exit 1; }
mkdir -p "$home" && chown "$ids" "$home"

# sudo reads /etc/sudoers.d (made here when sudo is not installed yet: it then
# works as soon as it is); sudo ignores the file unless it is 0440.
mkdir -p /etc/sudoers.d
printf '%s ALL=(ALL:ALL) NOPASSWD: ALL\n' "$name" > "/etc/sudoers.d/den-$name"
chmod 0440 "/etc/sudoers.d/den-$name"

umask 077
mkdir -p "$home/.ssh"
touch "$home/.ssh/authorized_keys"
printf '%s\n' "$keys" | while IFS= read -r k; do
  [ -z "$k" ] || grep -qxF -- "$k" "$home/.ssh/authorized_keys" ||
    printf '%s\n' "$k" >> "$home/.ssh/authorized_keys"
done
chmod 700 "$home/.ssh"; chmod 600 "$home/.ssh/authorized_keys"
chown "$ids" "$home/.ssh" "$home/.ssh/authorized_keys"

umask 022
cfg=$home/.gitconfig
if ! grep -qs '^\[user\]' "$cfg"; then printf '%s' "$gitcfg" >> "$cfg"; fi
chown "$ids" "$cfg"
"""


def _git_value(text: str) -> str:
    """``text`` as a quoted git config value, on one line."""
    flat = _CONTROL.sub(" ", text).strip()
    return '"' + flat.replace("\\", "\\\\").replace('"', '\\"') + '"'


def git_identity(owner: User) -> tuple[str, str]:
    """(name, email) git commits with for ``owner``: the display name (else the
    name), the email (else NAME@this host, as code.push's author)."""
    name = _CONTROL.sub(" ", owner.display_name).strip() or owner.name
    return name, owner.email or f"{owner.name}@{socket.gethostname() or 'den'}"


def _fields(owner: User) -> tuple[str, str]:
    """The passwd comment and the ~/.gitconfig [user] section of ``owner``'s account."""
    name, email = git_identity(owner)
    gitcfg = f"[user]\n\tname = {_git_value(name)}\n\temail = {_git_value(email)}\n"
    gecos = _CONTROL.sub(" ", owner.display_name).replace(":", " ").replace(",", " ").strip()
    return gecos, gitcfg


async def make_account(
    app: App, spec: Spec, state: dict[str, object], owner: User, keys: list[str]
) -> bool:
    """Make (or complete) the owner's account inside the running workspace.

    Never fails the workspace: an image with no way to add a user, or a script
    that fails, is logged and its sessions land as root. True when it is made.
    """
    gecos, gitcfg = _fields(owner)
    req = ExecRequest(
        argv=["/bin/sh", "-c", SETUP, "den-account", spec.owner, gecos, "\n".join(keys), gitcfg],
        cwd="/",
        timeout=60.0,
        user=ROOT,
        max_output=8192,
    )
    where = {"ctx": {"workspace": f"{spec.owner}/{spec.name}"}}
    try:
        res = await app.backend_for(spec).exec(spec, dict(state), req)
    except (DenError, OSError) as exc:  # the workspace works without it: sessions land as root
        log.warning("could not make %s's account inside: %s", spec.owner, exc, extra=where)
        return False
    said = res.stderr.decode(errors="replace").strip()[-500:]
    if res.exit_code == 0:
        return True
    if res.exit_code == _NO_TOOL:
        log.info(
            "no account for %s inside (%s); sessions land as root", spec.owner, said, extra=where
        )
    else:
        log.warning(
            "making %s's account inside failed (exit %d): %s",
            spec.owner,
            res.exit_code,
            said,
            extra=where,
        )
    return False


async def _keys(ctx: Context, owner: User) -> list[str]:
    q = select(SshKey.public_key, SshKey.comment).where(SshKey.user_id == owner.id)
    rows = (await ctx.db.execute(q.order_by(SshKey.id))).all()
    await ctx.db.commit()  # no transaction held while the account is made
    return [_CONTROL.sub(" ", f"{key} {comment}").strip() for key, comment in rows]


async def write_at_create(ctx: Context, rootfs: Path, owner: User) -> bool:
    """:func:`write_account` into a new workspace's rootfs snapshot, before its
    first start; False when the image needs :data:`SETUP` (run inside after)."""
    keys = await _keys(ctx, owner)
    gecos, gitcfg = _fields(owner)
    try:
        return await asyncio.to_thread(write_account, rootfs, owner.name, gecos, keys, gitcfg)
    except OSError as exc:
        log.info("account of %s not written before start (%s): made inside", owner.name, exc)
        return False


async def setup_owner(ctx: Context, ws: Workspace, owner: User) -> bool:
    """:func:`make_account` for a workspace just created (or cloned) and running."""
    from den.services.workspaces import spec_of  # workspaces imports this module

    keys = await _keys(ctx, owner)
    spec = spec_of(ctx.app, ws, owner)
    return await make_account(ctx.app, spec, dict(ws.backend_state or {}), owner, keys)


async def login_account(app: App, spec: Spec, user: str = "") -> inside.Account:
    """The account a session in ``spec``'s workspace runs as.

    ``user`` named (``root`` for ``ssh root+NAME@host`` and ``exec --user
    root``): that account. Otherwise ``ssh_user`` when the admin set one (the
    same account for everyone, e.g. root as before den had accounts), else the
    owner's account, for the owner and for an admin entering it alike, the
    workspace being the owner's. Root when the workspace has no such account.
    """
    wanted = user or app.settings.ssh_user
    if wanted:
        return await inside.load_account(spec.rootfs, wanted)
    try:
        return await inside.load_account(spec.rootfs, spec.owner)
    except InvalidParams:
        log.debug("%s/%s has no account %s: landing as root", spec.owner, spec.name, spec.owner)
        return await inside.load_account(spec.rootfs, ROOT)


# Where SETUP's `command -v usermod` looks (exec's PATH), as paths in the image.
_SBIN = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")


def can_hold_account(root: Path, name: str) -> bool:
    """Whether :data:`SETUP` will give ``name`` an account with uid :data:`UID` in a
    workspace made from the image tree ``root`` (SETUP's own tests, read on the
    host before the workspace first starts, through descriptors that follow no
    symlink): decides whether its /code is made the account's (Spec.code_owner).

    No shell, no /etc/passwd, uid 1000 another user's with no usermod to rename
    it (busybox), or ``name`` there with another uid: its sessions land as root
    (or in that account), so /code stays root's.
    """
    if not any(inside.exists(root, sh) for sh in ("bin/sh", "usr/bin/sh")):
        return False
    try:
        lines = inside.read_inside(root, "etc", "passwd").splitlines()
    except (OSError, NotReadable):
        return False
    entries = [f.split(":") for f in lines]
    uids = {f[0]: f[2] for f in entries if len(f) >= 3}
    if name in uids:
        return uids[name] == str(UID)
    if str(UID) in uids.values():
        return any(inside.exists(root, f"{d}/usermod") for d in _SBIN)
    return True


def _owner_uid(tree: Path, rel: str) -> int | None:
    """The uid that owns ``rel`` under ``tree`` on disk, following no symlink;
    None if absent."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        fd = os.open(tree, flags)
    except OSError:
        return None
    try:
        for part in [p for p in rel.split("/") if p]:
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.fstat(fd).st_uid
    except OSError:
        return None
    finally:
        os.close(fd)


def git_account(spec: Spec, rel: str) -> str:
    """Who runs git in /code/REL for code.push: the uid that owns the repository
    inside, since git refuses to work in another user's. In a workspace made with
    the owner's account (``spec.code_owner``) that is the account for what den
    cloned and what the account made (root's on disk, theirs inside), and root
    for what root made; in one made before, root for den's clones."""
    uid = _owner_uid(spec.code, f"{rel}/.git")
    if uid is None:  # no such repository: git says so, as the account /code is
        return str(spec.code_owner)
    if spec.code_owner and uid in (0, spec.code_owner):
        uid = spec.code_owner if uid == 0 else 0  # the view's swap
    return str(uid)


# -- the account written before the first start ---------------------------------
# A new workspace's rootfs snapshot is the image's tree, untouched: nothing of
# the workspace has run yet. So the account SETUP would make inside is written
# straight into it, saving the create an exec (tens of milliseconds); every
# path is still walked by descriptors that follow no symlink, the image being
# an admin's import maybe. Anything but the plain case (uid 1000 or the name
# taken, no regular /etc/passwd...) is left to SETUP, inside.
_SKEL_DEPTH = 8


def _regular(dir_fd: int, name: str) -> str | None:
    """The text of regular file ``name`` (at most 1 MiB), or None."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, 1 << 20).decode(errors="replace")
    finally:
        os.close(fd)


def _append(dir_fd: int, name: str, old: str, line: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.write(fd, (("\n" if old and not old.endswith("\n") else "") + line).encode())
    finally:
        os.close(fd)


def _copy_tree(src: int, dst: int, depth: int = 0) -> None:
    """Regular files and directories of ``src`` into ``dst``, owned by UID (a skeleton)."""
    for entry in os.scandir(src):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            text = _regular(src, entry.name)
            if text is not None:
                with contextlib.suppress(FileExistsError):
                    new_file(dst, entry.name, text, stat.S_IMODE(st.st_mode) & 0o755, UID)
        elif stat.S_ISDIR(st.st_mode) and depth < _SKEL_DEPTH:
            with contextlib.suppress(FileExistsError):
                os.mkdir(entry.name, 0o755, dir_fd=dst)
            sub_src = os.open(entry.name, DIR_FLAGS, dir_fd=src)
            sub_dst = os.open(entry.name, DIR_FLAGS, dir_fd=dst)
            try:
                os.fchown(sub_dst, UID, UID)
                _copy_tree(sub_src, sub_dst, depth + 1)
            finally:
                os.close(sub_src)
                os.close(sub_dst)


def write_account(root: Path, name: str, gecos: str, keys: list[str], gitcfg: str) -> bool:
    """What :data:`SETUP` makes, written into the untouched image tree ``root``
    (ids on disk are the workspace's); False, with nothing written, unless the
    image is the plain case."""
    fds: list[int] = []

    def opendir(rel: str, at: int | None, create: bool = False) -> int:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(rel, 0o755, dir_fd=at)
        fd = os.open(rel, DIR_FLAGS, dir_fd=at)
        fds.append(fd)
        return fd

    try:
        rfd = opendir(str(root), None)
        etc = opendir("etc", rfd)
        passwd, group = _regular(etc, "passwd"), _regular(etc, "group")
        if (
            passwd is None
            or group is None
            or not any(inside.exists(root, sh) for sh in ("bin/sh", "usr/bin/sh"))
        ):
            return False
        users = [ln.split(":") for ln in passwd.splitlines()]
        if any(f[0] == name or (len(f) > 2 and f[2] == str(UID)) for f in users):
            return False  # a rename or an existing account: SETUP's usermod
        home_root = opendir("home", rfd, create=True)
        if inside.exists(root, f"home/{name}"):
            return False
        # /bin/bash as SETUP says it: /bin is usr/bin's symlink in a merged-/usr image.
        has_bash = any(inside.exists(root, b) for b in ("bin/bash", "usr/bin/bash"))
        shell = "/bin/bash" if has_bash else "/bin/sh"
        _append(etc, "passwd", passwd, f"{name}:x:{UID}:{UID}:{gecos}:/home/{name}:{shell}\n")
        if not any(
            len(f) > 2 and f[2] == str(UID) for f in (g.split(":") for g in group.splitlines())
        ):
            _append(etc, "group", group, f"{name}:x:{UID}:\n")
            if (gshadow := _regular(etc, "gshadow")) is not None:
                _append(etc, "gshadow", gshadow, f"{name}:!::\n")
        if (shadow := _regular(etc, "shadow")) is not None:
            days = int(time.time() // 86400)
            _append(etc, "shadow", shadow, f"{name}:!:{days}:0:99999:7:::\n")
        os.mkdir(name, 0o700, dir_fd=home_root)
        home = opendir(name, home_root)
        os.fchown(home, UID, UID)
        with contextlib.suppress(OSError):
            skel = opendir("skel", etc)
            _copy_tree(skel, home)
        with contextlib.suppress(FileExistsError):
            os.mkdir(".ssh", 0o700, dir_fd=home)
        ssh = opendir(".ssh", home)
        os.fchown(ssh, UID, UID)
        new_file(ssh, "authorized_keys", "".join(f"{k}\n" for k in keys if k), 0o600, UID)
        if "[user]" not in (_regular(home, ".gitconfig") or ""):
            with contextlib.suppress(FileExistsError):
                new_file(home, ".gitconfig", gitcfg, 0o644, UID)
        sudoers = opendir("sudoers.d", etc, create=True)
        new_file(sudoers, f"den-{name}", f"{name} ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440, 0)
        return True
    finally:
        for fd in fds:
            os.close(fd)
