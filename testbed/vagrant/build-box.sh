#!/usr/bin/env bash
# Builds the Vagrant box of the offline testbed VM and adds it to Vagrant as
# envoy-docker-shim/debian12 (libvirt provider): Debian 12 from debootstrap, with everything
# `vagrant up` would otherwise download already inside, so the VM needs no network at all.
#
#   sudo testbed/vagrant/build-box.sh      (or: sudo make testbed-box)
#
# Inside the box: what testbed/provision.sh installs (it runs in a chroot of the new system, as on
# CI), the Go toolchain of this machine at /usr/local/go, the project's Go modules, Envoy, and the
# stand-ins of the images' base images (testbed/cmd/eds-standins), made once here so the VM only
# imports them. With internet none of this is needed: the Vagrantfile boots debian/bookworm64.
#
# The disk has one ext4 partition and GRUB in its MBR (grub-mkimage with an embedded config; no
# loop device or mount is needed). Work files live under $EDS_BOX_WORK, never in the repository;
# finished stages are skipped on a rerun (remove $EDS_BOX_WORK to start over). Needs root, and the
# network only for the Debian mirror (debootstrap, apt) and, for what this machine's caches lack,
# PyPI and the Go module proxy.
#
# Environment: EDS_BOX_NAME (envoy-docker-shim/debian12), EDS_BOX_WORK
# (/var/cache/envoy-docker-shim/vagrant-box), EDS_BOX_DISK_GB (20), EDS_DEBIAN_MIRROR
# (http://deb.debian.org/debian), ENVOY_VERSION (1.40.0).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BOX_NAME="${EDS_BOX_NAME:-envoy-docker-shim/debian12}"
WORK="${EDS_BOX_WORK:-/var/cache/envoy-docker-shim/vagrant-box}"
DISK_GB="${EDS_BOX_DISK_GB:-20}"
MIRROR="${EDS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ROOT="$WORK/rootfs"
# Packages of the VM itself; testbed/provision.sh adds its own list in the chroot.
BASE_PACKAGES=(linux-image-amd64 systemd-sysv openssh-server sudo curl rsync ca-certificates iproute2 procps python3 kmod)
# The host tools this script runs on.
HOST_PACKAGES=(debootstrap qemu-utils e2fsprogs fdisk grub-pc-bin grub-common vagrant vagrant-libvirt)

log() { printf 'build-box: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot)"
command -v go >/dev/null || die "the go command is not on PATH: the box gets this machine's Go toolchain"

timings=()
redo_rest="" # set once a stage runs: every later stage builds on its result and runs too
stage() { # stage NAME FUNCTION [KEY]: runs FUNCTION unless NAME is done (with the same KEY, when
	# given: e.g. a hash of the script it runs), and records how long it took
	local name=$1 key=${3:-} start=$SECONDS
	if [ -z "$redo_rest" ] && [ -e "$WORK/.done-$name" ] && [ "$(cat "$WORK/.done-$name")" = "$key" ]; then
		log "$name: done before, skipped"
		return
	fi
	[ ! -e "$WORK/.done-$name" ] || [ -n "$redo_rest" ] || log "$name: its inputs changed since the last build"
	log "$name ..."
	"$2"
	printf '%s' "$key" >"$WORK/.done-$name"
	redo_rest=1
	timings+=("$name: $((SECONDS - start))s")
}

mounted=()
umount_all() {
	local m i
	for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
		m=${mounted[i]}
		umount -l "$m" 2>/dev/null || true
	done
	mounted=()
	rm -f "$ROOT/usr/sbin/policy-rc.d"
}
trap umount_all EXIT

# mount_chroot mounts what package scripts and the go command need in the chroot; umount_all
# undoes it (also on failure).
mount_chroot() {
	local d
	for d in proc sys dev dev/pts; do
		mkdir -p "$ROOT/$d"
		case $d in
		proc) mount -t proc proc "$ROOT/proc" ;;
		sys) mount -t sysfs sys "$ROOT/sys" ;;
		dev) mount --bind /dev "$ROOT/dev" ;;
		dev/pts) mount -t devpts devpts "$ROOT/dev/pts" ;;
		esac
		mounted+=("$ROOT/$d")
	done
	# No service starts in the chroot: there is no init, and dockerd must not run here.
	printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
	chmod +x "$ROOT/usr/sbin/policy-rc.d"
	cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
}

