# mipvpn: `make lab` brings the lab up, `make test` runs every test tier.
# Both install what they need: Debian packages (deps) and a virtualenv (.venv).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

DEB_PACKAGES := iproute2 iputils-ping nftables tcpdump tshark \
	strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins \
	python3-venv postgresql freediameterd \
	qemu-system-x86 busybox-static linux-image-amd64
# qemu + a stock Debian kernel: the kernel test tier (xfrm ESP, ipip) boots it with
# virtme-ng, because the build machines' own kernel has no ESP.

.PHONY: all deps venv lab down test test-native test-kernel lint clean

all: venv

deps: .deps.stamp
.deps.stamp: Makefile
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEB_PACKAGES)
	touch $@

venv: $(BIN)/mipvpn
$(BIN)/mipvpn: pyproject.toml | .deps.stamp
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Bring the lab up (or keep the one that is up), show it, and run the handover demo.
lab: venv
	$(BIN)/mipvpn lab up
	$(BIN)/mipvpn lab status
	$(BIN)/mipvpn lab demo
	$(BIN)/mipvpn lab demo --peer cn2 --no-capture    # route optimised: fa ==ESP== cngw2, not via the HA

down: venv
	$(BIN)/mipvpn lab down

lint: venv
	$(BIN)/ruff check daemons lab tests

test: lint test-native test-kernel

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test-native: venv
	$(BIN)/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

# Tests that need kernel ESP/ipip, inside a VM booted with virtme-ng (about a minute).
# After test-native, so the guest finds compiled bytecode instead of compiling over 9p.
test-kernel: venv test-native
	$(BIN)/python tests/kernel/run_vm.py

clean: down
	rm -rf $(VENV) .deps.stamp
