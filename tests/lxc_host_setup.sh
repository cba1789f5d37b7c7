#!/bin/bash
# Prepare this host for the lxc_download.py integration tests.
#
# Run once, as root, before the tests (CI: after
# `apt-get install -y lxc uidmap gnupg dirmngr xz-utils busybox-static`).
# Idempotent: re-running it is harmless.
#
# What the tests need, and why:
#   * Privileged containers (root): nothing beyond the lxc package. The tests
#     pass `lxc.net.0.type = empty` themselves (no lxcbr0 bridge exists), so
#     /etc/lxc/default.conf is left alone.
#   * Unprivileged containers: an ordinary user with subordinate uid/gid
#     ranges (newuidmap/newgidmap must be setuid), user namespaces enabled,
#     and ~/.config/lxc/default.conf carrying the matching lxc.idmap lines.
#     Every directory down to ~/.local/share/lxc/<name>/rootfs must be
#     traversable (o+x) by the mapped container root (an unmapped uid for
#     the host), hence home mode 0755.
#   * No cgroup preparation: on this cgroup-v1 host without systemd no
#     hierarchy is writable by the user, and LXC 5 then simply starts the
#     unprivileged container without cgroups -- provided the container
#     config sets no cgroup limits. That is what
#     /usr/share/lxc/config/userns.conf does (it clears common.conf's
#     lxc.cgroup*.devices rules), and what the download template's
#     "config-user" includes. Without it lxc-execute fails with
#     "Failed to setup cgroup limits".
set -euo pipefail

LXC_TEST_USER="${LXC_TEST_USER:-lxcuser}"
SUBID_COUNT=65536

die() { echo "lxc_host_setup: $*" >&2; exit 1; }
log() { echo "lxc_host_setup: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root"
for cmd in lxc-create lxc-execute lxc-destroy lxc-usernsexec newuidmap newgidmap runuser useradd usermod; do
    command -v "$cmd" >/dev/null 2>&1 || die "missing command: $cmd"
done
[ -x /bin/busybox ] || log "warning: /bin/busybox missing (busybox-static), test rootfs helpers may need it"

# newuidmap/newgidmap must be privileged (setuid root or file capabilities).
for helper in /usr/bin/newuidmap /usr/bin/newgidmap; do
    if [ ! -u "$helper" ] && ! { command -v getcap >/dev/null 2>&1 && getcap "$helper" | grep -q cap_set; }; then
        log "making $helper setuid root"
        chmod u+s "$helper"
    fi
done

# User namespaces must be allowed for unprivileged users.
if [ "$(cat /proc/sys/user/max_user_namespaces)" = 0 ]; then
    log "enabling user namespaces (user.max_user_namespaces)"
    echo 15000 > /proc/sys/user/max_user_namespaces
fi
if [ -e /proc/sys/kernel/unprivileged_userns_clone ] && [ "$(cat /proc/sys/kernel/unprivileged_userns_clone)" = 0 ]; then
    log "enabling kernel.unprivileged_userns_clone"
    echo 1 > /proc/sys/kernel/unprivileged_userns_clone
fi
if [ -e /proc/sys/kernel/apparmor_restrict_unprivileged_userns ] && [ "$(cat /proc/sys/kernel/apparmor_restrict_unprivileged_userns)" != 0 ]; then
    log "disabling kernel.apparmor_restrict_unprivileged_userns"
    echo 0 > /proc/sys/kernel/apparmor_restrict_unprivileged_userns
fi

# The test user.
if ! id "$LXC_TEST_USER" >/dev/null 2>&1; then
    log "creating user $LXC_TEST_USER"
    useradd --create-home --shell /bin/bash "$LXC_TEST_USER"
fi
home="$(getent passwd "$LXC_TEST_USER" | cut -d: -f6)"
group="$(id -gn "$LXC_TEST_USER")"
[ -d "$home" ] || install -d -o "$LXC_TEST_USER" -g "$group" "$home"
chmod 0755 "$home"

# Subordinate id ranges: reuse an existing range of >= SUBID_COUNT ids
# (Debian's useradd allocates one automatically), otherwise add one after
# every range already allocated.
subid_start() {  # $1 = /etc/subuid or /etc/subgid
    local file="$1" start
    touch "$file"
    start="$(awk -F: -v u="$LXC_TEST_USER" -v n="$SUBID_COUNT" \
        '$1 == u && $3 >= n { print $2; exit }' "$file")"
    if [ -z "$start" ]; then
        start="$(awk -F: 'BEGIN { m = 100000 } NF >= 3 && $2 + $3 > m { m = $2 + $3 } END { print m }' "$file")"
        if [ "$file" = /etc/subuid ]; then
            usermod --add-subuids "$start-$((start + SUBID_COUNT - 1))" "$LXC_TEST_USER"
        else
            usermod --add-subgids "$start-$((start + SUBID_COUNT - 1))" "$LXC_TEST_USER"
        fi
        log "added $file range $LXC_TEST_USER:$start:$SUBID_COUNT" >&2
    fi
    echo "$start"
}
uid_start="$(subid_start /etc/subuid)"
gid_start="$(subid_start /etc/subgid)"

# Per-user LXC directories (all traversable by the mapped container root).
for d in .config .config/lxc .local .local/share .local/share/lxc .cache .cache/lxc; do
    install -d -o "$LXC_TEST_USER" -g "$group" -m 0755 "$home/$d"
    chmod 0755 "$home/$d"
done

# Default container config used by the user's lxc-create. It is NOT an
# include of /etc/lxc/default.conf: that file asks for a veth on lxcbr0
# (no bridge here) and an AppArmor profile (no AppArmor in this kernel).
conf="$home/.config/lxc/default.conf"
cat > "$conf.tmp" <<EOF
# Written by tests/lxc_host_setup.sh
lxc.idmap = u 0 $uid_start $SUBID_COUNT
lxc.idmap = g 0 $gid_start $SUBID_COUNT
lxc.net.0.type = empty
EOF
chown "$LXC_TEST_USER:$group" "$conf.tmp"
chmod 0644 "$conf.tmp"
mv -f "$conf.tmp" "$conf"

# Self-check: the user can enter a user namespace with its subordinate ids.
if ! runuser -u "$LXC_TEST_USER" -- env -i HOME="$home" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        sh -c "cd / && lxc-usernsexec -- true"; then
    die "user $LXC_TEST_USER cannot create a user namespace with its subordinate ids"
fi
log "ok: user=$LXC_TEST_USER uid_map=0:$uid_start:$SUBID_COUNT gid_map=0:$gid_start:$SUBID_COUNT"