in_root() { chroot "$ROOT" env -i HOME=/root TERM=dumb DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
	PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

host_packages() {
	local want=() p
	for p in "${HOST_PACKAGES[@]}"; do
		[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || want+=("$p")
	done
	[ "${#want[@]}" -eq 0 ] && return
	log "installing on this machine: ${want[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${want[@]}"
}

debootstrap_stage() {
	rm -rf "$ROOT"
	mkdir -p "$ROOT"
	debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR"
}

system_stage() {
	mount_chroot
	cat >"$ROOT/etc/apt/sources.list" <<-EOF
		deb $MIRROR bookworm main
		deb $MIRROR bookworm-updates main
		deb ${MIRROR%/debian}/debian-security bookworm-security main
	EOF
	in_root apt-get update -q
	in_root apt-get install -y -q --no-install-recommends "${BASE_PACKAGES[@]}"
	echo eds-testbed >"$ROOT/etc/hostname"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\teds-testbed\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
	echo '/dev/vda1 / ext4 defaults,errors=remount-ro 0 1' >"$ROOT/etc/fstab"
	# The one NIC (QEMU user-mode networking, or VirtualBox NAT) gets its address by DHCP.
	cat >"$ROOT/etc/systemd/network/10-dhcp.network" <<-EOF
		[Match]
		Name=eth* en*

		[Network]
		DHCP=ipv4
	EOF
	in_root systemctl enable systemd-networkd.service ssh.service
	# Nothing in an offline VM may try the network on a timer.
	in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer
	# Vagrant's user: its well-known insecure key, which `vagrant up` replaces with a new one.
	local key="" k
	for k in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
		[ -f "$k" ] && key=$k
	done
	[ -n "$key" ] || die "Vagrant's insecure public key (keys/vagrant.pub of the vagrant gem) is not on this machine"
	in_root useradd --create-home --shell /bin/bash vagrant
	install -d -m 0700 "$ROOT/home/vagrant/.ssh"
	install -m 0600 "$key" "$ROOT/home/vagrant/.ssh/authorized_keys"
	in_root chown -R vagrant:vagrant /home/vagrant/.ssh
	echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$ROOT/etc/sudoers.d/vagrant"
	chmod 0440 "$ROOT/etc/sudoers.d/vagrant"
	umount_all
}

# provision_stage runs testbed/provision.sh in the chroot, as CI runs it on a fresh machine, with
# this machine's Go toolchain, Envoy and module cache seeded in so nothing is downloaded twice.
provision_stage() {
	mount_chroot
	rm -rf "$ROOT/usr/local/go"
	cp -a "$(go env GOROOT)" "$ROOT/usr/local/go"
	ln -sf ../go/bin/go "$ROOT/usr/local/bin/go"
	ln -sf ../go/bin/gofmt "$ROOT/usr/local/bin/gofmt"
	local envoy=/var/cache/envoy-docker-shim/envoy-$ENVOY_VERSION
	if [ -x "$envoy/envoy" ]; then
		mkdir -p "$ROOT/var/cache/envoy-docker-shim"
		cp -a "$envoy" "$ROOT/var/cache/envoy-docker-shim/"
	fi
	# The repository as committed and as edited (untracked files too, ignored ones not).
	rm -rf "$ROOT/tmp/eds-repo"
	mkdir -p "$ROOT/tmp/eds-repo"
	(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$ROOT/tmp/eds-repo" -xf -
	local modcache
	modcache="$(go env GOMODCACHE)/cache/download"
	mkdir -p "$ROOT/mnt/host-goproxy"
	if [ -d "$modcache" ]; then
		mount --bind -o ro "$modcache" "$ROOT/mnt/host-goproxy"
		mounted+=("$ROOT/mnt/host-goproxy")
	fi
	in_root sh -c "cd /tmp/eds-repo && GOPROXY=file:///mnt/host-goproxy,https://proxy.golang.org GOFLAGS=-modcacherw testbed/provision.sh"
	# The stand-ins' tarballs, into the box's cache; the VM imports them (eds-standins finds them by
	# the same key: same toolchain, go.sum, busybox and Envoy). The builds after them warm the Go
	# build cache for what the VM compiles itself.
	in_root sh -c "cd /tmp/eds-repo && EDS_STANDIN_IMPORT=false go run ./testbed/cmd/eds-standins >/dev/null"
	in_root sh -c "cd /tmp/eds-repo && go build -o /dev/null ./testbed/cmd/eds-standins && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /dev/null ./testbed/echoserver"
	rm -rf "$ROOT/tmp/eds-repo"
	in_root apt-get clean
	umount_all
	rmdir "$ROOT/mnt/host-goproxy"
	# No DNS in the VM: it has no network to ask (and the Vagrant VM keeps it that way).
	printf '# No network in the offline testbed VM.\n' >"$ROOT/etc/resolv.conf"
}

disk_stage() {
	local raw="$WORK/disk.raw" start=2048
	rm -f "$raw" "$WORK/box.img"
	truncate -s "${DISK_GB}G" "$raw"
	echo "start=$start, type=83, bootable" | sfdisk -q "$raw"
	# The root filesystem, written at the partition's offset straight from the directory.
	local fs_kb=$(((DISK_GB * 1024 * 1024 * 1024 - start * 512) / 1024))
	mke2fs -q -t ext4 -L eds-root -d "$ROOT" -E offset=$((start * 512)) -F "$raw" "${fs_kb}k"
	# GRUB: boot.img in the MBR, core.img right after it (grub-mkimage fills in its block list for
	# that place), the boot entry embedded in core.img. /vmlinuz and /initrd.img are the symlinks
	# Debian keeps pointing at the current kernel.
	cat >"$WORK/grub.cfg" <<-EOF
		set root=(hd0,msdos1)
		serial --unit=0 --speed=115200
		terminal_input serial console
		terminal_output serial console
		linux /vmlinuz root=/dev/vda1 ro console=tty0 console=ttyS0,115200n8 net.ifnames=0
		initrd /initrd.img
		boot
	EOF
	grub-mkimage -O i386-pc -o "$WORK/core.img" -p '(hd0,msdos1)/boot/grub' -c "$WORK/grub.cfg" \
		biosdisk part_msdos ext2 linux boot serial terminal
	[ "$(stat -c %s "$WORK/core.img")" -lt $(((start - 1) * 512)) ] || die "GRUB's core.img does not fit before the partition"
	dd if=/usr/lib/grub/i386-pc/boot.img of="$raw" bs=440 count=1 conv=notrunc status=none
	dd if="$WORK/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none
	qemu-img convert -O qcow2 "$raw" "$WORK/box.img"
	rm -f "$raw"
}

box_stage() {
	local dir="$WORK/box"
	rm -rf "$dir"
	mkdir -p "$dir"
	ln "$WORK/box.img" "$dir/box.img"
	printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$DISK_GB" >"$dir/metadata.json"
	tar -C "$dir" -cf "$WORK/eds.box" metadata.json box.img
	rm -rf "$dir"
	vagrant box add --force --name "$BOX_NAME" "$WORK/eds.box"
	rm -f "$WORK/eds.box"
	# vagrant-libvirt copies a box's image into the storage pool once per box it was added as;
	# remove the copies of boxes this one replaced, unless a VM still stands on one.
	remove_stale_volumes
}

remove_stale_volumes() {
	local uri=qemu:///system vol path dom used=""
	virsh -c "$uri" pool-info default >/dev/null 2>&1 || return 0
	for dom in $(virsh -c "$uri" list --all --name); do
		for path in $(virsh -c "$uri" domblklist "$dom" | awk 'NR > 2 && $2 ~ /^\// {print $2}'); do
			used+=" $(qemu-img info -U --output=json "$path" 2>/dev/null | sed -n 's/.*"backing-filename": "\([^"]*\)".*/\1/p' | head -n1)"
		done
	done
	for vol in $(virsh -c "$uri" vol-list default | awk '{print $1}' | grep "^${BOX_NAME//\//-VAGRANTSLASH-}_vagrant_box_image_" || true); do
		path=$(virsh -c "$uri" vol-path --pool default "$vol")
		if [[ " $used " == *" $path "* ]]; then
			log "keeping $vol: a VM stands on it (make testbed-destroy, then rebuild to drop it)"
		else
			virsh -c "$uri" vol-delete --pool default "$vol" >/dev/null
			log "removed the previous box's image $vol from the storage pool"
		fi
	done
}

mkdir -p "$WORK"
start_all=$SECONDS
host_packages
stage debootstrap debootstrap_stage
stage system system_stage
# The box must carry what today's provision.sh installs: an older box fails offline in apt-get.
stage provision provision_stage "$(cat "$REPO/testbed/provision.sh" "$REPO/go.mod" | sha256sum | cut -c1-16)"
stage disk disk_stage
box_stage
log "box $BOX_NAME added; timings:"
for t in "${timings[@]}"; do log "  $t"; done
log "  total: $((SECONDS - start_all))s"
