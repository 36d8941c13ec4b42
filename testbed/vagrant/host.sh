#!/usr/bin/env bash
# Prepares this machine for the testbed VM on Vagrant's libvirt provider (make testbed-up runs it):
#
#   - the Debian packages vagrant, vagrant-libvirt, libvirt-daemon-system, qemu-system-x86 and
#     qemu-utils, installed when missing (without recommendations: no dnsmasq, no NFS server);
#   - /dev/kvm for group kvm (QEMU's), where no udev has set it so;
#   - for root, a libvirt daemon: systemd starts libvirtd on demand; on a host without a service
#     manager (a CI container or microVM) this script starts libvirtd and virtlogd itself.
#
# The VM needs no libvirt network: its only NIC is QEMU's user-mode networking with ports
# forwarded to 127.0.0.1 (see the Vagrantfile), so no bridge or address appears on this machine. A
# user other than root gets a session libvirt of their own and needs no daemon of root's.
# Nothing to do when VAGRANT_DEFAULT_PROVIDER names another provider.
set -euo pipefail

PACKAGES=(vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils)

log() { printf 'host: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "${VAGRANT_DEFAULT_PROVIDER:-libvirt}" in
libvirt) ;;
*)
	log "provider ${VAGRANT_DEFAULT_PROVIDER}: nothing to prepare"
	exit 0
	;;
esac

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
want=()
for p in "${PACKAGES[@]}"; do installed "$p" || want+=("$p"); done
if [ "${#want[@]}" -gt 0 ]; then
	[ "$(id -u)" -eq 0 ] || die "missing ${want[*]}: install them (sudo apt-get install --no-install-recommends ${want[*]})"
	log "installing ${want[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${want[@]}"
fi

[ "$(id -u)" -eq 0 ] || exit 0 # a session libvirt starts by itself

# QEMU runs as libvirt-qemu, a member of group kvm. udev gives /dev/kvm to that group; a machine
# without udev (a microVM, a container) may leave it to another group, and QEMU then falls over
# with "Could not access KVM kernel module: Permission denied". Do what udev would.
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
	log "/dev/kvm belongs to group $(stat -c %G /dev/kvm), not kvm (no udev here?): giving it to kvm, mode 0660, as udev would"
	chgrp kvm /dev/kvm
	chmod 0660 /dev/kvm
fi

answers() { timeout 20 virsh -c qemu:///system version >/dev/null 2>&1; }
if ! answers; then
	[ ! -d /run/systemd/system ] || die "libvirtd does not answer: systemctl start libvirtd"
	log "no service manager here: starting virtlogd and libvirtd"
	pgrep -x virtlogd >/dev/null || virtlogd --daemon
	pgrep -x libvirtd >/dev/null || libvirtd --daemon
	for _ in $(seq 1 30); do
		answers && break
		sleep 1
	done
	answers || die "libvirtd started but does not answer on qemu:///system"
fi
active=$(virsh -c qemu:///system net-list --name | sed '/^$/d')
[ -z "$active" ] || log "note: libvirt networks active on this machine (the VM uses none): $active"
log "libvirt ready: $(virsh -c qemu:///system version | sed -n 's/^Running hypervisor: //p')"
