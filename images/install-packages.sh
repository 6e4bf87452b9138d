#!/bin/sh
# Package and user setup shared by every cocoon image (images/Dockerfile.*),
# so the package-manager detection lives in one place. POSIX sh: it runs
# before bash is installed, on busybox too.
#
#   install-packages.sh install [PKG...]  install packages, plus what every
#                                         image needs (bash, CA certificates,
#                                         the tools that create users), with
#                                         whichever package manager the base
#                                         has, and clean its caches
#   install-packages.sh user [--sudo]     create the user cocoon (uid 1000,
#                                         gid 1000, home /home/cocoon, bash)
#                                         and /cocoon (cocoon:cocoon, 0700);
#                                         --sudo: passwordless sudo for it
#   install-packages.sh setup [SCRIPT]    run a shell snippet as root, if
#                                         non-empty (CUSTOM_SETUP_SCRIPT)
#   install-packages.sh detect            print the package manager's name
#
# Package managers: apt-get (Debian, Ubuntu), apk (Alpine), dnf and microdnf
# (Fedora, RHEL), yum (CentOS), pacman (Arch), zypper (openSUSE). Package
# names are passed through as given: they are the base distribution's names.
#
# Derived images can use it too (it is kept at
# /usr/local/lib/cocoon/install-packages.sh):
#   USER root
#   RUN sh /usr/local/lib/cocoon/install-packages.sh install htop
#   USER cocoon
set -eu

COCOON_USER=cocoon
COCOON_UID=1000
COCOON_GID=1000
COCOON_HOME=/home/cocoon
COCOON_DATA=/cocoon

die() {
    echo "install-packages.sh: $*" >&2
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

detect() {
    for pm in apt-get apk dnf microdnf yum pacman zypper; do
        if have "$pm"; then
            echo "$pm"
            return 0
        fi
    done
    die "no supported package manager (apt-get, apk, dnf, microdnf, yum, pacman, zypper) in this image"
}

# What every image needs besides the caller's packages, in each family's
# names: bash for terminals, CA certificates for wss:// and whatever users
# fetch, and useradd where the minimal images leave it out.
base_packages() {
    case $1 in
        apt-get) echo "bash ca-certificates passwd" ;;
        apk) echo "bash ca-certificates" ;;
        dnf | microdnf | yum) echo "bash ca-certificates shadow-utils" ;;
        pacman) echo "bash ca-certificates shadow" ;;
        zypper) echo "bash ca-certificates ca-certificates-mozilla shadow" ;;
    esac
}

install_packages() {
    pm=$(detect)
    # shellcheck disable=SC2046 # the base list is words on purpose
    set -- $(base_packages "$pm") "$@"
    echo "install-packages.sh: $pm: $*"
    case $pm in
        apt-get)
            export DEBIAN_FRONTEND=noninteractive
            apt-get update
            apt-get install -y --no-install-recommends "$@"
            apt-get clean
            rm -rf /var/lib/apt/lists/*
            ;;
        apk)
            apk add --no-cache "$@"
            ;;
        dnf)
            dnf install -y --setopt=install_weak_deps=False "$@"
            dnf clean all
            rm -rf /var/cache/dnf /var/cache/libdnf5
            ;;
        microdnf)
            microdnf install -y --setopt=install_weak_deps=0 "$@"
            microdnf clean all
            ;;
        yum)
            yum install -y "$@"
            yum clean all
            rm -rf /var/cache/yum
            ;;
        pacman)
            # A full upgrade with the install: Arch does not support partial
            # upgrades (-Sy without -u).
            pacman -Syu --noconfirm --needed "$@"
            rm -rf /var/cache/pacman/pkg/*
            ;;
        zypper)
            zypper --non-interactive --gpg-auto-import-keys refresh
            zypper --non-interactive install --no-recommends "$@"
            zypper clean --all
            ;;
    esac
}

# The name of the entry of a passwd or group FILE whose id (third field) is
# ID, other than cocoon's own; empty if none.
owner_of() {
    while IFS=: read -r name _ id _; do
        if [ "$id" = "$2" ] && [ "$name" != "$COCOON_USER" ]; then
            echo "$name"
            return 0
        fi
    done <"$1"
}

has_entry() {
    while IFS=: read -r name _; do
        [ "$name" = "$2" ] && return 0
    done <"$1"
    return 1
}

create_user() {
    sudo=false
    for arg in "$@"; do
        case $arg in
            --sudo) sudo=true ;;
            *) die "user: unknown option $arg" ;;
        esac
    done
    shell=/bin/sh
    [ -x /bin/bash ] && shell=/bin/bash

    # Some bases give uid/gid 1000 to a user of their own (ubuntu:24.04's
    # "ubuntu", the node images' "node"): cocoon takes the id over.
    other=$(owner_of /etc/passwd "$COCOON_UID")
    if [ -n "$other" ]; then
        echo "install-packages.sh: removing user $other (uid $COCOON_UID)"
        if have userdel; then
            userdel -r "$other" 2>/dev/null || userdel "$other"
        else
            deluser --remove-home "$other" 2>/dev/null || deluser "$other"
        fi
    fi
    other=$(owner_of /etc/group "$COCOON_GID")
    if [ -n "$other" ]; then
        echo "install-packages.sh: removing group $other (gid $COCOON_GID)"
        if have groupdel; then groupdel "$other"; else delgroup "$other"; fi
    fi

    if have useradd; then
        has_entry /etc/group "$COCOON_USER" || groupadd -g "$COCOON_GID" "$COCOON_USER"
        has_entry /etc/passwd "$COCOON_USER" ||
            useradd -m -u "$COCOON_UID" -g "$COCOON_USER" -d "$COCOON_HOME" -s "$shell" "$COCOON_USER"
    elif have adduser && have addgroup; then
        # busybox (Alpine without shadow)
        has_entry /etc/group "$COCOON_USER" || addgroup -g "$COCOON_GID" "$COCOON_USER"
        has_entry /etc/passwd "$COCOON_USER" ||
            adduser -D -u "$COCOON_UID" -G "$COCOON_USER" -h "$COCOON_HOME" -s "$shell" "$COCOON_USER"
    else
        die "neither useradd nor busybox adduser is available"
    fi
    mkdir -p "$COCOON_HOME"
    chown "$COCOON_UID:$COCOON_GID" "$COCOON_HOME"

    # The worker's data dir: secret, device id, task store. A volume in the
    # images; a new named volume starts with this owner and mode.
    mkdir -p "$COCOON_DATA"
    chown "$COCOON_UID:$COCOON_GID" "$COCOON_DATA"
    chmod 0700 "$COCOON_DATA"

    if $sudo; then
        have sudo || die "user --sudo: install sudo first"
        mkdir -p /etc/sudoers.d
        echo "$COCOON_USER ALL=(ALL) NOPASSWD:ALL" >"/etc/sudoers.d/$COCOON_USER"
        chmod 0440 "/etc/sudoers.d/$COCOON_USER"
    fi
}

run_setup() {
    script=${1:-}
    [ -n "$script" ] || return 0
    # The usual setup is "curl -fsSL URL | sh": bring the downloader it
    # names if the base lacks it.
    for tool in curl wget; do
        case $script in
            *"$tool "*) have "$tool" || install_packages "$tool" ;;
        esac
    done
    echo "install-packages.sh: running the setup script"
    sh -c "$script"
}

[ $# -ge 1 ] || die "usage: install-packages.sh install [PKG...] | user [--sudo] | setup [SCRIPT] | detect"
command=$1
shift
case $command in
    install) install_packages "$@" ;;
    user) create_user "$@" ;;
    setup) run_setup "${1:-}" ;;
    detect) detect ;;
    *) die "unknown command $command" ;;
esac
